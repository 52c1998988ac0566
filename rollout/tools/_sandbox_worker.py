"""Sandbox worker: a notebook-like Python kernel run in its own process (and namespaces).

Started by ``sandbox.py`` as ``python -I _sandbox_worker.py FD_IN FD_OUT``, usually under
``unshare --fork --pid --net --mount --ipc --uts`` so that this process is pid 1 of a fresh pid
namespace. It runs as root only long enough to set itself up:

1. read its config frame (uid, limits, which namespaces it is in);
2. in a private mount namespace: mount a fresh /proc, a size-limited private tmpfs on /tmp (the
   working directory), read-only empty tmpfs over the other world-writable dirs, and a tmpfs over
   each non-traversable ancestor of the interpreter (e.g. /root, mode 700) with the interpreter's
   prefix bound back read-only -- so the unprivileged user can still import the stdlib while the
   rest of /root stays invisible;
3. pre-import numpy / PIL so a call costs milliseconds (matplotlib, Agg, on first use);
4. set rlimits, drop to the unprivileged uid/gid (setgroups([])), set no_new_privs, chdir;
5. send a ``ready`` frame and serve requests.

Stand-alone on purpose (stdlib + numpy/PIL/matplotlib only): it runs as a script, not as part of
the package. Frames are a 4-byte big-endian length + UTF-8 JSON; images travel as base64 PNG.
The trainer never unpickles anything from here: JSON only.
"""

import ast
import base64
import codecs
import ctypes
import io
import json
import linecache
import os
import resource
import signal
import stat
import struct
import sys
import traceback
import warnings

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_NO_NEW_PRIVS = 38
WORLD_WRITABLE_DIRS = ("/var/tmp", "/run/lock", "/dev/shm", "/dev/mqueue")
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


def hidden_ancestor(path: str):
    """Topmost ancestor of ``path`` that others cannot traverse (no o+x), or None."""
    parts = os.path.abspath(path).split("/")[1:]
    cur = ""
    for part in parts:
        cur += "/" + part
        try:
            if not os.stat(cur).st_mode & stat.S_IXOTH:
                return cur
        except OSError:
            return None
    return None


def setup_mounts(cfg: dict) -> list:
    """Returns notes on what could not be done (best effort beyond /tmp and /proc)."""
    notes = []
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    if cfg["pid_ns"]:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    # Paths the unprivileged interpreter must read, collected BEFORE /tmp is covered.
    needed = sorted({p for p in [sys.base_prefix, sys.prefix, os.path.dirname(__file__), *sys.path]
                     if p and os.path.isdir(p) and hidden_ancestor(p)})
    # Keep the outermost needed dirs only (binding a parent brings its children).
    needed = [p for p in needed if not any(p != q and p.startswith(q + "/") for q in needed)]
    # The interpreter may itself live under the directory the private tmpfs covers (a venv in a clone
    # under /tmp, as CI makes): hold those directories by O_PATH descriptors now, rebind them after.
    covered = sorted({os.path.abspath(p) for p in [sys.base_prefix, sys.prefix, os.path.dirname(__file__), *sys.path]
                      if p and os.path.isdir(p) and os.path.abspath(p).startswith(WORKDIR + "/")})
    covered = [p for p in covered if not any(p != q and p.startswith(q + "/") for q in covered)]
    held = [(p, os.open(p, os.O_PATH | os.O_DIRECTORY)) for p in covered]
    tmp_opts = f"size={cfg['tmpfs_mb']}m,mode=0700,uid={cfg['uid']},gid={cfg['gid']}"
    mount("tmpfs", WORKDIR, "tmpfs", MS_NOSUID | MS_NODEV, tmp_opts)
    for p, fd in held:
        os.makedirs(p, mode=0o755, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
        mount(None, p, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(fd)
    stages = []
    for i, p in enumerate(needed):
        stage = f"{WORKDIR}/.stage{i}"
        os.mkdir(stage)
        mount(p, stage, None, MS_BIND | MS_REC)
        stages.append((p, stage))
    for root in sorted({hidden_ancestor(p) for p in needed}):
        mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for p, stage in stages:
        os.makedirs(p, exist_ok=True)
        mount(stage, p, None, MS_BIND | MS_REC)
        mount(None, p, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        umount(stage)
        os.rmdir(stage)
    for d in WORLD_WRITABLE_DIRS:
        try:
            if os.path.isdir(d) and not os.path.islink(d):
                mount("tmpfs", d, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                      "size=4k,mode=0755")
        except OSError as e:
            notes.append(str(e))
    return notes


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


def main() -> None:
    fd_in, fd_out = int(sys.argv[1]), int(sys.argv[2])
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
        host_pid = int(os.readlink("/proc/self"))  # host procfs still mounted: this is the host pid
        if cfg["mount_ns"]:
            notes += setup_mounts(cfg)
            workdir = WORKDIR
        else:
            workdir = cfg["workdir"]
            if cfg["drop_uid"]:
                os.chown(workdir, cfg["uid"], cfg["gid"])
                os.chmod(workdir, 0o700)
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
    main()
