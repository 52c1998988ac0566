"""An isolated, stateful Python sandbox: one worker process per episode, warm pool, hard limits.

Each ``Session`` (one per episode) runs code in its own worker process (``_sandbox_worker.py``),
a notebook-like kernel with a persistent namespace and the episode's input images preloaded as
``image_1``, ``image_2``, ... Code output comes back as::

    Code execution result:
    stdout:
    <stdout, at most max_output_chars, then "[... truncated N chars]">
    stderr:
    <stderr, same budget; tracebacks and sandbox notes go here>

(see ``format_code_result``), plus the images the code showed: ``plt.show()`` / figures left
open, ``display(img)``, ``img.show()`` or a PIL image as the value of the last expression -- at
most ``max_images`` per call.

Isolation, strongest available (``detect_isolation`` / ``detect_cgroups``; a ``warnings.warn``
names what is missing):
- a launcher process (``_sandbox_worker.py``) forks the worker into new pid, network, mount, ipc
  and uts namespaces: the worker is pid 1 of its namespace (the trainer is invisible,
  ``kill(-1)`` reaches only the sandbox, killing the worker tears down every process it
  started, and it reaps the zombies code leaves after each call), and it has no network (not
  even to the trainer's 127.0.0.1). The launcher holds a lifeline pipe whose other end only the
  trainer holds: when the trainer dies, even by SIGKILL, the sandbox dies with it;
- a new root filesystem with only what code needs: the system directories and the interpreter's
  prefixes and site-packages, read-only; a fresh /proc and a minimal /dev; a private size- and
  inode-limited tmpfs on /tmp as the working directory (HOME, TMPDIR). The trainer's checkout,
  data, checkpoints and home directories are not in it;
- its own cgroup (v2, or v1 hierarchies where v2 lacks the controllers): ``memory.max`` for the
  whole sandbox (shared memory, memfd and tmpfs pages included), ``pids.max``, ``cpu.max``; the
  cgroup is frozen between calls (without a freezer, every process of the sandbox gets SIGSTOP),
  so nothing the code left running takes CPU while the policy generates;
- SysV shared memory limited in its ipc namespace; oom_score_adj 1000 (the kernel's OOM killer
  takes a sandbox before the trainer);
- a unique unprivileged uid/gid per worker (``uid_base + pid``, no supplementary groups, no
  new privileges), so RLIMIT_NPROC -- which counts per uid -- bounds each sandbox on its own
  and sandboxes cannot signal or read each other; a seccomp filter (no new namespaces, no
  ptrace, mount, bpf, ...);
- RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_NOFILE; a minimal environment (no
  trainer env var reaches the worker).
A call that exceeds ``timeout_s`` kills the worker's whole namespace (via a pidfd, immune to pid
reuse) and the session transparently starts a fresh worker on its next call, saying the state
was lost. Nothing from the worker is trusted: frames are JSON (never unpickled), capped at
``max_reply_mb`` before they are read, and every limit the worker applies (output chars, images,
image size) is applied again here, since the code can rewrite the worker's memory; a reply that
breaks the protocol is a dead worker, replaced like a crashed one.
"""

from __future__ import annotations

import atexit
import base64
import collections
import functools
import io
import itertools
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from ._sandbox_worker import _real_uid  # one reading of /proc/PID/status for both sides (stdlib only)
from .base import ToolResult
from ..protocol import OURS

WORKER_SCRIPT = str(Path(__file__).with_name("_sandbox_worker.py"))
# A conforming worker's caps (output chars, images) can exceed their limits by at most a
# truncation note; the trainer re-applies the caps past this slack (see _cap_text).
NOTE_SLACK = 100


@dataclass(frozen=True)
class SandboxLimits:
    """Per-worker limits. Sizes in MiB; ``max_output_chars`` applies to stdout and stderr each."""

    timeout_s: float = 30.0          # wall clock per call; over it the worker is killed
    cpu_s: int = 600                 # RLIMIT_CPU, per process over the worker's life
    memory_mb: int = 2048            # RLIMIT_AS per process, and memory.max of the sandbox's cgroup
    file_size_mb: int = 64           # RLIMIT_FSIZE
    tmpfs_mb: int = 256              # size of the private /tmp (working directory)
    max_processes: int = 64          # RLIMIT_NPROC and pids.max (processes + threads of the sandbox)
    max_open_files: int = 256        # RLIMIT_NOFILE
    max_output_chars: int = 8000
    max_images: int = 10
    max_image_pixels: int = 4096 * 4096
    max_reply_mb: int = 8            # a reply frame over this is a dead worker (never allocated)
    tmpfs_inodes: int = 16384        # files + dirs on the private /tmp (inodes are kernel memory)
    shm_mb: int = 64                 # SysV shared memory in the sandbox's ipc namespace
    cpu_cores: float = 1.0           # cpu.max of the sandbox's cgroup: CPUs it may use at once
    startup_timeout_s: float = 60.0
    uid_base: int = 1_000_000        # worker uid = gid = uid_base + pid of its launcher

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be a positive number, got {value!r}")


class SandboxError(RuntimeError):
    """The sandbox could not be started or talked to (not an error in the user's code)."""


class WorkerDied(SandboxError):
    pass


class WorkerTimeout(SandboxError):
    pass


class ProtocolError(WorkerDied):
    """The worker's reply broke the frame protocol (the code can write to the channel)."""


# ---------------------------------------------------------------- isolation detection

@dataclass(frozen=True)
class Isolation:
    """Which isolation mechanisms work on this machine (probed once per process)."""

    drop_uid: bool
    pid_ns: bool
    net_ns: bool
    mount_ns: bool
    ipc_ns: bool
    uts_ns: bool
    unshare: str | None

    def missing(self) -> list[str]:
        names = {"drop_uid": "uid drop (not root)", "pid_ns": "pid namespace",
                 "net_ns": "network namespace", "mount_ns": "mount namespace",
                 "ipc_ns": "ipc namespace", "uts_ns": "uts namespace"}
        return [text for key, text in names.items() if not getattr(self, key)]

    def namespaces(self) -> list[str]:
        return [name for ok, name in ((self.pid_ns, "pid"), (self.net_ns, "net"),
                                      (self.mount_ns, "mount"), (self.ipc_ns, "ipc"),
                                      (self.uts_ns, "uts")) if ok]

    def launcher(self) -> list[str]:
        """argv prefix of the worker's launcher (see ``_sandbox_worker.py``), which creates the
        namespaces (the ``unshare`` binary is only used to probe them)."""
        ns = self.namespaces()
        return [sys.executable, "-I", WORKER_SCRIPT, *(["--ns", ",".join(ns)] if ns else [])]


_MOUNT_PROBE = (
    "import ctypes,sys;l=ctypes.CDLL(None,use_errno=True);"
    "sys.exit(0 if l.mount(None,b'/',None,16384|(1<<18),None)==0 and "
    "l.mount(b'tmpfs',b'/tmp',b'tmpfs',6,b'size=1m')==0 else 1)"
)


def _probe(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=30, env=_minimal_env(),
                              start_new_session=True).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@functools.lru_cache(maxsize=1)
def detect_isolation() -> Isolation:
    """Probe which namespaces ``unshare`` can create here (cached: the machine does not change)."""
    drop_uid = os.geteuid() == 0
    unshare = shutil.which("unshare")
    if unshare is None:
        return Isolation(drop_uid, False, False, False, False, False, None)
    py = [sys.executable, "-I", "-c"]
    full = [unshare, "--fork", "--kill-child", "--pid", "--net", "--mount", "--ipc", "--uts", "--"]
    if _probe(full + py + [_MOUNT_PROBE]):
        return Isolation(drop_uid, True, True, True, True, True, unshare)
    ok = {
        "pid_ns": _probe([unshare, "--fork", "--kill-child", "--pid", "--", "true"]),
        "net_ns": _probe([unshare, "--net", "--", "true"]),
        "mount_ns": _probe([unshare, "--mount", "--"] + py + [_MOUNT_PROBE]),
        "ipc_ns": _probe([unshare, "--ipc", "--", "true"]),
        "uts_ns": _probe([unshare, "--uts", "--", "true"]),
    }
    return Isolation(drop_uid=drop_uid, unshare=unshare, **ok)


def _unreadable_prefix() -> str | None:
    """The first ancestor of the interpreter prefix that other users cannot traverse, if any."""
    cur = ""
    for part in Path(sys.base_prefix).resolve().parts[1:]:
        cur += "/" + part
        try:
            if not os.stat(cur).st_mode & 0o001:
                return cur
        except OSError:
            return None
    return None


def _warn_if_weak(isolation: Isolation) -> None:
    cgroups = detect_cgroups()
    if isinstance(cgroups, str) and not _CGROUP_WARNED:
        _CGROUP_WARNED.append(True)
        warnings.warn("Python sandbox runs without whole-sandbox cgroup limits (" + cgroups + "): "
                      "memory, processes and CPU are bounded per process (rlimits) and per uid only; "
                      "memfd, shared memory and extra processes can take more, and idle sandboxes "
                      "are stopped with SIGSTOP instead of frozen", RuntimeWarning, stacklevel=3)
    missing = isolation.missing()
    if missing:
        hidden = _unreadable_prefix()
        extra = (f"; without a mount namespace the sandbox uid cannot read {hidden} (the "
                 "interpreter's prefix), so only the pre-imported modules are importable"
                 if hidden and isolation.drop_uid and not isolation.mount_ns else "")
        warnings.warn("Python sandbox runs with weaker isolation than intended; missing: "
                      + ", ".join(missing) + extra, RuntimeWarning, stacklevel=3)


_CGROUP_WARNED: list[bool] = []  # once per process: the machine does not change


def _minimal_env() -> dict[str, str]:
    # Nothing from the trainer's environment: no tokens, no paths, no CUDA settings.
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "MPLBACKEND": "Agg",
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ---------------------------------------------------------------- cgroups (whole-sandbox limits)

CGROUP_PREFIX = "deepeyesv2-"
CGROUP_CONTROLLERS = ("memory", "pids", "cpu")


@dataclass(frozen=True)
class Cgroups:
    """Where this trainer's sandbox cgroups are made: cgroup v2 (one directory with the memory,
    pids and cpu controllers) or v1 (one directory per controller hierarchy)."""

    version: int
    parents: tuple[str, ...]  # this trainer's group in each hierarchy (v2: exactly one)
    controllers: tuple[str, ...]
    freezer: bool             # v2 cgroup.freeze, or a v1 freezer hierarchy among ``parents``

    def describe(self) -> str:
        return f"v{self.version} ({', '.join(self.controllers + (('freezer',) if self.freezer else ()))})"


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _own_cgroup_dirs() -> tuple[dict[str, str], str | None]:
    """Directories of this process's cgroups: ({v1 controller: dir}, v2 dir or None)."""
    mounts = []  # (root inside the hierarchy, mount point, fstype, super options)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields, tail = pre.split(), post.split()
            if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
                mounts.append((fields[3], fields[4], tail[0], set(tail[2].split(","))))
    v1, v2 = {}, None
    with open("/proc/self/cgroup") as f:
        for line in f:
            hid, names, path = line.rstrip("\n").split(":", 2)
            for root, point, fstype, opts in mounts:
                if not (path == root or path.startswith(root.rstrip("/") + "/")):
                    continue
                where = os.path.join(point, path[len(root.rstrip("/")):].lstrip("/"))
                if hid == "0" and fstype == "cgroup2":
                    v2 = where
                elif fstype == "cgroup":
                    for name in names.split(","):
                        if name in opts:
                            v1.setdefault(name, where)
    return v1, v2


def _remove_stale_groups(parent_dirs: list[str]) -> None:
    """Groups of trainers that died (kill -9) stay behind empty; remove them."""
    for d in parent_dirs:
        try:
            entries = os.listdir(d)
        except OSError:
            continue
        for name in entries:
            parts = name[len(CGROUP_PREFIX):].split("-") if name.startswith(CGROUP_PREFIX) else []
            if len(parts) != 2 or not parts[0].isdigit() or _start_time(int(parts[0])) == parts[1]:
                continue
            group = os.path.join(d, name)
            for child in (os.listdir(group) if os.path.isdir(group) else []):
                if os.path.isdir(os.path.join(group, child)):
                    _rmdir_quiet(os.path.join(group, child))
            _rmdir_quiet(group)


def _rmdir_quiet(path: str) -> bool:
    try:
        os.rmdir(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _cgroup_v2(where: str, group: str) -> Cgroups | str:
    try:
        with open(os.path.join(where, "cgroup.controllers")) as f:
            have = set(f.read().split())
        missing = [c for c in CGROUP_CONTROLLERS if c not in have]
        if missing:
            return f"cgroup v2 at {where} lacks the {', '.join(missing)} controller(s)"
        with open(os.path.join(where, "cgroup.subtree_control")) as f:
            enabled = set(f.read().split())
        if not set(CGROUP_CONTROLLERS) <= enabled:
            try:
                with open(os.path.join(where, "cgroup.subtree_control"), "w") as f:
                    f.write(" ".join(f"+{c}" for c in CGROUP_CONTROLLERS))
            except OSError as e:
                return (f"cannot enable controllers below the trainer's cgroup v2 {where} ({e.strerror}; "
                        "v2 delegates only to a cgroup without processes: start the trainer in a leaf "
                        "cgroup of its own, e.g. systemd-run --scope -p Delegate=yes)")
        path = os.path.join(where, group)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "cgroup.subtree_control"), "w") as f:
            f.write(" ".join(f"+{c}" for c in CGROUP_CONTROLLERS))
        return Cgroups(2, (path,), CGROUP_CONTROLLERS, os.path.exists(os.path.join(path, "cgroup.freeze")))
    except OSError as e:
        return f"cgroup v2 at {where} is not writable ({e.strerror})"


def _cgroup_v1(dirs: dict[str, str], group: str) -> Cgroups | str:
    want = [c for c in (*CGROUP_CONTROLLERS, "freezer") if c in dirs]
    missing = [c for c in ("memory", "pids") if c not in dirs]
    if missing:
        return f"no cgroup v1 {' or '.join(missing)} hierarchy mounted"
    paths = []
    try:
        for c in want:
            path = os.path.join(dirs[c], group)
            os.makedirs(path, exist_ok=True)
            paths.append(path)
    except OSError as e:
        for path in paths:
            _rmdir_quiet(path)
        return f"cgroup v1 at {dirs[c]} is not writable ({e.strerror})"
    return Cgroups(1, tuple(paths), tuple(c for c in want if c != "freezer"), "freezer" in want)


@functools.lru_cache(maxsize=1)
def detect_cgroups() -> Cgroups | str:
    """This trainer's parent cgroup for its sandboxes, or why there is none (probed once).

    Each sandbox then gets a child group with ``memory.max`` (which counts shared memory, memfd
    and tmpfs pages too), ``pids.max`` and ``cpu.max``; see ``_SandboxCgroup``."""
    if sys.platform != "linux":
        return "not Linux"
    try:
        v1, v2 = _own_cgroup_dirs()
    except OSError as e:
        return f"cannot read this process's cgroups ({e.strerror})"
    group = f"{CGROUP_PREFIX}{os.getpid()}-{_start_time(os.getpid())}"
    _remove_stale_groups([d for d in [v2, *v1.values()] if d])
    reasons = []
    for attempt in ((lambda: _cgroup_v2(v2, group)) if v2 else None,
                    (lambda: _cgroup_v1(v1, group)) if v1 else None):
        if attempt is None:
            continue
        got = attempt()
        if isinstance(got, Cgroups):
            atexit.register(_remove_groups, got)
            return got
        reasons.append(got)
    return "; ".join(reasons) or "no cgroup hierarchy mounted"


def _remove_groups(cg: Cgroups) -> None:
    for parent in cg.parents:
        _rmdir_quiet(parent)


class _SandboxCgroup:
    """One sandbox's cgroup(s), limited from the trainer's side before the worker joins them."""

    _ids = itertools.count()

    def __init__(self, cg: Cgroups, limits: SandboxLimits):
        self.cg = cg
        name = f"sb-{next(self._ids)}"
        self.dirs = [os.path.join(p, name) for p in cg.parents]
        memory, quota = limits.memory_mb << 20, int(limits.cpu_cores * 100_000)
        if cg.version == 2:
            settings = [("memory.max", memory), ("memory.swap.max", 0), ("memory.oom.group", 1),
                        ("pids.max", limits.max_processes), ("cpu.max", f"{quota} 100000")]
        else:
            settings = [("memory.limit_in_bytes", memory), ("memory.memsw.limit_in_bytes", memory),
                        ("pids.max", limits.max_processes), ("cpu.cfs_period_us", 100_000),
                        ("cpu.cfs_quota_us", quota)]
        try:
            for parent, d in zip(cg.parents, self.dirs):
                if not os.path.isdir(parent):
                    # Removed under us (another trainer took it for a dead one's): make it again.
                    os.makedirs(parent, exist_ok=True)
                    if cg.version == 2:
                        with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
                            f.write(" ".join(f"+{c}" for c in CGROUP_CONTROLLERS))
                os.mkdir(d)
            for name, value in settings:
                paths = [os.path.join(d, name) for d in self.dirs if os.path.exists(os.path.join(d, name))]
                # swap files exist only with swap accounting; cpu is optional in v1
                optional = name.startswith(("memory.swap", "memory.memsw")) or (
                    name.startswith("cpu.") and "cpu" not in cg.controllers)
                if not paths and not optional:
                    raise OSError(f"no {name} in {self.dirs}")
                for path in paths:
                    with open(path, "w") as f:
                        f.write(str(value))
        except OSError as e:
            self.remove()
            raise SandboxError(f"could not set up the sandbox's cgroup: {e}") from None
        self._freeze_file, self._freeze_values = None, None
        if cg.freezer:
            for d in self.dirs:
                if cg.version == 2:
                    self._freeze_file, self._freeze_values = os.path.join(d, "cgroup.freeze"), ("1", "0")
                elif os.path.exists(os.path.join(d, "freezer.state")):
                    self._freeze_file, self._freeze_values = os.path.join(d, "freezer.state"), ("FROZEN", "THAWED")

    @property
    def can_freeze(self) -> bool:
        return self._freeze_file is not None

    def set_frozen(self, frozen: bool) -> None:
        with open(self._freeze_file, "w") as f:
            f.write(self._freeze_values[0 if frozen else 1])

    def pids(self) -> set[int]:
        out = set()
        for d in self.dirs:
            try:
                with open(os.path.join(d, "cgroup.procs")) as f:
                    out.update(int(p) for p in f.read().split())
            except (OSError, ValueError):
                pass
        return out

    def oom_kills(self) -> int:
        """How many processes the kernel killed for this group's memory limit."""
        for d in self.dirs:
            for name in ("memory.events", "memory.oom_control"):  # v2, v1
                try:
                    with open(os.path.join(d, name)) as f:
                        for line in f:
                            if line.startswith("oom_kill "):
                                return int(line.split()[1])
                except (OSError, ValueError):
                    pass
        return 0

    def remove(self) -> None:
        """rmdir once the processes are gone (their exit is asynchronous; retry for a while)."""
        for d in self.dirs:
            for _ in range(200):
                if _rmdir_quiet(d) or not os.path.exists(d):
                    break
                time.sleep(0.01)


# ---------------------------------------------------------------- one worker process

def _wait_fd(fd: int, event: int, left: float) -> bool:
    """poll(), not select(): select() fails once a busy trainer holds more than 1024 descriptors."""
    poller = select.poll()
    poller.register(fd, event)
    return bool(poller.poll(max(0.0, left) * 1000))


def _read_frame(fd: int, deadline: float, max_bytes: int) -> dict:
    """One reply frame. Everything in it is untrusted: a frame over ``max_bytes`` is refused
    before any of its body is read, and any parse failure is a ``ProtocolError``."""
    def read_exact(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not _wait_fd(fd, select.POLLIN, left):
                raise WorkerTimeout("no reply before the deadline")
            chunk = os.read(fd, min(n - len(buf), 1 << 20))
            if not chunk:
                raise WorkerDied("the worker closed its channel")
            buf += chunk
        return bytes(buf)

    (n,) = struct.unpack(">I", read_exact(4))
    if n > max_bytes:
        raise ProtocolError(f"a reply frame of {n} bytes, over the {max_bytes}-byte cap")
    body = read_exact(n)  # grows chunk by chunk: n is what the worker claims, not what it sent
    try:
        msg = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 / JSON, huge ints, deep nesting
        raise ProtocolError(f"a malformed reply frame ({type(e).__name__})") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"a reply frame that is a {type(msg).__name__}, not an object")
    return msg


def _write_frame(fd: int, msg: dict, deadline: float) -> None:
    data = json.dumps(msg).encode()
    view = memoryview(struct.pack(">I", len(data)) + data)
    while view:
        left = deadline - time.monotonic()
        if left <= 0 or not _wait_fd(fd, select.POLLOUT, left):
            raise WorkerTimeout("the worker did not read its input before the deadline")
        try:
            view = view[os.write(fd, view[:65536]):]
        except (BrokenPipeError, OSError) as e:
            raise WorkerDied(f"the worker's input channel is closed ({e})") from None


def _uid_processes(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is ``uid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
                if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith(
                        ("Z", "X")):
                    pids.append(int(entry))
            except (OSError, ValueError, KeyError):
                pass
    return pids


def _pid_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _ns_pids(ns: str) -> list[int]:
    """Processes in pid namespace ``ns`` (one readlink per host process)."""
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and _pid_ns(int(e)) == ns]


def _uid_pids(uid: int) -> list[int]:
    """Processes (zombies included) whose real uid is ``uid``; cheap enough to run around every
    call where there is no cgroup to freeze."""
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and _real_uid(int(e)) == uid]


class _Worker:
    """One started sandbox worker. Not thread-safe: a Session serialises its calls."""

    def __init__(self, limits: SandboxLimits, isolation: Isolation, warm: bool):
        self.limits, self.isolation, self.warm = limits, isolation, warm
        self.pidfd: int | None = None
        self.host_pid: int | None = None
        self.ns: str | None = None
        self.dead = False
        self.paused = False
        self.oom_killed = False
        cgroups = detect_cgroups()
        self.cgroup = _SandboxCgroup(cgroups, limits) if isinstance(cgroups, Cgroups) else None
        self.workdir = None if isolation.mount_ns else tempfile.mkdtemp(prefix="deepeyesv2-sandbox-")
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        # The lifeline: the launcher kills the sandbox when this write end closes -- when the
        # trainer dies, however it dies. Never written to; not inherited by any other child.
        life_r, self.fd_life = os.pipe()
        argv = [*isolation.launcher(),
                *(["--uid-base", str(limits.uid_base)] if isolation.drop_uid else []),
                *[a for d in (self.cgroup.dirs if self.cgroup else []) for a in ("--cgroup", d)],
                str(life_r), str(req_r), str(resp_w)]
        try:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                pass_fds=(life_r, req_r, resp_w), env=_minimal_env(), start_new_session=True,
                cwd=self.workdir or "/")
        except OSError as e:
            for fd in (req_r, req_w, resp_r, resp_w, life_r, self.fd_life):
                os.close(fd)
            if self.cgroup:
                self.cgroup.remove()
            raise SandboxError(f"could not start the sandbox worker: {e}") from None
        for fd in (life_r, req_r, resp_w):
            os.close(fd)
        self.fd_req, self.fd_resp = req_w, resp_r
        self.uid = limits.uid_base + self.popen.pid if isolation.drop_uid else os.getuid()
        self.seq = 0
        try:
            self._handshake()
        except BaseException:
            self.kill()
            raise

    def _handshake(self) -> None:
        deadline = time.monotonic() + self.limits.startup_timeout_s
        iso = self.isolation
        cfg = {"uid": self.uid, "gid": self.uid, "drop_uid": iso.drop_uid, "pid_ns": iso.pid_ns,
               "mount_ns": iso.mount_ns, "ipc_ns": iso.ipc_ns, "workdir": self.workdir,
               "cgroups": self.cgroup.dirs if self.cgroup else [],
               **{k: v for k, v in asdict(self.limits).items()}}
        try:
            _write_frame(self.fd_req, cfg, deadline)
            msg = _read_frame(self.fd_resp, deadline, self.limits.max_reply_mb << 20)
        except SandboxError as e:
            raise SandboxError(f"sandbox worker failed to start ({e}){self._stderr_tail()}") from None
        if msg.get("op") != "ready":
            raise SandboxError(str(msg.get("error", f"unexpected first frame {msg!r}"))[:2000])
        host_pid = msg.get("host_pid")
        if type(host_pid) is not int:
            raise SandboxError(f"sandbox worker sent a ready frame without a pid: {msg!r}"[:2000])
        # The worker is alive and blocked on its next read, so the pid cannot have been reused:
        # check its parentage, then hold a pidfd so later kills can never hit another process.
        if _parent_pid(host_pid) != self.popen.pid:
            raise SandboxError(f"sandbox worker reported pid {host_pid}, which is not our child")
        self.host_pid = host_pid
        self.pidfd = os.pidfd_open(host_pid)
        # With a pid namespace, its identity tells the sandbox's processes from any other.
        self.ns = _pid_ns(host_pid) if iso.pid_ns else None
        if iso.pid_ns and (self.ns is None or self.ns == _pid_ns(os.getpid())):
            raise SandboxError(f"sandbox worker {host_pid} is not in a pid namespace of its own")
        if self.cgroup and host_pid not in self.cgroup.pids():
            raise SandboxError(f"sandbox worker {host_pid} is not in its cgroup {self.cgroup.dirs}")
        self.report = msg.get("report", {})

    def _stderr_tail(self) -> str:
        try:
            if self.popen.poll() is None:
                return ""
            data = self.popen.stderr.read(4096).decode(errors="replace").strip()
            return f": {data.splitlines()[-1]}" if data else ""
        except (OSError, ValueError):
            return ""

    def request(self, msg: dict, timeout: float) -> dict:
        if self.dead:
            raise WorkerDied("the worker is already dead")
        self.seq += 1
        self.set_paused(False)
        deadline = time.monotonic() + timeout
        _write_frame(self.fd_req, {**msg, "seq": self.seq}, deadline)
        resp = _read_frame(self.fd_resp, deadline, self.limits.max_reply_mb << 20)
        if resp.get("seq") != self.seq:
            raise ProtocolError("a reply that does not match the request")
        # Between calls nothing of the sandbox runs: threads or children the code left
        # spinning would otherwise take CPU from the trainer until the episode ends.
        self.set_paused(True)
        return resp

    def set_paused(self, paused: bool) -> None:
        """Freeze (cgroup freezer) or stop (SIGSTOP) every process of the sandbox, or resume it."""
        if paused == self.paused or self.dead:
            return
        self.paused = paused
        if self.cgroup is not None and self.cgroup.can_freeze:
            try:
                self.cgroup.set_frozen(paused)
                return
            except OSError:
                pass  # fall back to signals
        sig = signal.SIGSTOP if paused else signal.SIGCONT
        done: set[int] = set()
        for _ in range(self.limits.max_processes + 1):
            # Repeat until a scan finds nothing new: a process may fork between a scan and its stop.
            new = [p for p in self._processes() if p not in done]
            if not new:
                break
            for pid in new:
                done.add(pid)
                self._signal_own(pid, sig)
            if not paused:
                break  # resumed processes may fork at will

    def _processes(self) -> list[int]:
        """Host pids of this sandbox's processes (the worker first)."""
        if self.cgroup is not None:
            return [self.host_pid, *sorted(self.cgroup.pids() - {self.host_pid})]
        if self.ns is not None:
            return [self.host_pid, *[p for p in _ns_pids(self.ns) if p != self.host_pid]]
        if self.isolation.drop_uid:
            return [self.host_pid, *[p for p in _uid_pids(self.uid) if p != self.host_pid]]
        return [self.host_pid]  # same uid as the trainer: only the worker is surely ours

    def _signal_own(self, pid: int, sig: int) -> None:
        """Signal ``pid`` only if it still belongs to this sandbox once pinned by a pidfd (a pid
        can be reused between a scan and a signal)."""
        if self.pidfd is not None and pid == self.host_pid:
            try:
                signal.pidfd_send_signal(self.pidfd, sig)
            except OSError:
                pass
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return
        try:
            if self.cgroup is not None:
                mine = pid in self.cgroup.pids()
            elif self.ns is not None:
                mine = _pid_ns(pid) == self.ns
            else:
                mine = self.isolation.drop_uid and _real_uid(pid) == self.uid
            if mine:
                signal.pidfd_send_signal(fd, sig)
        except OSError:
            pass
        finally:
            os.close(fd)

    def exit_description(self) -> str:
        """How the worker ended, for error messages (call after kill())."""
        if self.oom_killed:
            return f"was killed for exceeding the sandbox's memory limit ({self.limits.memory_mb} MB)"
        code = self.popen.returncode
        if code is None:
            return "was stopped"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        if code > 128 and code - 128 in {s.value for s in signal.Signals}:
            return f"was killed by {signal.Signals(code - 128).name}"
        return f"exited with code {code}"

    def kill(self) -> None:
        """Kill the worker and everything it started; idempotent, never raises."""
        if self.dead:
            return
        if self.cgroup is not None and self.cgroup.can_freeze:
            try:
                self.cgroup.set_frozen(False)  # a task frozen by the v1 freezer ignores SIGKILL
            except OSError:
                pass
        self.dead = True
        if self.pidfd is not None:
            try:
                # SIGKILL to the pid-namespace init: the kernel kills every process in the namespace.
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except (ProcessLookupError, OSError):
                pass
        os.close(self.fd_life)  # the launcher kills the worker too (if the pidfd never existed)
        self.fd_life = None
        try:
            # The launcher reaps the worker and exits on its own (no zombie left behind) ...
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            try:
                # ... else kill it: it leads its own session and, unreaped, its pgid is still ours.
                os.killpg(self.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        if not self.isolation.pid_ns:
            self._kill_leftovers()
        if self.cgroup is not None:
            self.oom_killed = self.cgroup.oom_kills() > 0
            self.cgroup.remove()
        for fd in (self.fd_req, self.fd_resp, self.pidfd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if self.popen.stderr:
            self.popen.stderr.close()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        """No pid namespace to tear down: the worker's children outlive it. They are what is left
        in its cgroup, or (uid drop) what carries its unique uid. Repeat: one may fork between a
        scan and a kill."""
        if self.cgroup is None and not self.isolation.drop_uid:
            return
        for _ in range(50):
            pids = self.cgroup.pids() if self.cgroup is not None else set(_uid_processes(self.uid))
            if not pids:
                return
            for pid in pids:
                self._signal_own(pid, signal.SIGKILL)
            time.sleep(0.01)


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------- pool

class SandboxPool:
    """Warm, pre-started workers (numpy/PIL/matplotlib already imported): a call costs ms.

    A worker serves exactly one session: on release it is killed and a fresh one is started in
    the background (never reused: state isolation). Thread-safe. ``close()`` (also at exit)
    kills every worker the pool started.
    """

    def __init__(self, size: int = 2, limits: SandboxLimits | None = None):
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"SandboxPool size must be an int >= 0, got {size!r}")
        self.size = size
        self.limits = limits or SandboxLimits()
        self.isolation = detect_isolation()
        _warn_if_weak(self.isolation)
        self._cond = threading.Condition()
        self._ready: collections.deque[_Worker] = collections.deque()
        self._live: set[_Worker] = set()
        self._closed = False
        self.last_error: str | None = None
        self._spawning = 0
        # Several refill threads: a worker start is ~0.2 s of mostly waiting on exec/imports, and an RL
        # step can open dozens of sessions at once.
        self._threads = [threading.Thread(target=self._refill, name=f"sandbox-pool-refill-{i}", daemon=True)
                         for i in range(max(1, min(size, 4)))]
        for t in self._threads:
            t.start()
        atexit.register(self.close)

    def _spawn(self, warm: bool) -> _Worker:
        worker = _Worker(self.limits, self.isolation, warm=warm)
        with self._cond:
            if not self._closed:
                self._live.add(worker)
                return worker
        worker.kill()
        raise SandboxError("the sandbox pool is closed")

    def _refill(self) -> None:
        while True:
            with self._cond:
                while not self._closed and len(self._ready) + self._spawning >= self.size:
                    self._cond.wait()
                if self._closed:
                    return
                self._spawning += 1
            try:
                worker = self._spawn(warm=True)
            except SandboxError as e:
                self.last_error = str(e)
                with self._cond:
                    self._spawning -= 1
                    self._cond.wait(1.0)  # back off; a broken machine must not spin
                continue
            with self._cond:
                self._spawning -= 1
                self._ready.append(worker)
                self._cond.notify_all()

    def wait_warm(self, timeout: float = 60.0) -> bool:
        """Block until ``size`` warm workers are ready (for tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._ready) < self.size and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return not self._closed

    def checkout(self) -> _Worker:
        """A warm worker if one is ready, else a cold start in the calling thread."""
        with self._cond:
            if self._closed:
                raise SandboxError("the sandbox pool is closed")
            if self._ready:
                worker = self._ready.popleft()
                self._cond.notify_all()
                return worker
        return self._spawn(warm=False)

    def release(self, worker: _Worker) -> None:
        """Destroy a used worker (never reused); the refill thread replaces it."""
        worker.kill()
        with self._cond:
            self._live.discard(worker)
            self._cond.notify_all()

    def live_pids(self) -> list[int]:
        with self._cond:
            return [w.host_pid for w in self._live if not w.dead]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            workers = list(self._live)
            self._live.clear()
            self._ready.clear()
            self._cond.notify_all()
        for worker in workers:
            worker.kill()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=self.limits.startup_timeout_s)
        atexit.unregister(self.close)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- session

def format_code_result(stdout: str, stderr: str) -> str:
    """A code call's text in the "ours" protocol layout (protocol.OURS.code_template; the episode loop uses
    its own profile's)."""
    return OURS.code_text(stdout, stderr)


def _png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _valid_text(s: str) -> str:
    """``s`` with lone surrogates (from undecodable file names, ``'\\ud800'``, ...) replaced by
    U+FFFD, so that encoding it downstream cannot raise. Valid text comes back unchanged."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _cap_text(s: str, limit: int) -> str:
    """The worker's output cap, re-applied: a conforming worker's text is never cut here."""
    if len(s) <= limit + NOTE_SLACK:
        return s
    return s[:limit] + f"\n[... truncated {len(s) - limit} chars]"


@dataclass(frozen=True)
class _RunReply:
    stdout: str
    stderr: str
    images: list[str]
    error: str | None


def _parse_run_reply(resp: dict, limits: SandboxLimits) -> _RunReply:
    """Type-check a ``run`` reply and cap it on the trainer side, before anything is decoded:
    the worker's own limits live in memory the sandboxed code can rewrite."""
    stdout, stderr, images, error = (resp.get("stdout"), resp.get("stderr"), resp.get("images"),
                                     resp.get("error"))
    if not (isinstance(stdout, str) and isinstance(stderr, str) and isinstance(images, list)
            and all(isinstance(b, str) for b in images)
            and (error is None or isinstance(error, str))):
        raise ProtocolError("a reply with fields of the wrong types")
    stdout = _valid_text(_cap_text(stdout, limits.max_output_chars))
    stderr = _valid_text(_cap_text(stderr, limits.max_output_chars))
    if len(images) > limits.max_images:
        stderr = "\n".join([stderr.rstrip("\n"), f"[{len(images) - limits.max_images} more images not "
                            f"returned: limit is {limits.max_images} per call]"]).lstrip("\n")
        images = images[:limits.max_images]
    if error is not None:
        error = _valid_text(error[:limits.max_output_chars])
    return _RunReply(stdout, stderr, images, error)


def _decode_images(payload: list[str], max_pixels: int) -> tuple[list[Image.Image], list[str]]:
    images, problems = [], []
    for i, b64 in enumerate(payload):
        try:
            # Image.open reads the header only: the size is checked before any pixel is decoded.
            im = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
            if im.format != "PNG" or im.width * im.height > max_pixels:
                raise ValueError(f"not a PNG within {max_pixels} pixels")
            images.append(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001 -- untrusted bytes from the sandbox
            problems.append(f"[image {i + 1} from the sandbox was dropped: {e}]")
    return images, problems


@dataclass(frozen=True)
class CodeRun:
    """One code call's outcome, fields kept apart (``Session.execute``).

    stdout, stderr: capped at ``max_output_chars`` each; sandbox notes (timeout, restart,
        dropped images) are in stderr.
    images: what the code showed, RGB PIL images, at most ``max_images``.
    status: "ok" | "error" (the code raised, or its worker died) | "timeout".
    error: one line when status != "ok", else None.
    latency_s: wall-clock seconds the call took.
    ran: False when the code never reached a worker (bad input, closed session, no sandbox);
        then stdout, stderr and images are empty and ``error`` says why.
    """

    stdout: str
    stderr: str
    images: list[Image.Image]
    status: str
    error: str | None
    latency_s: float
    ran: bool = True


def _not_run(message: str, started: float) -> CodeRun:
    return CodeRun("", "", [], "error", message, time.perf_counter() - started, ran=False)


def _release(state: dict) -> None:
    worker, pool = state.pop("worker", None), state.get("pool")
    if worker is not None:
        pool.release(worker) if pool is not None else worker.kill()


class Session:
    """One episode's tool state: its input images and (lazily) one sandbox worker.

    images: the episode's input images, preloaded in the sandbox as ``image_1``, ``image_2``, ...
    pool: where warm workers come from; None starts a cold worker on the first code call.
    limits: defaults to the pool's limits (must match them when a pool is given).
    """

    def __init__(self, images: list[Image.Image], pool: SandboxPool | None = None,
                 limits: SandboxLimits | None = None):
        images = list(images or [])
        for i, im in enumerate(images):
            if not isinstance(im, Image.Image):
                raise ValueError(f"Session images[{i}] must be a PIL image, got {type(im).__name__}")
        if pool is not None and limits is not None and limits != pool.limits:
            raise ValueError("Session limits differ from the pool's limits; pass one or the other")
        self.images = images
        self.pool = pool
        self.limits = limits or (pool.limits if pool is not None else SandboxLimits())
        self._lock = threading.Lock()
        self._closed = False
        self._png: list[str] | None = None
        self._state: dict = {"pool": pool}
        self._finalizer = weakref.finalize(self, _release, self._state)
        self.restarts = 0

    @property
    def worker_pid(self) -> int | None:
        """Host pid of the current worker (None before the first code call)."""
        worker = self._state.get("worker")
        return None if worker is None else worker.host_pid

    @property
    def worker_uid(self) -> int | None:
        """The unprivileged uid the current worker runs as (None before the first code call)."""
        worker = self._state.get("worker")
        return None if worker is None else worker.uid

    @property
    def worker_cgroups(self) -> list[str]:
        """The current worker's cgroup directories (empty without cgroups or a worker)."""
        worker = self._state.get("worker")
        return [] if worker is None or worker.cgroup is None else list(worker.cgroup.dirs)

    @property
    def worker_was_warm(self) -> bool | None:
        worker = self._state.get("worker")
        return None if worker is None else worker.warm

    def _worker(self) -> _Worker:
        worker = self._state.get("worker")
        if worker is not None:
            return worker
        if self.pool is not None:
            worker = self.pool.checkout()
        else:
            isolation = detect_isolation()
            _warn_if_weak(isolation)
            worker = _Worker(self.limits, isolation, warm=False)
        self._state["worker"] = worker
        if self.images:
            if self._png is None:
                self._png = [_png_b64(im) for im in self.images]
            resp = worker.request({"op": "load_images", "images": self._png},
                                  self.limits.startup_timeout_s)
            if not resp.get("ok"):
                raise SandboxError(str(resp.get("error", "could not load the input images")))
        return worker

    def _drop_worker(self) -> None:
        _release(self._state)
        self.restarts += 1

    def run_code(self, code: str) -> ToolResult:
        """Run ``code`` in this episode's kernel and format the outcome for the policy. Never raises."""
        run = self.execute(code)
        if not run.ran:  # the same "Error: <why>" text as any tool that could not run
            return ToolResult(text=f"Error: {run.error}", status=run.status, error=run.error,
                              latency_s=run.latency_s)
        return ToolResult(text=format_code_result(run.stdout, run.stderr), images=run.images,
                          status=run.status, error=run.error, latency_s=run.latency_s,
                          stdout=run.stdout, stderr=run.stderr)

    def execute(self, code: str, timeout_s: float | None = None) -> CodeRun:
        """Run ``code`` in this episode's kernel; stdout, stderr and images come back separately
        (``run_code`` formats them for the policy; the HTTP server returns them as they are).

        timeout_s: this call's wall-clock limit, at most ``limits.timeout_s`` (None: that cap).
        Never raises.
        """
        started = time.perf_counter()
        if not isinstance(code, str):
            return _not_run(f"code must be a string, got {type(code).__name__}", started)
        if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                      or not timeout_s > 0):  # NaN fails the comparison too
            return _not_run(f"timeout_s must be a positive number, got {timeout_s!r}", started)
        timeout = self.limits.timeout_s if timeout_s is None else min(timeout_s, self.limits.timeout_s)
        with self._lock:
            if self._closed:
                return _not_run("the session is closed", started)
            try:
                worker = self._worker()
            except SandboxError as e:
                self._drop_worker()
                return _not_run(f"the Python sandbox is unavailable: {e}", started)
            try:
                reply = _parse_run_reply(worker.request({"op": "run", "code": code}, timeout),
                                         self.limits)
            except WorkerTimeout:
                self._drop_worker()
                msg = (f"TimeoutError: the code did not finish within {timeout:g} s; "
                       "the sandbox was killed and restarted, so all variables from earlier calls "
                       "are lost (image_1, ... are loaded again)")
                return CodeRun("", msg, [], "timeout", msg, time.perf_counter() - started)
            except SandboxError as e:
                worker.kill()
                how = f"sent {e}" if isinstance(e, ProtocolError) else worker.exit_description()
                self._drop_worker()
                msg = (f"SandboxError: the Python process {how} during the call; the sandbox was "
                       "restarted, so all variables from earlier calls are lost "
                       "(image_1, ... are loaded again)")
                return CodeRun("", msg, [], "error", msg, time.perf_counter() - started)
        images, problems = _decode_images(reply.images, self.limits.max_image_pixels)
        stderr = reply.stderr
        if problems:
            stderr = "\n".join([stderr.rstrip("\n"), *problems]).lstrip("\n")
        return CodeRun(reply.stdout, stderr, images, "error" if reply.error else "ok",
                       reply.error or None, time.perf_counter() - started)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            _release(self._state)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def isolation_report(limits: SandboxLimits | None = None) -> dict:
    """What a real worker sees: uid drop, pid/net/mount namespaces, rlimits (for ``deepeyesv2 info``).

    Starts one throw-away worker (about a second); never raises.
    """
    isolation = detect_isolation()
    cgroups = detect_cgroups()
    out: dict = {"launcher": " ".join(isolation.launcher()), "missing": isolation.missing(),
                 "mount_namespace": isolation.mount_ns, "ipc_namespace": isolation.ipc_ns,
                 "uts_namespace": isolation.uts_ns,
                 "cgroups": cgroups.describe() if isinstance(cgroups, Cgroups) else f"no: {cgroups}"}
    try:
        worker = _Worker(limits or SandboxLimits(), isolation, warm=False)
    except SandboxError as e:
        return {**out, "error": str(e), "uid_drop": False, "pid_namespace": False,
                "net_namespace": False, "rlimits": {}}
    try:
        rep = worker.request({"op": "report"}, 30)
    except SandboxError as e:
        return {**out, "error": str(e), "uid_drop": False, "pid_namespace": False,
                "net_namespace": False, "rlimits": {}}
    finally:
        worker.kill()
    return {**out,
            "uid_drop": rep["uid"] != 0 and rep["euid"] != 0 and rep["groups"] == [],
            "uid": rep["uid"],
            "pid_namespace": rep["pid_in_namespace"] == 1,
            "net_namespace": set(rep["interfaces"]) <= {"lo"},
            "seccomp": rep.get("seccomp", False),
            "rlimits": {k: v[0] for k, v in rep["rlimits"].items()},
            "notes": rep["notes"]}
