"""The sandbox over HTTP, in DeepEyesV2's code-server shape: sessions, images, limits, auth, errors.

Every test talks to a server this module starts on 127.0.0.1 (port 0) with http.client. Hostile
loops are bounded; cases that need the uid drop + pid namespace skip where they are missing.
"""

import base64
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.client import HTTPConnection

import pytest
from PIL import Image

from deepeyesv2_rollout.tools import SandboxLimits, detect_isolation
from deepeyesv2_rollout.tools.sandbox_server import (TOKEN_ENV, RunRequest, SandboxServer, ServerConfig,
                                                     main)

ISO = detect_isolation()
needs_isolation = pytest.mark.skipif(
    not (ISO.drop_uid and ISO.pid_ns),
    reason=f"sandbox isolation (uid drop + pid namespace) unavailable: {ISO.missing()}")
needs_mount_ns = pytest.mark.skipif(not ISO.mount_ns, reason="no mount namespace available")

TOKEN = secrets.token_hex(16)
LIMITS = SandboxLimits(timeout_s=3.0, max_processes=48, memory_mb=1024, file_size_mb=8,
                       tmpfs_mb=32, max_output_chars=2000)
MAX_SESSIONS = 4


@pytest.fixture(scope="module")
def server():
    config = ServerConfig(port=0, token=TOKEN, max_sessions=MAX_SESSIONS, pool_size=2,
                          max_body_mb=1.0, log_requests=False)
    with SandboxServer(config, LIMITS) as srv:
        assert srv.pool.wait_warm(120), srv.pool.last_error
        srv.start()
        yield srv


def request(srv: SandboxServer, method: str, path: str, body: object = None,
            token: str | None = TOKEN, headers: dict | None = None,
            raw: bytes | None = None) -> tuple[int, dict]:
    """One request on a fresh connection; returns (HTTP status, JSON body)."""
    conn = HTTPConnection("127.0.0.1", srv.port, timeout=60)
    try:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = json.loads(resp.read())
        assert resp.getheader("Content-Type") == "application/json"
        return resp.status, payload
    finally:
        conn.close()


def run(srv: SandboxServer, sid: str, code: str, **extra) -> dict:
    """A /jupyter_sandbox call that must be served (200, status success); returns its output."""
    status, payload = request(srv, "POST", "/jupyter_sandbox", {"session_id": sid, "code": code, **extra})
    assert status == 200 and payload["status"] == "success", payload
    assert isinstance(payload["execution_time"], float)
    return payload["output"]


def close(srv: SandboxServer, sid: str) -> bool:
    status, payload = request(srv, "POST", "/clear_session", {"session_id": sid})
    assert status == 200 and payload["status"] == "success", payload
    return payload["closed"]


@pytest.fixture
def sid(server):
    name = f"test-{uuid.uuid4().hex}"
    yield name
    close(server, name)


def open_sessions(srv: SandboxServer) -> int:
    status, payload = request(srv, "GET", "/health")
    assert status == 200, payload
    return payload["sessions"]


def recovers(srv: SandboxServer, sid: str) -> None:
    out = run(srv, sid, "print(6 * 7)")
    assert out["stdout"] == "42\n" and out["outcome"] == "ok", out


# ------------------------------------------------------------------ the DeepEyesV2 shape

def test_state_persists_within_a_session(server, sid):
    out = run(server, sid, "x = 1", timeout=200)  # DeepEyesV2 asks for 200 s: capped, not refused
    assert out == {"result": "", "stdout": "", "stderr": "", "images": [], "outcome": "ok", "error": None}
    out = run(server, sid, "print(x)")
    assert out["stdout"] == "1\n" and out["stderr"] == ""


def test_concurrent_sessions_do_not_see_each_other(server):
    sids = [f"conc-{i}-{uuid.uuid4().hex}" for i in range(3)]
    failures: list[str] = []

    def client(i: int) -> None:
        try:
            for step in range(3):
                run(server, sids[i], f"mine = {i * 100 + step}")
                out = run(server, sids[i],
                          "print(mine, sorted(k for k in globals() if k.startswith('only_')))\n"
                          f"only_{i} = True")
                expected = f"{i * 100 + step} {[f'only_{i}'] if step else []}\n"
                if out["stdout"] != expected:
                    failures.append(f"session {i} step {step}: {out['stdout']!r} != {expected!r}")
        except AssertionError as e:
            failures.append(f"session {i}: {e}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert failures == []
    finally:
        for s in sids:
            close(server, s)


def test_images_come_back_as_base64_png(server, sid):
    # DeepEyesV2's reset() sends the input image inside the code; crop-and-show is its usual next call.
    im = Image.new("RGB", (64, 48), (255, 0, 0))
    im.putpixel((10, 5), (0, 255, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    init = ("from PIL import Image\nimport base64\nfrom io import BytesIO\n"
            f"_img_base64 = \"{base64.b64encode(buf.getvalue()).decode()}\"\n"
            "image_1 = Image.open(BytesIO(base64.b64decode(_img_base64)))\n")
    assert run(server, sid, init)["outcome"] == "ok"
    out = run(server, sid, "image_1.crop((8, 3, 40, 19))")
    assert out["outcome"] == "ok" and len(out["images"]) == 1, out
    shown = Image.open(io.BytesIO(base64.b64decode(out["images"][0], validate=True)))
    assert shown.format == "PNG" and shown.size == (32, 16)
    assert shown.convert("RGB").getpixel((2, 2)) == (0, 255, 0)
    out = run(server, sid, "import matplotlib.pyplot as plt\nplt.figure(figsize=(2, 1), dpi=50)\n"
                           "plt.plot([0, 1])\nplt.show()")
    assert [Image.open(io.BytesIO(base64.b64decode(b))).size for b in out["images"]] == [(100, 50)]


def test_code_errors_are_served_with_the_traceback(server, sid):
    out = run(server, sid, "y = 2\n1 / 0")
    assert out["outcome"] == "error" and out["error"] == "ZeroDivisionError: division by zero"
    assert "ZeroDivisionError" in out["stderr"]
    assert run(server, sid, "print(y)")["stdout"] == "2\n"  # an exception keeps the state


def test_output_is_capped(server, sid):
    out = run(server, sid, "print('a' * 50000)")
    assert len(out["stdout"]) < LIMITS.max_output_chars + 200 and "truncated" in out["stdout"]


# ------------------------------------------------------------------ hostile code

@needs_isolation
@needs_mount_ns
def test_writing_outside_tmp_fails(server, sid):
    target = f"/etc/deepeyesv2-pwned-{secrets.token_hex(4)}"
    out = run(server, sid, f"try:\n    open({target!r}, 'w').write('x')\n    print('WROTE')\n"
                           "except OSError as e:\n    print(type(e).__name__)\n"
                           "open('/tmp/ok.txt', 'w').write('fine')\nprint(open('/tmp/ok.txt').read())")
    assert "WROTE" not in out["stdout"] and out["stdout"].endswith("fine\n"), out
    assert not os.path.exists(target)


def test_infinite_loop_hits_the_timeout_and_the_server_stays_responsive(server, sid):
    other = f"other-{uuid.uuid4().hex}"
    result: dict = {}
    loop = threading.Thread(
        target=lambda: result.update(run(server, sid, "while True:\n    pass", timeout=1.5)))
    loop.start()
    try:
        # While the loop burns its sandbox's CPU, other sessions and the health check are answered.
        status, _ = request(server, "GET", "/health")
        assert status == 200
        recovers(server, other)
    finally:
        loop.join()
        close(server, other)
    assert result["outcome"] == "timeout", result
    assert "TimeoutError" in result["stderr"] and "1.5 s" in result["error"]
    recovers(server, sid)


@needs_isolation
def test_fork_bomb_is_contained(server, sid):
    code = ("import os, time\nn = 0\ntry:\n    for i in range(5000):\n        pid = os.fork()\n"
            "        if pid == 0:\n            time.sleep(120)\n            os._exit(0)\n"
            "        n += 1\nexcept OSError as e:\n    print('stopped', n, e.errno)")
    out = run(server, sid, code)
    assert out["stdout"].startswith("stopped"), out
    assert int(out["stdout"].split()[1]) < LIMITS.max_processes
    recovers(server, sid)


def test_a_session_that_kills_its_worker_gets_a_clean_error(server, sid):
    run(server, sid, "z = 5")
    out = run(server, sid, "import os\nos._exit(7)")
    assert out["outcome"] == "error" and "exited with code 7" in out["error"] and "lost" in out["error"]
    assert "Traceback" not in out["stderr"]
    recovers(server, sid)
    assert run(server, sid, "print('z' in globals())")["stdout"] == "False\n"  # a fresh kernel


# ------------------------------------------------------------------ auth, limits, lifecycle

def test_wrong_or_missing_token_is_401(server):
    body = {"session_id": "auth", "code": "print(1)"}
    for token in ("wrong", None):
        status, payload = request(server, "POST", "/jupyter_sandbox", body, token=token)
        assert status == 401 and payload["status"] == "error" and "unauthorized" in payload["error"]
    status, _ = request(server, "GET", "/health", token="wrong")
    assert status == 401
    # The other two ways to send it: a header, and the URL for clients whose only setting is the URL.
    status, _ = request(server, "GET", "/health", token=None, headers={"X-Sandbox-Token": TOKEN})
    assert status == 200
    status, _ = request(server, "GET", f"/health?token={TOKEN}", token=None)
    assert status == 200
    assert open_sessions(server) == 0  # nothing unauthorized opened a session


def test_too_many_sessions_are_refused_and_close_frees_one(server):
    sids = [f"full-{i}-{uuid.uuid4().hex}" for i in range(MAX_SESSIONS)]
    try:
        for s in sids:
            run(server, s, "v = 1")
        assert open_sessions(server) == MAX_SESSIONS
        extra = f"extra-{uuid.uuid4().hex}"
        status, payload = request(server, "POST", "/jupyter_sandbox", {"session_id": extra, "code": "1"})
        assert status == 429 and payload["status"] == "error" and "too many open sessions" in payload["error"]
        assert run(server, sids[0], "print(v)")["stdout"] == "1\n"  # open sessions still work
        assert close(server, sids[0]) is True
        assert close(server, sids[0]) is False  # already closed
        assert open_sessions(server) == MAX_SESSIONS - 1
        assert run(server, extra, "print(2)", close=True)["stdout"] == "2\n"  # the freed slot
        assert open_sessions(server) == MAX_SESSIONS - 1  # close=True closed it after the call
    finally:
        for s in sids:
            close(server, s)


def test_closed_session_starts_fresh(server, sid):
    run(server, sid, "w = 3")
    assert close(server, sid) is True
    out = run(server, sid, "print(w)")
    assert out["outcome"] == "error" and out["error"] == "NameError: name 'w' is not defined"


def test_idle_sessions_expire(server, sid):
    run(server, sid, "u = 4")
    assert server.sessions.expire_idle(now=time.monotonic()) == 0  # just used: not idle
    assert server.sessions.expire_idle(now=time.monotonic() + server.config.idle_timeout_s + 1) >= 1
    assert run(server, sid, "print('u' in globals())")["stdout"] == "False\n"


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"code": "print(1)"}', "session_id must be a non-empty string"),
    (b'{"session_id": "s", "code": 5}', "code must be a string"),
    (b'{"session_id": "s", "code": "  "}', "no code provided"),
    (b'{"session_id": "s", "code": "1", "timeout": -1}', "timeout must be a positive number"),
    (b'{"session_id": "s", "code": "1", "timeout": "10"}', "timeout must be a positive number"),
    (b'{"session_id": "s", "code": "1", "timout": 10}', "unknown field(s) timout"),
    (b'{"session_id": "s", "code": "1", "close": "yes"}', "close must be true or false"),
    (b"[" * 100000 + b"]" * 100000, "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
])
def test_bad_input_is_400_with_one_line(server, body, message):
    status, payload = request(server, "POST", "/jupyter_sandbox", raw=body)
    assert status == 400 and payload["status"] == "error", payload
    assert message in payload["error"] and "\n" not in payload["error"]


def test_wrong_paths_methods_and_sizes(server):
    status, payload = request(server, "GET", "/jupyter_sandbox")
    assert status == 405 and "takes POST" in payload["error"]
    status, payload = request(server, "POST", "/nope", {"session_id": "s"})
    assert status == 404 and "/jupyter_sandbox" in payload["error"]
    status, payload = request(server, "PUT", "/jupyter_sandbox", {"session_id": "s"})
    assert status == 501 and payload["status"] == "error"
    big = {"session_id": "s", "code": "x = '" + "a" * (server.config.max_body_bytes + 10) + "'"}
    status, payload = request(server, "POST", "/jupyter_sandbox", big)
    assert status == 413 and "limit" in payload["error"]
    # A declared size over the cap is refused before any of the body is read.
    conn = HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.putrequest("POST", "/jupyter_sandbox")
        conn.putheader("Authorization", f"Bearer {TOKEN}")
        conn.putheader("Content-Length", str(10 << 30))
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413 and json.loads(resp.read())["status"] == "error"
    finally:
        conn.close()
    assert open_sessions(server) == 0


def test_shutdown_closes_every_session():
    config = ServerConfig(port=0, token=TOKEN, max_sessions=2, pool_size=0, log_requests=False)
    srv = SandboxServer(config, LIMITS).start()
    try:
        for i in range(2):
            run(srv, f"s{i}", "a = 1")
        assert len(srv.sessions) == 2 and len(srv.pool.live_pids()) == 2
    finally:
        srv.close()
    assert len(srv.sessions) == 0 and srv.pool.live_pids() == []
    status, payload = srv.run(RunRequest("late", "1", None, False))
    assert status == 503 and payload["status"] == "error"


def test_cli_refuses_unsafe_configurations(monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert main(["--port", "0"]) == 2
    assert "no token" in capsys.readouterr().err
    assert main(["--host", "0.0.0.0", "--token", "t", "--port", "0"]) == 2
    assert "--allow-remote" in capsys.readouterr().err
    assert main(["--host", "0.0.0.0", "--allow-remote", "--no-auth", "--port", "0"]) == 2
    assert "no_auth is refused" in capsys.readouterr().err
    monkeypatch.setenv(TOKEN_ENV, "t")
    assert main(["--no-auth", "--port", "0"]) == 2  # a token in the env and --no-auth: ambiguous
    assert "pick one" in capsys.readouterr().err


def test_one_connection_serves_several_requests(server, sid):
    """HTTP/1.1 keep-alive, as a requests.Session client uses it: errors with a read body keep the
    connection; the next request on it is answered."""
    conn = HTTPConnection("127.0.0.1", server.port, timeout=60)
    hdrs = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    try:
        for body, expected in ((b'{"session_id": "%s", "code": "k = 9"}' % sid.encode(), 200),
                               (b"{bad", 400),
                               (b'{"session_id": "%s", "code": "print(k)"}' % sid.encode(), 200)):
            conn.request("POST", "/jupyter_sandbox", body=body, headers=hdrs)
            resp = conn.getresponse()
            payload = json.loads(resp.read())
            assert resp.status == expected, payload
        assert payload["output"]["stdout"] == "9\n"
    finally:
        conn.close()


def test_no_auth_on_loopback_admits_callers_without_a_token():
    config = ServerConfig(port=0, no_auth=True, pool_size=0, log_requests=False)
    with SandboxServer(config, LIMITS).start() as srv:
        assert run(srv, "open", "print(3)", close=True)["stdout"] == "3\n"


def test_cli_serves_until_sigterm_then_closes_its_sessions(tmp_path):
    env = {**os.environ, TOKEN_ENV: TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "deepeyesv2_rollout.tools.sandbox_server", "--port", "0",
                             "--pool-size", "0", "--timeout-cap", "3", "--quiet"],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stderr.readline()  # "sandbox server on http://127.0.0.1:PORT: ..."
        port = int(banner.split("http://127.0.0.1:")[1].split(":")[0])
        conn = HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/jupyter_sandbox", body=json.dumps({"session_id": "cli", "code": "print(5)"}),
                     headers={"Authorization": f"Bearer {TOKEN}"})
        out = json.loads(conn.getresponse().read())["output"]
        conn.close()
        assert out["stdout"] == "5\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
        rest = proc.stderr.read()
    assert rc == 0, rest
    assert "Traceback" not in rest
