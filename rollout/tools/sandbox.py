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

Isolation, strongest available (``detect_isolation``; a ``warnings.warn`` names what is missing):
- new pid, network, mount, ipc and uts namespaces via the ``unshare`` binary: the worker is pid 1
  of its namespace (the trainer is invisible, ``kill(-1)`` reaches only the sandbox, killing the
  worker tears down every process it started), and it has no network (not even to the
  trainer's 127.0.0.1);
- a private size-limited tmpfs on /tmp as the working directory (HOME, TMPDIR); other
  world-writable dirs covered read-only; /root (mode 700, holding the interpreter) replaced by an
  empty tmpfs with only the interpreter prefix bound back read-only;
- a unique unprivileged uid/gid per worker (``uid_base + pid``, no supplementary groups, no
  new privileges), so RLIMIT_NPROC -- which counts per uid -- bounds each sandbox on its own
  and sandboxes cannot signal or read each other;
- RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_NOFILE; a minimal environment (no
  trainer env var reaches the worker).
A call that exceeds ``timeout_s`` kills the worker's whole namespace (via a pidfd, immune to pid
reuse) and the session transparently starts a fresh worker on its next call, saying the state
was lost. Nothing from the worker is unpickled: frames are JSON.
"""

from __future__ import annotations

import atexit
import base64
import collections
import functools
import io
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

from .base import ToolResult, error_result

WORKER_SCRIPT = str(Path(__file__).with_name("_sandbox_worker.py"))
# A conforming worker's caps (output chars, images) can exceed their limits by at most a
# truncation note; the trainer re-applies the caps past this slack (see _cap_text).
NOTE_SLACK = 100


@dataclass(frozen=True)
class SandboxLimits:
    """Per-worker limits. Sizes in MiB; ``max_output_chars`` applies to stdout and stderr each."""

    timeout_s: float = 30.0          # wall clock per call; over it the worker is killed
    cpu_s: int = 600                 # RLIMIT_CPU, per process over the worker's life
    memory_mb: int = 2048            # RLIMIT_AS, per process (the pre-imported kernel uses ~250)
    file_size_mb: int = 64           # RLIMIT_FSIZE
    tmpfs_mb: int = 256              # size of the private /tmp (working directory)
    max_processes: int = 64          # RLIMIT_NPROC (processes + threads of the sandbox uid)
    max_open_files: int = 256        # RLIMIT_NOFILE
    max_output_chars: int = 8000
    max_images: int = 10
    max_image_pixels: int = 4096 * 4096
    max_reply_mb: int = 8            # a reply frame over this is a dead worker (never allocated)
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

    def launcher(self) -> list[str]:
        """argv prefix that puts the worker into the namespaces (empty when there are none)."""
        flags = [f for ok, f in ((self.pid_ns, "--pid"), (self.net_ns, "--net"),
                                 (self.mount_ns, "--mount"), (self.ipc_ns, "--ipc"),
                                 (self.uts_ns, "--uts")) if ok]
        if not flags or self.unshare is None:
            return []
        if self.pid_ns:
            flags = ["--fork", "--kill-child", *flags]
        return [self.unshare, *flags, "--"]


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
    missing = isolation.missing()
    if missing:
        hidden = _unreadable_prefix()
        extra = (f"; without a mount namespace the sandbox uid cannot read {hidden} (the "
                 "interpreter's prefix), so only the pre-imported modules are importable"
                 if hidden and isolation.drop_uid and not isolation.mount_ns else "")
        warnings.warn("Python sandbox runs with weaker isolation than intended; missing: "
                      + ", ".join(missing) + extra, RuntimeWarning, stacklevel=3)


def _minimal_env() -> dict[str, str]:
    # Nothing from the trainer's environment: no tokens, no paths, no CUDA settings.
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "MPLBACKEND": "Agg",
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


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


class _Worker:
    """One started sandbox worker. Not thread-safe: a Session serialises its calls."""

    def __init__(self, limits: SandboxLimits, isolation: Isolation, warm: bool):
        self.limits, self.isolation, self.warm = limits, isolation, warm
        self.pidfd: int | None = None
        self.dead = False
        self.workdir = None if isolation.mount_ns else tempfile.mkdtemp(prefix="deepeyesv2-sandbox-")
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        argv = isolation.launcher() + [sys.executable, "-I", WORKER_SCRIPT, str(req_r), str(resp_w)]
        try:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                pass_fds=(req_r, resp_w), env=_minimal_env(), start_new_session=True,
                cwd=self.workdir or "/")
        except OSError as e:
            for fd in (req_r, req_w, resp_r, resp_w):
                os.close(fd)
            raise SandboxError(f"could not start the sandbox worker: {e}") from None
        os.close(req_r)
        os.close(resp_w)
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
               "mount_ns": iso.mount_ns, "workdir": self.workdir,
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
        expected_parent = self.popen.pid if iso.pid_ns and iso.launcher() else os.getpid()
        if host_pid != self.popen.pid and _parent_pid(host_pid) != expected_parent:
            raise SandboxError(f"sandbox worker reported pid {host_pid}, which is not our child")
        self.host_pid = host_pid
        self.pidfd = os.pidfd_open(host_pid)
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
        deadline = time.monotonic() + timeout
        _write_frame(self.fd_req, {**msg, "seq": self.seq}, deadline)
        resp = _read_frame(self.fd_resp, deadline, self.limits.max_reply_mb << 20)
        if resp.get("seq") != self.seq:
            raise ProtocolError("a reply that does not match the request")
        return resp

    def exit_description(self) -> str:
        """How the worker ended, for error messages (call after kill())."""
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
        self.dead = True
        if self.pidfd is not None:
            try:
                # SIGKILL to the pid-namespace init: the kernel kills every process in the namespace.
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except (ProcessLookupError, OSError):
                pass
        try:
            # The launcher reaps the worker and exits on its own (no zombie left behind) ...
            self.popen.wait(timeout=5 if self.pidfd is not None else 0)
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
        if not (self.isolation.pid_ns and self.isolation.launcher()) and self.isolation.drop_uid:
            # No pid namespace: stragglers keep this worker's unique uid; only they carry it.
            # Repeat: one may have forked between our scan and our kill.
            for _ in range(50):
                pids = _uid_processes(self.uid)
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                time.sleep(0.01)
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
    """The exact text the policy sees after a code call (the only place this format lives)."""
    return f"Code execution result:\nstdout:\n{stdout}\nstderr:\n{stderr}"


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
    images: list
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
        """Run ``code`` in this episode's kernel. Never raises."""
        started = time.perf_counter()
        if not isinstance(code, str):
            return error_result(f"code must be a string, got {type(code).__name__}", started)
        with self._lock:
            if self._closed:
                return error_result("the session is closed", started)
            try:
                worker = self._worker()
            except SandboxError as e:
                self._drop_worker()
                return error_result(f"the Python sandbox is unavailable: {e}", started)
            try:
                reply = _parse_run_reply(worker.request({"op": "run", "code": code},
                                                        self.limits.timeout_s), self.limits)
            except WorkerTimeout:
                self._drop_worker()
                msg = (f"TimeoutError: the code did not finish within {self.limits.timeout_s:g} s; "
                       "the sandbox was killed and restarted, so all variables from earlier calls "
                       "are lost (image_1, ... are loaded again)")
                return error_result(msg, started, status="timeout",
                                    text=format_code_result("", msg))
            except SandboxError as e:
                worker.kill()
                how = f"sent {e}" if isinstance(e, ProtocolError) else worker.exit_description()
                self._drop_worker()
                msg = (f"SandboxError: the Python process {how} during the call; the sandbox was "
                       "restarted, so all variables from earlier calls are lost "
                       "(image_1, ... are loaded again)")
                return error_result(msg, started, text=format_code_result("", msg))
        images, problems = _decode_images(reply.images, self.limits.max_image_pixels)
        stderr = reply.stderr
        if problems:
            stderr = "\n".join([stderr.rstrip("\n"), *problems]).lstrip("\n")
        return ToolResult(text=format_code_result(reply.stdout, stderr), images=images,
                          status="error" if reply.error else "ok", error=reply.error or None,
                          latency_s=time.perf_counter() - started)

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
    out: dict = {"launcher": " ".join(isolation.launcher()) or None, "missing": isolation.missing(),
                 "mount_namespace": isolation.mount_ns, "ipc_namespace": isolation.ipc_ns,
                 "uts_namespace": isolation.uts_ns}
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
