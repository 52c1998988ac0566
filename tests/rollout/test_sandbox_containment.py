"""Whole-sandbox containment: what one sandbox may take from the machine (cgroup, shm, inodes,
processes), what it does between calls, that it dies with its trainer, and what it can see.

Every hostile loop is bounded. Cases that need a uid drop + pid namespace, a mount namespace or a
writable cgroup hierarchy are skipped with the reason where the machine lacks them.
"""

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from deepeyesv2_rollout.tools import (SandboxLimits, SandboxPool, Session, detect_isolation,
                                      format_code_result)
from deepeyesv2_rollout.tools.sandbox import detect_cgroups

REPO = Path(__file__).resolve().parents[2]
ISO = detect_isolation()
CGROUPS = detect_cgroups()
ISOLATED = ISO.drop_uid and ISO.pid_ns
needs_isolation = pytest.mark.skipif(
    not ISOLATED, reason=f"sandbox isolation (uid drop + pid namespace) unavailable: {ISO.missing()}")
needs_mount_ns = pytest.mark.skipif(not ISO.mount_ns, reason="no mount namespace available")
needs_ipc_ns = pytest.mark.skipif(not ISO.ipc_ns, reason="no ipc namespace available")
needs_cgroups = pytest.mark.skipif(
    isinstance(CGROUPS, str), reason=f"no writable cgroup hierarchy here: {CGROUPS}")

LIMITS = SandboxLimits(timeout_s=5.0, max_processes=48, memory_mb=512, file_size_mb=64,
                       tmpfs_mb=32, tmpfs_inodes=2000, shm_mb=16, max_output_chars=2000)


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(size=2, limits=LIMITS) as p:
        assert p.wait_warm(120), p.last_error
        yield p


@pytest.fixture
def session(pool):
    with Session([], pool=pool) as s:
        yield s


def recovers(session: Session) -> None:
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


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime of all threads
        except (OSError, ValueError, IndexError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ processes

@needs_isolation
def test_zombies_are_reaped_between_calls(session):
    # 40 unreaped children and 40 orphaned grandchildren per call, 3 calls: 240 exited processes
    # against a 48-process limit. Without reaping, the second call cannot fork any more.
    direct = ("import os\nn = 0\nfor i in range(40):\n    if os.fork() == 0:\n        os._exit(0)\n"
              "    n += 1\nprint(n)")
    orphans = ("import os\nn = 0\nfor i in range(40):\n    pid = os.fork()\n    if pid == 0:\n"
               "        if os.fork() == 0:\n            os._exit(0)\n        os._exit(0)\n"
               "    os.waitpid(pid, 0)\n    n += 1\nprint(n)")
    for code in (direct, orphans) * 3:
        r = session.run_code(code)
        assert r.text == format_code_result("40\n", ""), r.text
    recovers(session)


@needs_isolation
def test_children_the_code_still_waits_for_are_not_reaped(session):
    r = session.run_code("import subprocess\np = subprocess.Popen(['sh', '-c', 'exit 3'])\n"
                         "import time\ntime.sleep(0.3)")
    assert r.status == "ok", r.text
    r = session.run_code("print(p.wait(), subprocess.run(['sh', '-c', 'exit 5']).returncode)")
    assert r.text == format_code_result("3 5\n", "")


def check_stopped_between_calls(session: Session) -> None:
    r = session.run_code(
        "import os, threading\nspins = [0]\n"
        "def spin():\n    while True:\n        spins[0] += 1\n"
        "threading.Thread(target=spin, daemon=True).start()\n"
        "if os.fork() == 0:\n    while True:\n        pass\n"
        # non-dumpable: /proc/PID may then look root-owned, which must not hide it
        "import ctypes\nif os.fork() == 0:\n    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)\n"
        "    while True:\n        pass\n"
        "print('spinning')")
    assert r.status == "ok", r.text
    pids = uid_processes(session.worker_uid)
    assert len(pids) == 3
    before = cpu_seconds(pids)
    time.sleep(1.0)
    # A spinning thread and a spinning child burn ~1-2 CPU-s per second unless stopped.
    assert cpu_seconds(pids) - before < 0.1
    r = session.run_code("import time\na = spins[0]\ntime.sleep(0.2)\nprint(spins[0] > a)")
    assert r.text == format_code_result("True\n", "")  # continued on the next call


@needs_isolation
def test_sandbox_processes_are_stopped_between_calls(session):
    check_stopped_between_calls(session)  # frozen by the cgroup freezer where there is one


@needs_isolation
def test_without_cgroups_one_warning_and_processes_are_still_stopped(monkeypatch):
    import deepeyesv2_rollout.tools.sandbox as sandbox_module

    monkeypatch.setattr(sandbox_module, "detect_cgroups", lambda: "disabled by this test")
    monkeypatch.setattr(sandbox_module, "_CGROUP_WARNED", [])
    with pytest.warns(RuntimeWarning, match=r"without whole-sandbox cgroup limits \(disabled by "
                                             r"this test\): memory, processes and CPU are bounded"):
        session = Session([], limits=LIMITS)
        session.run_code("1")
    with session:
        assert session.worker_cgroups == []
        check_stopped_between_calls(session)  # SIGSTOP / SIGCONT instead


WEAKEN = """
import dataclasses, warnings
import deepeyesv2_rollout.tools.sandbox as sandbox_module
weak = dataclasses.replace(sandbox_module.detect_isolation(), pid_ns=False, mount_ns=False,
                           ipc_ns=False, uts_ns=False)
sandbox_module.detect_isolation = lambda: weak
warnings.simplefilter("ignore")
"""


@needs_isolation
@pytest.mark.parametrize("namespaces", ["all", "no pid namespace"])
def test_sandbox_dies_with_a_killed_trainer(tmp_path, namespaces):
    # A trainer-like parent: a session whose code leaves a child behind, then it hangs in a call.
    # Without a pid namespace the launcher kills the leftovers by cgroup / uid.
    script = tmp_path / "trainer.py"
    script.write_text((WEAKEN if namespaces != "all" else "") + textwrap.dedent("""
        import sys, time
        from deepeyesv2_rollout.tools import Session, SandboxLimits
        s = Session([], limits=SandboxLimits(timeout_s=600))
        r = s.run_code("import os, time\\nif os.fork() == 0:\\n    time.sleep(300)\\n    os._exit(0)\\nprint('up')")
        assert r.status == "ok", r.text
        print(s.worker_uid, flush=True)
        s.run_code("import time\\ntime.sleep(300)")  # killed during a call: the worker is busy
    """))
    trainer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    uid = None
    try:
        uid = int(trainer.stdout.readline())
        assert len(uid_processes(uid)) == 2  # the kernel and the child it left
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(10)
        deadline = time.monotonic() + 15
        while uid_processes(uid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert uid_processes(uid) == []
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        for pid in uid_processes(uid) if uid is not None else []:
            os.kill(pid, signal.SIGKILL)  # only if the test failed: what its own trainer left


# ------------------------------------------------------------------ memory outside the rlimits

@needs_isolation
@needs_ipc_ns
def test_sysv_shared_memory_is_bounded_by_the_ipc_namespace(session):
    r = session.run_code(
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.shmget.restype = ctypes.c_int\n"
        "big = libc.shmget(0, ctypes.c_size_t(64 << 20), 0o1600)\nerr = ctypes.get_errno()\n"
        "small = libc.shmget(0, ctypes.c_size_t(1 << 20), 0o1600)\nprint(big, err, small >= 0)")
    assert r.text == format_code_result("-1 22 True\n", ""), r.text  # EINVAL over shmmax
    recovers(session)


@needs_isolation
def test_sandbox_is_first_for_the_oom_killer_and_cannot_change_that(session):
    r = session.run_code("print(open('/proc/self/oom_score_adj').read().strip())\n"
                         "open('/proc/self/oom_score_adj', 'w').write('0')")
    assert r.text.startswith(format_code_result("1000\n", "")[:-1]), r.text
    assert r.error == "PermissionError: [Errno 13] Permission denied: '/proc/self/oom_score_adj'"


@needs_isolation
@needs_mount_ns
def test_private_tmpfs_has_an_inode_limit(session):
    r = session.run_code(
        "n = 0\ntry:\n    for i in range(20000):\n        open(f'f{i}', 'w').close()\n        n += 1\n"
        "except OSError as e:\n    print(n < 2000, e.errno)")
    assert r.text == format_code_result("True 28\n", ""), r.text  # ENOSPC before 2000 files
    recovers(session)


@needs_isolation
@needs_cgroups
def test_memfd_beyond_the_memory_limit_fails_or_kills_only_the_sandbox(session):
    # memfd pages count against no rlimit (not mapped, under RLIMIT_FSIZE per file): 10 x 60 MB
    # against a 512 MB sandbox.
    r = session.run_code(
        "import os\nfds = []\nfor i in range(10):\n    fd = os.memfd_create(f'm{i}')\n"
        "    for j in range(60):\n        os.write(fd, b'x' * (1 << 20))\n    fds.append(fd)\n"
        "print('allocated', len(fds) * 60, 'MB')")
    assert "allocated 600 MB" not in r.text
    assert r.status == "error", r.text
    assert r.error.startswith(("OSError", "MemoryError", "SandboxError: the Python process was killed "
                               "for exceeding the sandbox's memory limit (512 MB)")), r.error
    recovers(session)


@needs_isolation
@needs_cgroups
def test_each_sandbox_has_its_own_cgroup_with_the_limits(session):
    session.run_code("1")
    groups = session.worker_cgroups
    assert groups, "no cgroup for the worker"
    values = {}
    for d in groups:
        assert str(session.worker_pid) in Path(d, "cgroup.procs").read_text().split()
        for name in ("memory.max", "memory.limit_in_bytes", "pids.max", "cpu.max",
                     "cpu.cfs_quota_us"):
            if Path(d, name).exists():
                values[name] = Path(d, name).read_text().split()
    assert values.get("memory.max", values.get("memory.limit_in_bytes")) == [str(512 << 20)]
    assert values["pids.max"] == ["48"]
    assert values.get("cpu.max", values.get("cpu.cfs_quota_us"))[0] == "100000"
    worker_groups = list(groups)
    session.close()
    assert not any(os.path.exists(d) for d in worker_groups)  # removed with the worker


# ------------------------------------------------------------------ what the sandbox can see

@needs_isolation
@needs_mount_ns
def test_sandbox_cannot_read_the_checkout_or_planted_answers():
    answer = f"gold-answer-{secrets.token_hex(8)}"
    data_dir = Path(tempfile.mkdtemp(prefix=".sandbox-answers-", dir=REPO))
    try:
        os.chmod(data_dir, 0o755)
        (data_dir / "train.jsonl").write_text('{"question": "q", "answer": "%s"}\n' % answer)
        (data_dir / "train.jsonl").chmod(0o644)
        targets = [str(data_dir / "train.jsonl"), str(REPO / "examples/data/rl.jsonl"),
                   str(REPO / "README.md"), str(REPO / "deepeyesv2/rl.py"), "/root/.bashrc",
                   str(Path.home() / ".bashrc")]
        code = (
            "import os\nhits, seen = [], 0\n"
            "for root, dirs, files in os.walk('/'):\n"
            "    dirs[:] = [d for d in dirs if root != '/' or d not in ('proc', 'sys', 'dev')]\n"
            "    seen += len(files)\n"
            "    hits += [root for f in files if f == 'train.jsonl' or f == 'rl.jsonl']\n"
            "    if seen > 300000:\n        break\n"
            f"for p in {targets!r}:\n"
            "    try:\n        hits.append(('READ', p, open(p).read()[:100]))\n"
            "    except OSError:\n        pass\n"
            f"print(hits)\nprint(sorted(os.listdir({str(REPO)!r})) if os.path.exists({str(REPO)!r}) else [])")
        # Only the venv (the interpreter's prefix) may show inside the checkout, when it lives there.
        prefix = Path(sys.prefix).resolve()
        venv = [prefix.relative_to(REPO).parts[0]] if prefix.is_relative_to(REPO) else []
        with Session([], limits=SandboxLimits(timeout_s=60)) as s:
            r = s.run_code(code)
        assert r.status == "ok", r.text
        assert answer not in r.text
        assert r.text == format_code_result(f"[]\n{venv}\n", ""), r.text[:2000]
    finally:
        for p in data_dir.iterdir():
            p.unlink()
        data_dir.rmdir()


@needs_isolation
@needs_mount_ns
def test_interpreter_and_libraries_still_work_inside(session):
    r = session.run_code(
        "import subprocess, sys\nimport numpy, PIL, matplotlib.pyplot\n"
        "out = subprocess.run([sys.executable, '-c', 'import numpy, PIL; print(numpy.arange(3).sum())'],"
        " capture_output=True, text=True)\nprint(out.stdout.strip(), out.returncode)\n"
        "print(open('/dev/null').read() == '', len(open('/dev/urandom', 'rb').read(4)))")
    assert r.text == format_code_result("3 0\nTrue 4\n", ""), r.text


def test_cgroup_v2_delegation_against_a_fake_hierarchy(tmp_path):
    # This machine may have no v2 controllers to test with; the decisions are checked on files.
    from deepeyesv2_rollout.tools.sandbox import Cgroups, _cgroup_v2

    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    got = _cgroup_v2(str(tmp_path), "deepeyesv2-1-2")
    assert got == Cgroups(2, (str(tmp_path / "deepeyesv2-1-2"),), ("memory", "pids", "cpu"), False)
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert (tmp_path / "deepeyesv2-1-2/cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    (tmp_path / "cgroup.controllers").write_text("cpu io\n")
    assert _cgroup_v2(str(tmp_path), "g") == f"cgroup v2 at {tmp_path} lacks the memory, pids controller(s)"
