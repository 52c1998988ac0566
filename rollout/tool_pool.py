"""The tool pool of one `run_episodes` call: the threads tool calls run on, the calls in flight, and the calls
abandoned past their deadline (rollout/episode.py's stages make and apply the calls; both schedules use it)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image

from .protocol import Action
from .types import ToolCallRecord

if TYPE_CHECKING:
    from .episode import _Episode


class ToolCall:
    """One episode's tool call in flight: its action and the Session it runs in (made by the call when the
    episode has none yet -- the loop reads it from here, also when it abandons the call)."""

    def __init__(self, action: Action, session: Any, input_images: list[Image.Image]):
        self.action, self.session, self.input_images = action, session, input_images


@dataclass
class ToolOutcome:
    """One tool call's outcome, made on a tool-pool thread: its record, the observation's text and images, and
    the exception that ends the episode (else None)."""

    record: ToolCallRecord | None  # None: no call was made (a malformed action's feedback)
    text: str = ""
    images: list[Image.Image] = field(default_factory=list)
    error: BaseException | None = None


class ToolPool:
    """The threads tool calls run on (one run_episodes call's), and the calls abandoned past their deadline.

    An abandoned call keeps its thread until the tool returns (Python cannot stop a thread); its episode has
    ended, its session is closed (which ends a sandbox worker's call) and its late outcome is discarded -- a
    Session it created on the way is closed then. `close()` waits for the threads unless an abandoned call is
    still running after a grace period: then it warns once, and the pool's threads end as their calls return."""

    def __init__(self, workers: int):
        self.workers = workers
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rollout-tool")
        self.abandoned: list[Future] = []

    def submit(self, fn: Callable, *args) -> Future:
        return self.executor.submit(fn, *args)

    def abandon(self, ep: _Episode, call: ToolCall, fut: Future) -> None:
        """Give up on `fut` (ep's `call`): close its session now (on a pool thread: a Session's close may wait for
        the hung call), and again when the call returns (a session the call was still making then)."""
        self.abandoned.append(fut)
        ep.session = None
        if call.session is not None:
            self.executor.submit(close_quietly, call.session)

        def when_back(_: Future) -> None:
            if call.session is not None:
                close_quietly(call.session)

        fut.add_done_callback(when_back)

    def close(self, grace_s: float = 5.0) -> None:
        """Wait up to `grace_s` for abandoned calls to return (their sessions were closed, which ends a sandbox
        call at once), then for the threads -- unless a call is still running (see the class doc)."""
        running = [f for f in self.abandoned if not f.done()]
        if running:
            wait(running, timeout=grace_s)
            running = [f for f in running if not f.done()]
        if running:
            warnings.warn(f"{len(running)} tool call(s) still running past tool_timeout_s were abandoned; their "
                          "threads end when the tools return", RuntimeWarning, stacklevel=4)
        self.executor.shutdown(wait=not running)


def close_quietly(session: Any) -> None:
    """session.close(), its exception swallowed: closing must not mask the error that ended the episode."""
    try:
        session.close()
    except Exception:  # noqa: BLE001 -- closing must not mask the real error
        pass
