"""Hostile code against the sandbox. Each case checks: the trainer (this process) is alive, the
sandbox contained the damage, a clear error string came back, and a fresh call works afterwards.

Every hostile loop is bounded (at most 5000 forks/threads), so a BROKEN sandbox fails the test
instead of taking the machine down. Cases that would be dangerous without a uid drop + pid
namespace are skipped (with the reason) where that isolation is missing.
"""

import os
import secrets
import signal
import socket
import tempfile
import threading
import time

import pytest

from deepeyesv2_rollout.tools import (SandboxLimits, SandboxPool, Session, detect_isolation,
                                      default_registry, format_code_result)

ISO = detect_isolation()
ISOLATED = ISO.drop_uid and ISO.pid_ns
needs_isolation = pytest.mark.skipif(
    not ISOLATED, reason=f"sandbox isolation (uid drop + pid namespace) unavailable: {ISO.missing()}")
needs_net_ns = pytest.mark.skipif(not ISO.net_ns, reason="no network namespace available")
needs_mount_ns = pytest.mark.skipif(not ISO.mount_ns, reason="no mount namespace available")

LIMITS = SandboxLimits(timeout_s=2.0, max_processes=48, memory_mb=1024, file_size_mb=8,
                       tmpfs_mb=32, max_output_chars=2000)
SECRET_NAME = "DEEPEYESV2_TEST_TRAINER_SECRET"
SECRET = secrets.token_hex(16)


@pytest.fixture(scope="module")
def pool():
    os.environ[SECRET_NAME] = SECRET  # set BEFORE any worker exists: nothing may inherit it
    with SandboxPool(size=2, limits=LIMITS) as p:
        assert p.wait_warm(120), p.last_error
        yield p
    os.environ.pop(SECRET_NAME, None)


@pytest.fixture
def session(pool):
    with Session([], pool=pool) as s:
        yield s


def recovers(session: Session) -> None:
    """The trainer is alive and the same session answers a fresh call correctly."""
    os.kill(os.getpid(), 0)
    r = session.run_code("print(6 * 7)")
    assert r.status == "ok", r.text
    assert r.text == format_code_result("42\n", "")


def uid_processes(uid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    if any(line.startswith("Uid:") and int(line.split()[1]) == uid for line in f):
                        out.append(int(entry))
            except (OSError, ValueError):
                pass
    return out


# ------------------------------------------------------------------ safe regardless of isolation

def test_infinite_loop_times_out_and_restarts(session):
    session.run_code("before = 1")
    r = session.run_code("while True:\n    pass")
    assert r.status == "timeout" and "did not finish within 2 s" in r.error and "lost" in r.error
    recovers(session)
    assert session.run_code("before").error == "NameError: name 'before' is not defined"


def test_allocating_50_gb_is_a_memory_error(session):
    r = session.run_code("x = bytearray(50 * 10**9)")
    assert r.status == "error" and r.error == "MemoryError"
    recovers(session)


def test_deep_recursion_is_contained(session):
    r = session.run_code("import sys\nsys.setrecursionlimit(10**6)\n"
                         "def f(n):\n    return f(n + 1)\nf(0)")
    # Python raises, the C stack overflows and the worker dies, or 10**6 frames outlast the
    # timeout: all three are contained.
    assert r.status in ("error", "timeout")
    assert r.error.startswith(("RecursionError", "SandboxError", "MemoryError", "TimeoutError")), \
        r.error
    recovers(session)


def test_printing_100_mb_is_truncated(session):
    r = session.run_code("print('y' * 100_000_000)")
    assert r.status == "ok"
    assert "[... truncated 99998001 chars]" in r.text and len(r.text) < 3000
    recovers(session)


def test_infinite_output_is_bounded_by_the_timeout(session):
    r = session.run_code("while True:\n    print('spam' * 1000)")
    assert r.status == "timeout" and len(r.text) < 3000
    recovers(session)


def test_sys_exit_is_an_error_that_keeps_state(session):
    session.run_code("kept = 3")
    r = session.run_code("import sys\nsys.exit(3)")
    assert r.status == "error" and r.error == "SystemExit: 3"
    assert session.run_code("print(kept)").text == format_code_result("3\n", "")


def test_os_exit_kills_only_the_worker(session):
    r = session.run_code("import os\nos._exit(7)")
    assert r.status == "error"
    assert "exited with code 7" in r.error and "lost" in r.error
    recovers(session)


def test_closing_stdio_and_protocol_fds(session):
    r = session.run_code("import os, sys\nsys.stdout.close()\nsys.stdin.close()\n"
                         "for fd in (0, 1, 2):\n    os.close(fd)")
    assert r.status == "ok", r.text
    recovers(session)
    # Now close every other descriptor too, the channel to the trainer included.
    r = session.run_code("import os\nfor fd in range(3, 64):\n    try:\n        os.close(fd)\n"
                         "    except OSError:\n        pass")
    assert r.status in ("error", "timeout") and "restarted" in r.error
    recovers(session)


def test_garbage_on_the_protocol_channel(session):
    r = session.run_code("import os\nfor fd in range(3, 32):\n    try:\n"
                         "        os.write(fd, b'\\xff\\xff\\xff\\xf0garbage')\n"
                         "    except OSError:\n        pass\nimport time\ntime.sleep(0.2)")
    assert r.status in ("error", "timeout") and "restarted" in r.error
    recovers(session)


def test_segfault_via_ctypes(session):
    r = session.run_code("import ctypes\nctypes.string_at(0)")
    assert r.status == "error" and "SIGSEGV" in r.error
    recovers(session)


def test_huge_file_write_hits_rlimit_fsize(session):
    r = session.run_code("with open('big.bin', 'wb') as f:\n    f.write(b'0' * (64 << 20))")
    assert r.status == "error" and r.error == "OSError: [Errno 27] File too large"
    recovers(session)


def test_syntax_error_is_clear(session):
    r = session.run_code("for i in range(3) print(i)")
    assert r.status == "error" and r.error.startswith("SyntaxError:") and "(line 1)" in r.error
    recovers(session)


def test_malformed_tool_args_and_unknown_tool(session):
    reg = default_registry()
    cases = [("code", {}), ("code", {"code": 5}), ("code", {"code": None}), ("code", "print(1)"),
             ("code", ["print(1)"])]
    for name, args in cases:
        r = reg.call(name, args, session)
        assert r.status == "error" and r.error and "\n" not in r.error, (args, r)
    r = reg.call("rm_rf", {"path": "/"}, session)
    assert r.status == "error" and "unknown tool 'rm_rf'" in r.error and "code" in r.error
    recovers(session)


def test_never_returning_code_does_not_block_another_session(pool):
    slow, fast = Session([], pool=pool), Session([], pool=pool)
    try:
        fast.run_code("ready = 1")
        result = {}
        t = threading.Thread(target=lambda: result.update(r=slow.run_code("while True:\n    pass")))
        t.start()
        time.sleep(0.3)
        r = fast.run_code("print(sum(range(10)))\nready")
        assert t.is_alive()  # the slow call is still running while this one completed
        assert r.text == format_code_result("45\n1\n", "")
        t.join(30)
        assert result["r"].status == "timeout"
        recovers(slow)
    finally:
        slow.close()
        fast.close()


def test_limits_rewritten_inside_the_worker_are_enforced_by_the_trainer(session):
    # The worker's own caps live in its memory, which the code controls: raise them all, then
    # print 6 M chars to both streams and show 30 images. The trainer must cap them again.
    code = ("import gc, sys\nfrom PIL import Image\n"
            "for o in gc.get_objects():\n"
            "    if type(o).__name__ == 'Kernel':\n"
            "        o.cfg.update(max_images=1000, max_output_chars=10**9, max_reply_mb=10**6)\n"
            "sys.stdout.limit = sys.stderr.limit = 10**9\n"
            "for i in range(30):\n    display(Image.new('L', (8, 8), i))\n"
            "print('z' * 3_000_000)\nprint('e' * 3_000_000, file=sys.stderr)")
    r = session.run_code(code)
    assert r.status == "ok", r.text[:300]
    assert [im.getpixel((0, 0)) for im in r.images] == [(i, i, i) for i in range(10)]
    assert r.text == format_code_result(
        "z" * 2000 + "\n[... truncated 2998001 chars]",
        "e" * 2000 + "\n[... truncated 2998001 chars]\n"
        "[20 more images not returned: limit is 10 per call]")
    recovers(session)


FIND_SEQ = ("import json, os, struct, sys, time\nf = sys._getframe()\n"
            "while 'req' not in f.f_locals:\n    f = f.f_back\n"
            "seq = f.f_locals['req']['seq']\n"
            "def forge(body):\n    os.write(4, struct.pack('>I', len(body)) + body)\n"
            "    time.sleep(5)\n")


@pytest.mark.parametrize("body", [
    # 30 MB of well-formed reply with the right sequence number: over the reply-frame cap
    "json.dumps({'seq': seq, 'stdout': 'x' * (30 << 20), 'stderr': '', 'images': [], "
    "'error': None}).encode()",
    # 100k levels of nesting: RecursionError in the trainer's json.loads
    "b'{\"seq\": %d, \"stdout\": ' % seq + b'[' * 100000 + b']' * 100000 + b'}'",
    # well-formed JSON with the wrong types
    "json.dumps({'seq': seq, 'stdout': ['a'], 'stderr': '', 'images': 'nope', 'error': 3}).encode()",
    "json.dumps([seq]).encode()",
    "b'{\"seq\": %d, \"stdo' % seq",
], ids=["oversized", "deeply-nested", "wrong-types", "not-an-object", "truncated-json"])
def test_forged_reply_frames_are_a_dead_worker(session, body):
    session.run_code("kept = 1")
    r = session.run_code(FIND_SEQ + f"forge({body})")
    assert r.status == "error" and "restarted" in r.error and "lost" in r.error, r.error
    assert len(r.text) < 1000
    recovers(session)
    assert session.run_code("kept").error == "NameError: name 'kept' is not defined"


# ------------------------------------------------------------------ need uid drop + pid namespace

@needs_isolation
def test_fork_bomb_is_bounded_and_cleaned_up(pool):
    s = Session([], pool=pool)
    code = ("import os, time\nn = 0\ntry:\n    for i in range(5000):\n        pid = os.fork()\n"
            "        if pid == 0:\n            time.sleep(120)\n            os._exit(0)\n"
            "        n += 1\nexcept OSError as e:\n    print('stopped', n, e.errno)")
    r = s.run_code(code)
    assert r.status == "ok", r.text
    n, errno = r.text.split("stopped ")[1].split()[:2]
    assert int(n) < LIMITS.max_processes and errno == "11"  # EAGAIN from RLIMIT_NPROC
    uid = s.worker_uid
    assert len(uid_processes(uid)) >= int(n)  # the children exist, under the sandbox uid only
    recovers(s)
    s.close()
    deadline = time.monotonic() + 10
    while uid_processes(uid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uid_processes(uid) == []  # closing the session killed every process it started


@needs_isolation
def test_thread_bomb_is_bounded(session):
    code = ("import threading, time\nn = 0\ntry:\n    for i in range(5000):\n"
            "        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
            "        n += 1\nexcept RuntimeError as e:\n    print('stopped', n, e)")
    r = session.run_code(code)
    assert r.status == "ok" and "stopped" in r.text and "can't start new thread" in r.text
    assert int(r.text.split("stopped ")[1].split()[0]) < LIMITS.max_processes
    recovers(session)


@needs_isolation
def test_kill_parent_and_kill_all(session):
    r = session.run_code("import os, signal\nprint(os.getppid())\n"
                         "try:\n    os.kill(os.getppid(), signal.SIGKILL)\nexcept OSError as e:\n"
                         "    print(type(e).__name__)")
    assert r.status == "ok" and r.text.split("stdout:\n")[1].startswith("0\n")  # parent invisible
    os.kill(os.getpid(), 0)
    r = session.run_code("import os, signal\nos.kill(-1, signal.SIGKILL)")
    assert r.status in ("ok", "error")
    os.kill(os.getpid(), 0)
    recovers(session)


@needs_isolation
def test_killing_itself(session):
    r = session.run_code("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\nprint('after')")
    # As pid 1 of its namespace the worker is immune to its own SIGKILL; otherwise it dies.
    assert (r.status == "ok" and "after" in r.text) or "restarted" in r.error
    recovers(session)


@needs_isolation
@needs_mount_ns
def test_writing_outside_its_directory(session):
    host_tmp = f"/tmp/deepeyesv2-pwned-{secrets.token_hex(4)}"
    r = session.run_code(
        "import os\nres = []\n"
        f"for p in ['/work/main/pwned', '/etc/pwned', '/root/pwned', '/var/tmp/pwned', "
        f"'/dev/shm/pwned', '/work/pwned']:\n"
        "    try:\n        open(p, 'w').write('x')\n        res.append('WROTE ' + p)\n"
        "    except OSError as e:\n        res.append(type(e).__name__)\n"
        f"open('{host_tmp}', 'w').write('private')\nprint(res)")
    assert "WROTE" not in r.text, r.text
    for p in ("/work/main/pwned", "/etc/pwned", "/work/pwned", host_tmp):
        assert not os.path.exists(p), p  # /tmp inside the sandbox is its own tmpfs
    recovers(session)


@needs_isolation
def test_reading_trainer_secrets_fails(session):
    assert os.environ[SECRET_NAME] == SECRET
    with tempfile.NamedTemporaryFile("w", dir="/tmp", delete=False) as f:
        f.write(SECRET)
    try:
        os.chmod(f.name, 0o600)
        r = session.run_code(
            "import os, glob\nfound = [k for k, v in os.environ.items()]\n"
            "for p in glob.glob('/proc/*/environ') + "
            f"['/proc/{os.getpid()}/environ', '/proc/{os.getppid()}/environ', '{f.name}']:\n"
            "    try:\n        found.append(open(p, 'rb').read().decode(errors='replace'))\n"
            "    except OSError as e:\n        found.append(type(e).__name__)\n"
            "print(found)\nprint(os.listdir('/root'))")
        assert SECRET not in r.text and SECRET_NAME not in r.text
        assert "['.pyenv']" in r.text or "/root" not in ISO.launcher()  # /root is hidden
    finally:
        os.unlink(f.name)
    recovers(session)


@needs_isolation
def test_proc_snooping_sees_only_the_sandbox(session):
    r = session.run_code(
        "import os\npids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
        "cmds = [open(f'/proc/{p}/cmdline', 'rb').read() for p in pids]\n"
        "print(pids, any(b'pytest' in c for c in cmds))")
    assert r.status == "ok", r.text
    assert r.text == format_code_result("[1] False\n", "")
    recovers(session)


@needs_isolation
@needs_net_ns
def test_network_to_the_trainer_fails(session):
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        srv.settimeout(0.3)
        port = srv.getsockname()[1]
        r = session.run_code(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), "
                             "timeout=1)")
        assert r.status == "error" and r.error.startswith("OSError"), r.error
        with pytest.raises(socket.timeout):
            srv.accept()  # nothing ever reached the trainer's listener
    r = session.run_code("import socket\nsocket.create_connection(('8.8.8.8', 53), timeout=1)")
    assert r.status == "error"
    recovers(session)


@needs_isolation
def test_privilege_escalation_attempts_fail(session):
    r = session.run_code(
        "import os, ctypes, subprocess\nout = []\n"
        "for f in (lambda: os.setuid(0), lambda: os.chroot('/'), lambda: os.setgroups([0])):\n"
        "    try:\n        f()\n        out.append('OK')\n"
        "    except OSError as e:\n        out.append(type(e).__name__)\n"
        "libc = ctypes.CDLL(None)\n"
        "out.append(libc.mount(b'tmpfs', b'/mnt', b'tmpfs', 0, None))\n"
        "out.append(subprocess.run(['unshare', '-r', 'true'], capture_output=True).returncode != 0)\n"
        "print(out, os.getuid())")
    assert r.status == "ok", r.text
    assert "['PermissionError', 'PermissionError', 'PermissionError', -1, True]" in r.text
    assert int(r.text.split("] ")[1].split()[0]) >= LIMITS.uid_base
    recovers(session)


def test_trainer_never_got_a_signal():
    # If any case above had signalled this process, pytest would not be here to run this.
    assert signal.getsignal(signal.SIGTERM) is not None
    os.kill(os.getpid(), 0)
