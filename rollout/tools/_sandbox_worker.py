"""Sandbox worker: a notebook-like Python kernel run in its own process (and namespaces).

Started by ``sandbox.py`` as ``python -I _sandbox_worker.py [--ns pid,net,mount,ipc,uts]
[--uid-base N] [--cgroup DIR]... LIFELINE REQ RESP``. That process is the **launcher**: it stays in
the trainer's namespaces, creates a pid namespace and forks the **kernel**, pid 1 of it, then
only waits. The launcher is the lifeline: the trainer holds the write end of the LIFELINE pipe and
never writes to it, so when the trainer dies (even by SIGKILL) the pipe hangs up and the launcher
kills the kernel, which takes every process of the pid namespace with it. (The kernel has
PR_SET_PDEATHSIG on the launcher, so killing the launcher kills it too.)

The kernel runs as root only long enough to set itself up:

1. join the sandbox's cgroup(s) (created and limited by the trainer), unshare the mount, network,
   ipc and uts namespaces, read its config frame (uid, limits, which namespaces it is in);
2. in the private mount namespace, switch to a new root that holds only what code needs: the
   system directories (/usr, /lib*, /bin, /sbin, /etc) and the interpreter's prefixes and
   site-packages, read-only; a fresh /proc; a minimal /dev; a size- and inode-limited private
   tmpfs on /tmp (the working directory). The trainer's checkout, data, checkpoints and home
   directories do not exist in it;
3. bound SysV shared memory in its ipc namespace (kernel.shmmax/shmall/shmmni);
4. pre-import numpy / PIL so a call costs milliseconds (matplotlib, Agg, on first use);
5. set rlimits, drop to the unprivileged uid/gid (setgroups([])), set no_new_privs, seccomp;
6. send a ``ready`` frame and serve requests. As pid 1 it reaps the zombies that code leaves
   (orphans and unwaited children) after every call.

Stand-alone on purpose (stdlib + numpy/PIL/matplotlib only): it runs as a script, not as part of
the package. Frames are a 4-byte big-endian length + UTF-8 JSON; images travel as base64 PNG.
The trainer never unpickles anything from here: JSON only.
"""

import ast
import base64
import codecs
import ctypes
import gc
import io
import json
import linecache
import os
import resource
import select
import signal
import site
import struct
import sys
import time
import traceback
import warnings

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x4000000, 0x8000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
NS_FLAGS = {"pid": CLONE_NEWPID, "net": CLONE_NEWNET, "mount": CLONE_NEWNS, "ipc": CLONE_NEWIPC,
            "uts": CLONE_NEWUTS}
SYS_PIVOT_ROOT = 155  # x86_64 and the generic table (aarch64: 41)
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
DEVICES = ("null", "zero", "full", "random", "urandom")
WORKDIR = "/tmp"
PRELOAD_STDLIB = (
    "math", "cmath", "re", "json", "collections", "itertools", "functools", "random", "statistics",
    "string", "textwrap", "datetime", "time", "decimal", "fractions", "heapq", "bisect", "copy",
    "typing", "dataclasses", "operator", "pprint", "csv", "hashlib", "base64", "struct", "io",
    "os.path", "pathlib", "tempfile", "glob", "shutil", "zlib", "unicodedata", "difflib",
    "calendar", "colorsys", "array", "enum", "numbers", "threading", "subprocess", "socket",
    "urllib.parse", "urllib.request", "ctypes", "uuid", "warnings", "contextlib", "abc",
)


# ---------------------------------------------------------------- framing

def read_exact(fd: int, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        b = os.read(fd, min(n - got, 1 << 20))
        if not b:
            raise EOFError("channel closed")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def recv(fd: int) -> dict:
    (n,) = struct.unpack(">I", read_exact(fd, 4))
    return json.loads(read_exact(fd, n))


def send(fd: int, msg: dict) -> None:
    data = json.dumps(msg).encode()
    view = memoryview(struct.pack(">I", len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


# ---------------------------------------------------------------- mounts (root, private mount ns)

_libc = ctypes.CDLL(None, use_errno=True)


def mount(src, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    if _libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def umount(target: str) -> None:
    if _libc.umount2(target.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def visible_dirs() -> list:
    """What sandboxed code may see, read-only: the system directories and the interpreter's
    prefixes and site-packages. Not the rest of ``sys.path``: an editable install (or a .pth
    file) can put the trainer's checkout there."""
    dirs = [d for d in SYSTEM_DIRS if os.path.lexists(d)]
    for p in {sys.base_prefix, sys.prefix, sys.base_exec_prefix, sys.exec_prefix,
              *site.getsitepackages()}:
        if p and os.path.isdir(p):
            dirs.append(os.path.abspath(p))
    # Outermost first; a dir inside another one (the venv's site-packages inside the venv,
    # /usr/local inside /usr) comes with its parent.
    dirs = sorted(set(dirs))
    return [d for d in dirs if not any(d != q and d.startswith(q + "/") for q in dirs
                                       if not os.path.islink(q))]


def _pivot_root(new_root: str) -> bool:
    """pivot_root(new_root, new_root) stacks the old root on the new one; detaching it leaves
    nothing of the old tree in this mount namespace. False where pivot_root is refused (an
    initramfs root): the caller chroots instead."""
    os.chdir(new_root)
    syscall = _libc.syscall
    nr = SYS_PIVOT_ROOT if os.uname().machine == "x86_64" else 41
    if syscall(nr, b".", b".") != 0:
        return False
    umount(".")
    os.chdir("/")
    return True


def setup_mounts(cfg: dict) -> list:
    """Switch to a new root with only what code needs (see the module docstring). Returns notes."""
    notes = []
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    dirs = visible_dirs()
    # Hold every source by an O_PATH descriptor before anything is covered (a venv may live under
    # /tmp, which the new root's tmpfs is mounted on); bind from /proc/self/fd/N.
    held = [(d, os.readlink(d) if os.path.islink(d) else None,
             None if os.path.islink(d) else os.open(d, os.O_PATH | os.O_DIRECTORY)) for d in dirs]
    new = WORKDIR  # any existing directory: covering it is invisible outside this namespace
    mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    # The private /tmp first: an interpreter that lives under /tmp (a venv in a CI clone) is bound
    # read-only inside it below.
    os.makedirs(new + WORKDIR, mode=0o755)
    tmp_opts = (f"size={cfg['tmpfs_mb']}m,nr_inodes={cfg['tmpfs_inodes']},mode=0700,"
                f"uid={cfg['uid']},gid={cfg['gid']}")
    mount("tmpfs", new + WORKDIR, "tmpfs", MS_NOSUID | MS_NODEV, tmp_opts)
    for d, link, fd in held:
        target = new + d
        if link is not None:  # /bin -> usr/bin on merged-usr systems
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
            os.symlink(link, target)
            continue
        os.makedirs(target, mode=0o755, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
        mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(fd)
    os.makedirs(new + "/proc", mode=0o555)
    # A fresh procfs: with a pid namespace it shows only the sandbox's processes.
    mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    dev = new + "/dev"
    os.makedirs(dev, mode=0o755)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,nr_inodes=64,mode=0755")
    for name in DEVICES:
        if os.path.exists(f"/dev/{name}"):
            open(f"{dev}/{name}", "w").close()
            mount(f"/dev/{name}", f"{dev}/{name}", None, MS_BIND)
    for name, link in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                       ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(link, f"{dev}/{name}")
    os.makedirs(f"{dev}/shm", mode=0o755)  # POSIX shm: present but read-only and empty
    mount("tmpfs", f"{dev}/shm", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
          "size=4k,nr_inodes=16,mode=0755")
    mount(None, dev, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC, "size=64k,nr_inodes=64,mode=0755")
    if not _pivot_root(new):
        notes.append("pivot_root refused (initramfs root?): the sandbox chroots into its new root")
        os.chroot(new)
        os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    return notes


def limit_sysv_shm(cfg: dict) -> None:
    """SysV shared memory is per ipc namespace; its defaults allow the whole of RAM. Only called
    in a private ipc namespace: these sysctls would otherwise change the host's."""
    shm = cfg["shm_mb"] << 20
    for name, value in (("shmmax", shm), ("shmall", max(1, shm // os.sysconf("SC_PAGE_SIZE"))),
                        ("shmmni", 64)):
        with open(f"/proc/sys/kernel/{name}", "w") as f:
            f.write(str(value))


def join_cgroups(dirs: list) -> None:
    for d in dirs:
        with open(os.path.join(d, "cgroup.procs"), "w") as f:
            f.write("0")  # this process; its children are born inside


# ---------------------------------------------------------------- seccomp (x86_64)

AUDIT_ARCH_X86_64 = 0xC000003E
NS_CLONE_FLAGS = 0x7E020000  # CLONE_NEW{NS,CGROUP,UTS,IPC,USER,PID,NET}
# unshare, setns, bpf, perf_event_open, userfaultfd, keyctl, add_key, request_key, ptrace, mount,
# umount2, pivot_root, kexec_load, init_module, finit_module, io_uring_setup, open_by_handle_at
DENIED_SYSCALLS = (272, 308, 321, 298, 323, 250, 248, 249, 101, 165, 166, 155, 246, 175, 313, 425,
                   304)
SYS_CLONE, SYS_CLONE3 = 56, 435


def seccomp_program() -> list:
    """BPF: deny new namespaces (a user namespace would hand the sandbox 'root' powers inside it)
    and a few kernel-attack-surface syscalls; everything else is allowed."""
    ld, jeq, jset, jge, ret = 0x20, 0x15, 0x45, 0x35, 0x06
    allow, kill = 0x7FFF0000, 0x80000000
    eperm, enosys = 0x00050000 | 1, 0x00050000 | 38
    prog = [(ld, 0, 0, 4), ("arch",), (ld, 0, 0, 0), (jge, "EPERM", 0, 0x40000000),
            (jeq, "FLAGS", 0, SYS_CLONE), (jeq, "ENOSYS", 0, SYS_CLONE3)]
    prog += [(jeq, "EPERM", 0, nr) for nr in DENIED_SYSCALLS]
    prog += [(ret, 0, 0, allow), ("label", "FLAGS"), (ld, 0, 0, 16),
             (jset, "EPERM", 0, NS_CLONE_FLAGS), (ret, 0, 0, allow),
             ("label", "EPERM"), (ret, 0, 0, eperm), ("label", "ENOSYS"), (ret, 0, 0, enosys),
             ("label", "KILL"), (ret, 0, 0, kill)]
    prog[1] = (jeq, 0, "KILL", AUDIT_ARCH_X86_64)
    labels, out = {}, []
    for ins in prog:
        if ins[0] == "label":
            labels[ins[1]] = len(out)
        else:
            out.append(ins)
    resolved = []
    for pc, (code, jt, jf, k) in enumerate(out):
        jt = labels[jt] - pc - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - pc - 1 if isinstance(jf, str) else jf
        resolved.append((code, jt, jf, k))
    return resolved


def install_seccomp() -> bool:
    if os.uname().machine != "x86_64":
        return False

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                    ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    ins = seccomp_program()
    filters = (SockFilter * len(ins))(*[SockFilter(*i) for i in ins])
    prog = SockFprog(len(ins), filters)
    PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
    return _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) == 0


# ---------------------------------------------------------------- the kernel

class BoundedText(io.TextIOBase):
    """A text sink that keeps the first ``limit`` chars and counts the rest (memory bounded).

    ``buffer`` is its binary side (``sys.stdout.buffer.write(b"...")``): bytes are decoded as
    UTF-8 with bad bytes replaced and go into the same bounded text, in order.
    """

    def __init__(self, limit: int):
        self.limit, self.parts, self.kept, self.dropped = limit, [], 0, 0
        self.buffer = BoundedBytes(self)

    @property
    def encoding(self) -> str:
        return "utf-8"

    @property
    def errors(self) -> str:
        return "replace"

    def writable(self) -> bool:
        return True

    def write(self, s) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        return self._append(s)

    def _append(self, s: str) -> int:
        room = self.limit - self.kept
        if room > 0:
            self.parts.append(s[:room])
            self.kept += min(room, len(s))
        self.dropped += max(0, len(s) - max(room, 0))
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def getvalue(self) -> str:
        self.buffer.finish()
        text = "".join(self.parts)
        if self.dropped:
            text += f"\n[... truncated {self.dropped} chars]"
        return text


class BoundedBytes(io.RawIOBase):
    """The binary side of a ``BoundedText``: decodes only what can still be kept."""

    def __init__(self, text: BoundedText):
        self.text = text
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        data = memoryview(b).cast("B")
        n = len(data)
        # Decode at most 4 bytes per char of room left: a 1 GB write costs no 1 GB str. Bytes past
        # that are counted as dropped chars (exact for ASCII, an upper bound otherwise).
        room = max(0, self.text.limit - self.text.kept) * 4
        if room:
            self.text._append(self.decoder.decode(bytes(data[:room])))
        self.text.dropped += max(0, n - room)
        return n

    def finish(self) -> None:
        """A multi-byte sequence cut off at the end becomes one replacement char."""
        tail = self.decoder.decode(b"", final=True)
        if tail:
            self.text._append(tail)

    def flush(self) -> None:
        pass


class Kernel:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.ns = {"__name__": "__main__", "__builtins__": __builtins__}
        self.cell = 0
        self.images = []  # PNG base64 strings produced by the current call
        self.dropped_images = self.oversize_images = self.image_bytes = 0
        # numpy/PIL are pre-imported (a call must not pay for them); matplotlib is not: importing
        # pyplot costs ~0.45 s of CPU, which every worker of every episode would pay. The backend is
        # Agg via MPLBACKEND, and figures are captured after each cell (Jupyter-inline semantics).
        os.environ["MPLBACKEND"] = "Agg"
        warnings.filterwarnings("ignore", message=".*non-interactive.*")
        import numpy  # noqa: F401
        from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps  # noqa: F401
        self.Image = Image
        self._patched_plt = None

        def pil_show(im, *args, **kwargs):
            self.display(im)

        Image.Image.show = pil_show
        self.ns["display"] = self.display

    # -- images ------------------------------------------------------
    def add_png(self, data: bytes) -> None:
        if len(self.images) >= self.cfg["max_images"]:
            self.dropped_images += 1
            return
        b64 = base64.b64encode(data).decode()
        # The trainer treats a reply over max_reply_mb as a dead worker: keep room for the text
        # (up to 6 JSON bytes per char) and drop images that would not fit, with a note.
        budget = (self.cfg["max_reply_mb"] << 20) - 12 * self.cfg["max_output_chars"] - 65536
        if self.image_bytes + len(b64) > budget:
            self.oversize_images += 1
            return
        self.image_bytes += len(b64)
        self.images.append(b64)

    def add_pil(self, im) -> None:
        if len(self.images) >= self.cfg["max_images"]:
            self.dropped_images += 1
            return
        limit = self.cfg["max_image_pixels"]
        if im.width * im.height > limit:
            scale = (limit / (im.width * im.height)) ** 0.5
            im = im.resize((max(1, int(im.width * scale)), max(1, int(im.height * scale))))
        if im.mode not in ("RGB", "RGBA", "L", "LA", "P", "1"):
            im = im.convert("RGB")
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        self.add_png(buf.getvalue())

    def pyplot(self):
        """matplotlib.pyplot if the user's code imported it (with plt.show patched), else None."""
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None and self._patched_plt is not plt:
            def show(*args, **kwargs):  # Agg's show() is a no-op; notebook semantics instead
                self.show_figures()

            plt.show = show
            self._patched_plt = plt
        return plt

    def show_figures(self, *args, **kwargs) -> None:
        plt = self.pyplot()
        if plt is None:
            return
        for num in plt.get_fignums():
            fig = plt.figure(num)
            buf = io.BytesIO()
            fig.savefig(buf, format="png")
            self.add_png(buf.getvalue())
        plt.close("all")

    def display(self, *objs) -> None:
        for obj in objs:
            if isinstance(obj, self.Image.Image):
                self.add_pil(obj)
            elif type(obj).__name__ == "Figure" and hasattr(obj, "savefig"):
                buf = io.BytesIO()
                obj.savefig(buf, format="png")
                self.add_png(buf.getvalue())
                plt = self.pyplot()
                if plt is not None:
                    plt.close(obj)
            else:
                print(repr(obj))

    def load_images(self, images_b64: list) -> None:
        for i, b64 in enumerate(images_b64, start=1):
            im = self.Image.open(io.BytesIO(base64.b64decode(b64)))
            im.load()
            self.ns[f"image_{i}"] = im

    # -- execution -----------------------------------------------------
    def run(self, code: str) -> dict:
        self.cell += 1
        self.images, self.dropped_images, self.oversize_images, self.image_bytes = [], 0, 0, 0
        name = f"<cell {self.cell}>"
        out, err = BoundedText(self.cfg["max_output_chars"]), BoundedText(self.cfg["max_output_chars"])
        error = None
        saved = sys.stdout, sys.stderr, sys.stdin
        sys.stdout, sys.stderr, sys.stdin = out, err, io.StringIO()
        try:
            linecache.cache[name] = (len(code), None, code.splitlines(True), name)
            tree = ast.parse(code, name, "exec")
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            exec(compile(tree, name, "exec"), self.ns)
            if last is not None:
                value = eval(compile(ast.Expression(last.value), name, "eval"), self.ns)
                if value is not None:
                    self.display(value)
        except SyntaxError as e:
            error = f"SyntaxError: {e.msg} (line {e.lineno})"
            err.write("".join(traceback.format_exception_only(type(e), e)))
        except BaseException as e:  # noqa: BLE001 -- SystemExit/KeyboardInterrupt included, like Jupyter
            if os.getpid() != self.cfg["main_pid"]:
                os._exit(1)
            tb = e.__traceback__
            while tb is not None and tb.tb_frame.f_code.co_filename != name:
                tb = tb.tb_next  # drop the kernel's own frames
            err.write("".join(traceback.format_exception(type(e), e, tb)))
            error = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()[-1]
        finally:
            sys.stdout, sys.stderr, sys.stdin = saved
        if os.getpid() != self.cfg["main_pid"]:
            os._exit(0)  # a forked child must never touch the protocol channel
        reap_zombies()
        try:
            self.show_figures()  # Jupyter-inline semantics: figures left open are shown too
        except Exception as e:  # noqa: BLE001
            err.write(f"\n[could not render figure: {type(e).__name__}: {e}]")
        if self.dropped_images:
            err.write(f"\n[{self.dropped_images} more images not returned: limit is "
                      f"{self.cfg['max_images']} per call]")
        if self.oversize_images:
            err.write(f"\n[{self.oversize_images} images not returned: the reply would exceed "
                      f"{self.cfg['max_reply_mb']} MB]")
        return {"stdout": out.getvalue(), "stderr": err.getvalue(), "images": self.images,
                "error": error}


def _zombie_children() -> list:
    me, out = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] == b"Z" and int(fields[1]) == me:
                out.append(int(entry))
    return out


def reap_zombies() -> None:
    """Reap the exited children nobody will wait for: as pid 1 this process inherits every orphan
    of the sandbox, and each unreaped one holds a slot of the process limit for good.

    A child that a live ``Popen`` (subprocess, multiprocessing) still owns is left to it, so
    ``p.wait()`` in a later call gets the real exit status."""
    try:
        if os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            return  # no exited child: the common case costs one syscall
    except ChildProcessError:
        return
    zombies = _zombie_children()
    if not zombies:
        return
    owned = {o.pid for o in gc.get_objects()
             if type(o).__name__ == "Popen" and isinstance(getattr(o, "pid", None), int)
             and getattr(o, "returncode", 0) is None}
    for pid in zombies:
        if pid not in owned:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def report(cfg: dict, notes: list) -> dict:
    limits = {name: resource.getrlimit(getattr(resource, name))
              for name in ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_NPROC", "RLIMIT_NOFILE")}
    return {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
            "pid_in_namespace": os.getpid(), "seccomp": cfg.get("seccomp", False), "cwd": os.getcwd(), "rlimits": limits, "notes": notes,
            "interfaces": net_interfaces()}


def net_interfaces() -> list:
    """Interfaces of this process's network namespace (``/proc/self/net`` is per-namespace)."""
    try:
        with open("/proc/self/net/dev") as f:
            return sorted(line.split(":")[0].strip() for line in f.readlines()[2:])
    except OSError:
        return []


def parse_args(argv: list) -> dict:
    args = {"ns": [], "uid": None, "cgroups": []}
    i = 0
    while argv[i].startswith("--"):
        flag, value = argv[i], argv[i + 1]
        if flag == "--ns":
            args["ns"] = [n for n in value.split(",") if n]
        elif flag == "--uid-base":  # the sandbox's uid is uid_base + the launcher's pid
            args["uid"] = int(value) + os.getpid()
        elif flag == "--cgroup":
            args["cgroups"].append(value)
        i += 2
    args["lifeline"], args["fd_in"], args["fd_out"] = (int(v) for v in argv[i:i + 3])
    return args


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError:
        pass


def _real_uid(pid: int):
    """The real uid from /proc/PID/status: not the owner of /proc/PID, which a process that
    makes itself non-dumpable turns into root."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            data = f.read()
        return int(data[data.index(b"\nUid:") + 5:].split(None, 1)[0])
    except (OSError, ValueError):
        return None


def _stragglers(args: dict) -> set:
    pids = set()
    for d in args["cgroups"]:
        try:
            with open(os.path.join(d, "cgroup.procs")) as f:
                pids.update(int(p) for p in f.read().split())
        except (OSError, ValueError):
            pass
    if args["uid"] is not None:
        pids.update(int(e) for e in os.listdir("/proc")
                    if e.isdigit() and _real_uid(int(e)) == args["uid"])
    pids.discard(os.getpid())
    return pids


def _is_straggler(args: dict, pid: int) -> bool:
    if args["uid"] is not None:
        return _real_uid(pid) == args["uid"]
    return pid in _stragglers(args)


def _kill_stragglers(args: dict) -> None:
    """Without a pid namespace, killing the kernel leaves its children: kill what is left in the
    sandbox's cgroups, and (with a uid drop) every process of the sandbox's unique uid. Each pid
    is pinned by a pidfd and checked again before the kill: a pid can be reused between a scan
    and a signal, and this process is root."""
    for _ in range(50):
        pids = _stragglers(args)
        if not pids:
            return
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if _is_straggler(args, pid):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(fd)
        time.sleep(0.01)


def launch(args: dict) -> None:
    """The launcher: fork the kernel into a new pid namespace, then wait for it or for the
    trainer's end of the lifeline to close, whichever comes first."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if "pid" in args["ns"] and _libc.unshare(CLONE_NEWPID) != 0:
        err = ctypes.get_errno()
        sys.stderr.write(f"sandbox launcher: unshare(CLONE_NEWPID): {os.strerror(err)}\n")
        os._exit(125)
    me = os.getpid()
    child = os.fork()
    if child == 0:
        # The kernel. Dies with the launcher (which is single-threaded, so the parent-death
        # signal cannot fire early because a thread ended).
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() not in (me, 0):  # 0: the parent is outside our new pid namespace
            os._exit(1)  # the launcher died before the parent-death signal was armed
        os.close(args["lifeline"])
        kernel_main(args)
        os._exit(0)
    os.close(args["fd_in"])
    os.close(args["fd_out"])
    pidfd = os.pidfd_open(child)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(args["lifeline"], select.POLLIN | select.POLLHUP | select.POLLERR)
    while True:
        ready = dict(poller.poll())
        if pidfd in ready:
            break
        if args["lifeline"] in ready:
            # The trainer is gone (or dropped this sandbox). A frozen cgroup is thawed first: a
            # v1-frozen task does not die until it runs again.
            for d in args["cgroups"]:
                _write(os.path.join(d, "freezer.state"), "THAWED")
                _write(os.path.join(d, "cgroup.freeze"), "0")
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            break  # its status is reported as usual: it may have exited on its own just before
    _, status = os.waitpid(child, 0)
    if "pid" not in args["ns"]:
        _kill_stragglers(args)
    if os.WIFSIGNALED(status):
        # Report the kernel's death as our own, so the trainer can name the signal.
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


def kernel_main(args: dict) -> None:
    fd_in, fd_out = args["fd_in"], args["fd_out"]
    # Move the protocol channel to fixed low descriptors (3, 4): its numbers then do not depend on how
    # many files the trainer happened to have open, and a cell that scribbles on descriptors is caught
    # by the frame checks in the trainer the same way every time.
    for want, fd in ((3, fd_in), (4, fd_out)):
        if fd != want:
            if want in (fd_in, fd_out):  # the other end sits on the slot we want: move it out of the way first
                other = os.dup(want)
                fd_in, fd_out = (other if fd_in == want else fd_in), (other if fd_out == want else fd_out)
                fd = fd_in if want == 3 else fd_out
            os.dup2(fd, want)
            os.close(fd)
            if want == 3:
                fd_in = 3
            else:
                fd_out = 4
    cfg = recv(fd_in)
    notes = []
    try:
        # First, before anything can allocate: into the cgroup, whose limits then cover every
        # process this one starts.
        join_cgroups(cfg["cgroups"])
        flags = 0
        for name in args["ns"]:
            flags |= NS_FLAGS[name] if name != "pid" else 0
        if flags and _libc.unshare(flags) != 0:
            raise OSError(ctypes.get_errno(), f"unshare({','.join(args['ns'])})")
        host_pid = int(os.readlink("/proc/self"))  # host procfs still mounted: this is the host pid
        if cfg["mount_ns"]:
            notes += setup_mounts(cfg)
            workdir = WORKDIR
        else:
            workdir = cfg["workdir"]
            if cfg["drop_uid"]:
                os.chown(workdir, cfg["uid"], cfg["gid"])
                os.chmod(workdir, 0o700)
        if cfg["ipc_ns"]:
            try:  # after the new /proc is mounted: a container may mount the host's /proc/sys read-only
                limit_sysv_shm(cfg)
            except OSError as e:
                notes.append(f"SysV shared memory not limited: {e}")
        # First in line for the kernel's OOM killer, before the trainer: shared memory and page
        # cache the sandbox holds do not show in its processes' sizes. Inherited; it cannot be
        # lowered again without privileges.
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")
        except OSError as e:
            notes.append(f"oom_score_adj not raised: {e}")
        os.environ.clear()
        os.environ.update({"HOME": workdir, "TMPDIR": workdir, "PATH": "/usr/local/bin:/usr/bin:/bin",
                           "LANG": "C.UTF-8", "MPLBACKEND": "Agg", "OPENBLAS_NUM_THREADS": "1",
                           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                           "MPLCONFIGDIR": os.path.join(workdir, ".matplotlib")})
        for mod in PRELOAD_STDLIB:
            try:
                __import__(mod)
            except ImportError:
                pass
        cfg["main_pid"] = os.getpid()
        kernel = Kernel(cfg)
        if cfg["drop_uid"]:
            for dirpath, dirnames, filenames in os.walk(workdir):
                # read-only binds of the interpreter's own directories (see setup_mounts) stay root's
                dirnames[:] = [d for d in dirnames if not os.path.ismount(os.path.join(dirpath, d))]
                for n in dirnames + filenames:
                    os.lchown(os.path.join(dirpath, n), cfg["uid"], cfg["gid"])
        # Writing past RLIMIT_FSIZE should raise OSError(EFBIG) in user code, not kill the kernel.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        for name, value in (("RLIMIT_CPU", cfg["cpu_s"]), ("RLIMIT_AS", cfg["memory_mb"] << 20),
                            ("RLIMIT_FSIZE", cfg["file_size_mb"] << 20),
                            ("RLIMIT_NOFILE", cfg["max_open_files"]),
                            ("RLIMIT_NPROC", cfg["max_processes"])):
            resource.setrlimit(getattr(resource, name), (value, value))
        if cfg["drop_uid"]:
            os.setgroups([])
            os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
            os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            notes.append("prctl(PR_SET_NO_NEW_PRIVS) failed")
        cfg["seccomp"] = install_seccomp()
        if not cfg["seccomp"]:
            notes.append("seccomp filter not installed (needs x86_64 Linux)")
        os.chdir(workdir)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        send(fd_out, {"op": "ready", "host_pid": host_pid, "report": report(cfg, notes)})
    except BaseException as e:  # noqa: BLE001
        send(fd_out, {"op": "fatal", "error": f"sandbox setup failed: {type(e).__name__}: {e}"})
        os._exit(3)

    while True:
        try:
            req = recv(fd_in)
        except (EOFError, OSError, ValueError):
            os._exit(0)
        op = req.get("op")
        if op == "run":
            resp = kernel.run(req["code"])
        elif op == "load_images":
            try:
                kernel.load_images(req["images"])
                resp = {"ok": True}
            except Exception as e:  # noqa: BLE001
                resp = {"ok": False, "error": f"could not load input images: {type(e).__name__}: {e}"}
        elif op == "report":
            resp = report(cfg, notes)
        else:
            resp = {"error": f"unknown op {op!r}"}
        resp["seq"] = req.get("seq")
        try:
            send(fd_out, resp)
        except OSError:
            os._exit(0)


if __name__ == "__main__":
    launch(parse_args(sys.argv[1:]))
