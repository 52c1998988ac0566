"""The isolated sandbox (``sandbox.py``) as an HTTP service, in the shape DeepEyesV2's trainer calls.

DeepEyesV2's released RL env (``verl/workers/agent/envs/deepeyesv2/deepeyesv2.py``) and its
evaluation code talk to an unisolated Jupyter code server (ChenShawn/MultiModal-Jupyter-Sandbox)
over HTTP. This module serves the same request/response shape, so such a trainer can point its
``code_sandbox_url`` here and keep its code::

    POST /jupyter_sandbox   {"session_id": str, "code": str, "timeout": float?, "close": bool?}
      200 {"status": "success", "execution_time": float,
           "output": {"result": "", "stdout": str, "stderr": str, "images": [base64 PNG, ...],
                      "outcome": "ok" | "error" | "timeout", "error": str | null}}
    POST /clear_session     {"session_id": str}  ->  200 {"status": "success", "closed": bool}
    GET  /health            ->  200 {"status": "success", "sessions": int, "max_sessions": int, ...}
    any failure             ->  4xx/5xx {"status": "error", "error": "<one line>"}

As in the original, a session is created by its first call and keeps its namespace until it is
closed; a call whose code raised or timed out is still ``"status": "success"`` (the call was
served; the trainer reads stdout/stderr), with ``outcome`` saying what happened. ``result`` is
always "": our kernel prints the last expression's value to stdout (Jupyter display semantics).
A timeout kills the session's worker; its next call starts a fresh one (stderr says the state
was lost). ``timeout`` is capped at ``SandboxLimits.timeout_s``; outputs are capped by the
sandbox's trainer-side caps (``max_output_chars`` each for stdout and stderr, ``max_images``).

Unlike the original, every call runs in a ``Session`` of ``sandbox.py`` (one worker per session:
uid drop, namespaces, cgroup, rlimits, seccomp; warm pool), callers need a shared token
(``Authorization: Bearer <token>``, ``X-Sandbox-Token: <token>``, or ``?token=<token>`` in the
URL for clients whose only setting is the URL), the server binds loopback unless told otherwise,
and the number of open sessions, their idle time and the request body size are bounded.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from .sandbox import SandboxLimits, SandboxPool, Session, _png_b64

TOKEN_ENV = "DEEPEYESV2_SANDBOX_TOKEN"
RUN_PATH = "/jupyter_sandbox"
CLOSE_PATH = "/clear_session"
HEALTH_PATH = "/health"
RUN_FIELDS = {"session_id", "code", "timeout", "close"}
CLOSE_FIELDS = {"session_id"}
LINGER_S = 2.0  # how long a refused request's unread body is drained before the socket closes


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only "localhost" is known to be loopback without resolving
        return False


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:  # NaN fails too
        raise ValueError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class ServerConfig:
    """How the sandbox server listens and what it admits (limits of each sandbox: SandboxLimits)."""

    host: str = "127.0.0.1"          # interface to bind; a non-loopback one needs allow_remote
    port: int = 8000                 # DeepEyesV2's default code_sandbox_url port; 0 picks a free one
    token: str | None = None         # shared secret every caller must send; None needs no_auth
    no_auth: bool = False            # admit callers without a token (loopback binds only)
    allow_remote: bool = False       # permit binding a non-loopback interface (prints a warning)
    max_sessions: int = 64           # open sessions at once; a new one past this gets 429
    idle_timeout_s: float = 600.0    # a session unused this long is closed (its worker killed)
    max_body_mb: float = 32.0        # request body cap (413 past it); the init call carries an image
    pool_size: int = 4               # warm workers kept ready for new sessions
    max_session_id_chars: int = 256  # longest session_id accepted
    read_timeout_s: float = 60.0     # socket timeout while reading a request (slow clients)
    log_requests: bool = True        # one stderr line per request (token never logged)

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"host must be a non-empty string, got {self.host!r}")
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an int in [0, 65535], got {self.port!r}")
        if self.token is not None and (not isinstance(self.token, str) or not self.token.strip()):
            raise ValueError("token must be a non-empty string")
        if self.token is None and not self.no_auth:
            raise ValueError(f"no token: give --token, set ${TOKEN_ENV}, or pass --no-auth "
                             "(loopback only)")
        if self.token is not None and self.no_auth:
            raise ValueError("a token and no_auth were both given; pick one")
        loopback = _is_loopback(self.host)
        if not loopback and not self.allow_remote:
            raise ValueError(f"host {self.host!r} is not loopback; binding it needs --allow-remote")
        if not loopback and self.no_auth:
            raise ValueError(f"no_auth is refused on a non-loopback host ({self.host!r})")
        _check_int("max_sessions", self.max_sessions, 1)
        _check_int("pool_size", self.pool_size, 0)
        _check_int("max_session_id_chars", self.max_session_id_chars, 1)
        _check_positive("idle_timeout_s", self.idle_timeout_s)
        _check_positive("max_body_mb", self.max_body_mb)
        _check_positive("read_timeout_s", self.read_timeout_s)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))


# ---------------------------------------------------------------- sessions

class TooManySessions(RuntimeError):
    pass


class TableClosed(RuntimeError):
    pass


@dataclass(eq=False)
class _Entry:
    session: Session
    last_used: float      # time.monotonic() when its last request ended
    in_flight: int = 0    # requests using it now (an entry in use never expires)


@dataclass(eq=False)
class SessionTable:
    """session_id -> open Session, at most ``max_sessions``; idle ones expire. Thread-safe.

    Sessions are closed outside the table's lock: closing waits for the session's running call.
    """

    pool: SandboxPool
    max_sessions: int
    idle_timeout_s: float
    _entries: dict[str, _Entry] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closed: bool = False

    def acquire(self, session_id: str) -> _Entry:
        """The session's entry (created on first use), marked in use until ``release``."""
        expired: list[_Entry] = []
        try:
            with self._lock:
                if self._closed:
                    raise TableClosed("the server is shutting down")
                entry = self._entries.get(session_id)
                if entry is None:
                    if len(self._entries) >= self.max_sessions:
                        expired = self._pop_idle(time.monotonic())
                    if len(self._entries) >= self.max_sessions:
                        raise TooManySessions(f"too many open sessions ({self.max_sessions}); close one "
                                              f"with POST {CLOSE_PATH} or retry later")
                    entry = _Entry(Session([], pool=self.pool), time.monotonic())
                    self._entries[session_id] = entry
                entry.in_flight += 1
                return entry
        finally:
            for old in expired:
                old.session.close()

    def release(self, entry: _Entry) -> None:
        with self._lock:
            entry.in_flight -= 1
            entry.last_used = time.monotonic()

    def close_session(self, session_id: str) -> bool:
        """Close and forget ``session_id``; False when it was not open. Waits for its running call."""
        with self._lock:
            entry = self._entries.pop(session_id, None)
        if entry is None:
            return False
        entry.session.close()
        return True

    def _pop_idle(self, now: float) -> list[_Entry]:
        """Remove (caller holds the lock) and return the entries idle past ``idle_timeout_s``."""
        ids = [sid for sid, e in self._entries.items()
               if e.in_flight == 0 and now - e.last_used > self.idle_timeout_s]
        return [self._entries.pop(sid) for sid in ids]

    def expire_idle(self, now: float | None = None) -> int:
        """Close the sessions idle past ``idle_timeout_s`` at ``now`` (monotonic; default: now)."""
        with self._lock:
            expired = self._pop_idle(time.monotonic() if now is None else now)
        for entry in expired:
            entry.session.close()
        return len(expired)

    def close_all(self) -> None:
        with self._lock:
            self._closed = True
            entries = list(self._entries.values())
            self._entries.clear()
        for entry in entries:
            entry.session.close()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


# ---------------------------------------------------------------- requests

class BadRequest(ValueError):
    """The request cannot be served as sent; ``code`` is the HTTP status to answer with."""

    def __init__(self, code: HTTPStatus, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class RunRequest:
    session_id: str
    code: str
    timeout_s: float | None  # None: the server's cap
    close: bool              # close the session after this call


def _session_id(body: dict, max_chars: int) -> str:
    sid = body.get("session_id")
    if not isinstance(sid, str) or not sid:
        raise BadRequest(HTTPStatus.BAD_REQUEST, "session_id must be a non-empty string")
    if len(sid) > max_chars:
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"session_id is longer than {max_chars} chars")
    return sid


def _check_fields(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(HTTPStatus.BAD_REQUEST,
                         f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def parse_run_request(body: dict, max_session_id_chars: int) -> RunRequest:
    """Validate a ``/jupyter_sandbox`` body; raises BadRequest with one line."""
    _check_fields(body, RUN_FIELDS)
    sid = _session_id(body, max_session_id_chars)
    code = body.get("code")
    if not isinstance(code, str):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "code must be a string")
    if not code.strip():
        raise BadRequest(HTTPStatus.BAD_REQUEST, "no code provided")
    timeout = body.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not timeout > 0):
        raise BadRequest(HTTPStatus.BAD_REQUEST,
                         f"timeout must be a positive number of seconds, got {timeout!r}")
    close = body.get("close", False)
    if not isinstance(close, bool):
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"close must be true or false, got {close!r}")
    return RunRequest(sid, code, None if timeout is None else float(timeout), close)


def _request_token(headers, path: str) -> str | None:
    auth = headers.get("Authorization")
    if auth is not None and auth.startswith("Bearer "):
        return auth[len("Bearer "):].strip()
    token = headers.get("X-Sandbox-Token")
    if token is not None:
        return token.strip()
    values = parse_qs(urlsplit(path).query).get("token")
    return values[0] if values else None


class _Handler(BaseHTTPRequestHandler):
    """One connection's requests. Every answer is JSON; nothing the client sends can raise out."""

    server: _HTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive for clients that reuse connections
    server_version = "deepeyesv2-sandbox"
    sys_version = ""

    _linger = False  # a body was left unread: drain it before closing (see finish)

    def setup(self) -> None:
        self.timeout = self.server.app.config.read_timeout_s
        super().setup()

    def _refuse_body(self) -> None:
        """This answer leaves the request's body unread: the connection ends after it."""
        self.close_connection = True
        self._linger = True

    def finish(self) -> None:
        super().finish()
        if not self._linger:
            return
        # Closing a socket with unread input sends a RST, which can destroy the answer before the
        # client reads it: stop writing, then discard what the client still sends, for a bounded time.
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_S)
            deadline = time.monotonic() + LINGER_S
            while time.monotonic() < deadline and self.connection.recv(1 << 16):
                pass
        except OSError:
            pass

    # -- answers -------------------------------------------------------
    def _send_json(self, code: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send_error_json(self, code: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._send_json(code, {"status": "error", "error": message.splitlines()[0] if message else ""},
                        headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, unknown method, ...) as JSON too."""
        self._refuse_body()  # a body we did not read must not be taken for a request
        self._send_error_json(code, message or HTTPStatus(code).phrase)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if self.server.app.config.log_requests:
            # The query string may hold the token: log the path only.
            self.log_message('"%s" %s', re.sub(r"\?\S*", "", self.requestline), str(code))

    # -- dispatch ------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        try:
            self._route(method)
        except BadRequest as e:
            self._send_error_json(e.code, str(e))
        except Exception as e:  # noqa: BLE001 -- last guard: one line to the client, the trace to our log
            traceback.print_exc(file=sys.stderr)
            self._refuse_body()
            self._send_error_json(HTTPStatus.INTERNAL_SERVER_ERROR,
                                  f"internal server error: {type(e).__name__}")

    def _route(self, method: str) -> None:
        app = self.server.app
        expected = app.config.token
        if expected is not None:
            got = _request_token(self.headers, self.path)
            if got is None or not hmac.compare_digest(got.encode(), expected.encode()):
                self._refuse_body()
                why = "missing token" if got is None else "wrong token"
                self._send_error_json(HTTPStatus.UNAUTHORIZED, f"unauthorized: {why}",
                                      {"WWW-Authenticate": "Bearer"})
                return
        path = urlsplit(self.path).path
        routes = {RUN_PATH: "POST", CLOSE_PATH: "POST", HEALTH_PATH: "GET"}
        if path not in routes:
            self._refuse_body()
            raise BadRequest(HTTPStatus.NOT_FOUND, f"no such endpoint {path!r}; endpoints: "
                                                   f"POST {RUN_PATH}, POST {CLOSE_PATH}, GET {HEALTH_PATH}")
        if method != routes[path]:
            self._refuse_body()
            raise BadRequest(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} takes {routes[path]}, not {method}")
        if path == HEALTH_PATH:
            self._send_json(HTTPStatus.OK, app.health())
            return
        body = self._read_json()
        if path == RUN_PATH:
            code, payload = app.run(parse_run_request(body, app.config.max_session_id_chars))
        else:
            _check_fields(body, CLOSE_FIELDS)
            code, payload = HTTPStatus.OK, app.clear(_session_id(body, app.config.max_session_id_chars))
        self._send_json(code, payload)

    def _read_json(self) -> dict:
        """The request body as a JSON object, read only after its declared size was checked."""
        if self.headers.get("Transfer-Encoding") is not None:
            self._refuse_body()
            raise BadRequest(HTTPStatus.LENGTH_REQUIRED,
                             "chunked bodies are not supported; send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            self._refuse_body()
            raise BadRequest(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        if not length.isdigit():
            self._refuse_body()
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length[:40]!r}")
        limit = self.server.app.config.max_body_bytes
        if int(length) > limit:
            self._refuse_body()
            raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                             f"request body of {int(length)} bytes is over the {limit}-byte limit")
        raw = self.rfile.read(int(length))
        if len(raw) != int(length):
            self.close_connection = True
            raise BadRequest(HTTPStatus.BAD_REQUEST, "the body ended before Content-Length bytes")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"body must be a JSON object, got {type(body).__name__}")
        return body


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client connection must not block shutdown

    def __init__(self, address: tuple[str, int], app: SandboxServer):
        self.app = app
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)


# ---------------------------------------------------------------- server

class SandboxServer:
    """The HTTP server, its warm pool and its session table (see the module docstring).

    ``serve_forever()`` blocks; ``start()`` serves from a background thread (tests). ``close()``
    stops serving, closes every session (killing its worker) and the pool.
    """

    def __init__(self, config: ServerConfig, limits: SandboxLimits | None = None):
        self.config = config
        self.limits = limits or SandboxLimits()
        self.pool = SandboxPool(size=config.pool_size, limits=self.limits)
        self.sessions = SessionTable(self.pool, config.max_sessions, config.idle_timeout_s)
        try:
            self.httpd = _HTTPServer((config.host, config.port), self)
        except OSError:
            self.pool.close()
            raise
        self._stop = threading.Event()
        self._serving = False
        self._closed = False
        self._close_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._reaper = threading.Thread(target=self._reap, name="sandbox-server-reaper", daemon=True)
        self._reaper.start()

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self.config.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    def _reap(self) -> None:
        interval = min(self.config.idle_timeout_s / 2, 30.0)
        while not self._stop.wait(interval):
            self.sessions.expire_idle()

    # -- endpoints -----------------------------------------------------
    def run(self, req: RunRequest) -> tuple[HTTPStatus, dict]:
        started = time.perf_counter()
        try:
            entry = self.sessions.acquire(req.session_id)
        except TooManySessions as e:
            return HTTPStatus.TOO_MANY_REQUESTS, {"status": "error", "error": str(e)}
        except TableClosed as e:
            return HTTPStatus.SERVICE_UNAVAILABLE, {"status": "error", "error": str(e)}
        try:
            run = entry.session.execute(req.code, req.timeout_s)
        finally:
            self.sessions.release(entry)
            if req.close:
                self.sessions.close_session(req.session_id)
        if not run.ran:  # never reached a worker: the sandbox could not start, or a close raced us
            return HTTPStatus.SERVICE_UNAVAILABLE, {"status": "error", "error": run.error}
        return HTTPStatus.OK, {
            "status": "success",
            "execution_time": time.perf_counter() - started,
            "output": {"result": "", "stdout": run.stdout, "stderr": run.stderr,
                       "images": [_png_b64(im) for im in run.images],
                       "outcome": run.status, "error": run.error},
        }

    def clear(self, session_id: str) -> dict:
        return {"status": "success", "closed": self.sessions.close_session(session_id)}

    def health(self) -> dict:
        return {"status": "success", "sessions": len(self.sessions),
                "max_sessions": self.config.max_sessions,
                "isolation_missing": self.pool.isolation.missing(),
                "timeout_cap_s": self.limits.timeout_s}

    # -- lifecycle -----------------------------------------------------
    def serve_forever(self) -> None:
        self._serving = True
        self.httpd.serve_forever()

    def start(self) -> SandboxServer:
        self._serving = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="sandbox-server",
                                        daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self._serving:
            self.httpd.shutdown()
        self.httpd.server_close()
        self._stop.set()
        self.sessions.close_all()
        self.pool.close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> SandboxServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def serve(config: ServerConfig, limits: SandboxLimits | None = None) -> None:
    """Serve until SIGINT/SIGTERM, then close every session and the pool."""
    server = SandboxServer(config, limits)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    if not _is_loopback(config.host):
        print(f"WARNING: the sandbox server listens on {config.host}, reachable from other machines; "
              "anyone with the token can run code in its sandboxes", file=sys.stderr)
    missing = server.pool.isolation.missing()
    print(f"sandbox server on {server.url}: POST {RUN_PATH}, POST {CLOSE_PATH}, GET {HEALTH_PATH}; "
          f"timeout cap {server.limits.timeout_s:g} s, at most {config.max_sessions} sessions"
          + (f"; isolation missing: {', '.join(missing)}" if missing else ""), file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


def build_parser() -> argparse.ArgumentParser:
    d, lim = ServerConfig.__dataclass_fields__, SandboxLimits()
    p = argparse.ArgumentParser(
        prog="deepeyesv2 sandbox-server",
        description=f"Serve the isolated Python sandbox over HTTP in DeepEyesV2's code-server shape "
                    f"(POST {RUN_PATH} with session_id, code, timeout).")
    p.add_argument("--host", default=d["host"].default, help="interface to bind (default: loopback)")
    p.add_argument("--port", type=int, default=d["port"].default, help="port (0: any free port)")
    p.add_argument("--token", default=None,
                   help=f"shared token callers must send (default: ${TOKEN_ENV}; the environment "
                        "keeps it out of the process list)")
    p.add_argument("--no-auth", action="store_true", help="admit callers without a token (loopback only)")
    p.add_argument("--allow-remote", action="store_true", help="permit a non-loopback --host")
    p.add_argument("--max-sessions", type=int, default=d["max_sessions"].default,
                   help="open sessions at once; more are refused with 429")
    p.add_argument("--idle-timeout", type=float, default=d["idle_timeout_s"].default,
                   help="seconds after which an unused session is closed")
    p.add_argument("--max-body-mb", type=float, default=d["max_body_mb"].default,
                   help="largest request body accepted (MiB)")
    p.add_argument("--pool-size", type=int, default=d["pool_size"].default, help="warm workers kept ready")
    p.add_argument("--timeout-cap", type=float, default=lim.timeout_s,
                   help="largest per-call timeout (s); a request's timeout is capped to it")
    p.add_argument("--max-output-chars", type=int, default=lim.max_output_chars,
                   help="stdout and stderr cap per call, each")
    p.add_argument("--memory-mb", type=int, default=lim.memory_mb, help="memory limit per sandbox (MiB)")
    p.add_argument("--quiet", action="store_true", help="no per-request log lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    try:
        config = ServerConfig(host=args.host, port=args.port, token=token,
                              no_auth=args.no_auth, allow_remote=args.allow_remote,
                              max_sessions=args.max_sessions, idle_timeout_s=args.idle_timeout,
                              max_body_mb=args.max_body_mb, pool_size=args.pool_size,
                              log_requests=not args.quiet)
        limits = SandboxLimits(timeout_s=args.timeout_cap, max_output_chars=args.max_output_chars,
                               memory_mb=args.memory_mb)
    except ValueError as e:
        print(f"deepeyesv2 sandbox-server: {e}", file=sys.stderr)
        return 2
    try:
        serve(config, limits)
    except OSError as e:  # the port is taken, the host cannot be bound, ...
        print(f"deepeyesv2 sandbox-server: cannot listen on {config.host}:{config.port}: {e}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
