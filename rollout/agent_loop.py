"""The async schedule of `run_episodes`: one coroutine per episode, no barrier between episodes.

    episode i:  request turn t --await engine.agenerate--> add the turn (mask 1, log-probs)
                --> tool call on the tool pool --await--> add the observation (mask 0) --> request turn t + 1 ...

Every episode's turn goes to the engine the moment its previous tool result is back, so a continuously batching
engine (EmbeddedEngine's scheduler, SGLang's) decodes whatever is ready while other episodes wait on tools, and
one slow search stalls only its own episode. The stages (`EpisodeRunner`: add_turn, call_tool / apply_tool,
add_observation) are the turn-synchronous schedule's, so the trajectory format, limits and stop reasons are the
same; a turn's seed comes from (sampling.seed, episode index, turn), so the order in which requests are batched
or tools return changes nothing but fp32 round-off.

The coroutines run on one event loop kept for the process (SGLang's tokenizer manager binds to the loop it first
runs in), driven by the calling thread: episode bookkeeping, warnings and the progress bar stay on the caller's
thread; only tool calls (and session closes) run on the tool pool's threads. One run at a time uses the loop.

Faults: an engine error on one request ends that episode (stage "generate", env_error); a tool call past
`tool_timeout_s` ends its episode (tool_error) and is abandoned (ToolPool.abandon). EngineShutdown -- the engine
stopped, not this request's fault -- and a malformed engine result end the whole call, as in turn_sync.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from .engine import Engine, EngineShutdown
from .tool_pool import ToolCall, ToolPool, close_quietly
from .types import SamplingParams

if TYPE_CHECKING:  # episode.py imports this module
    from .episode import EpisodeRunner, _Episode

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def run_on_loop(coro: Coroutine) -> Any:
    """Run `coro` to completion on the process's rollout event loop, in the calling thread."""
    global _loop
    with _loop_lock:
        if _loop is None or _loop.is_closed():
            _loop = asyncio.new_event_loop()
            atexit.register(_loop.close)
        return _loop.run_until_complete(coro)


def run_async(engine: Engine, runner: EpisodeRunner, episodes: list[_Episode], seeds: list[int],
              sampling: SamplingParams, tools: ToolPool, tool_timeout_s: float | None, bar) -> None:
    """Advance every episode to its end, each on its own (see module doc). Episodes are updated in place."""
    run_on_loop(_all_episodes(engine, runner, episodes, seeds, sampling, tools, tool_timeout_s, bar))
    if all(ep.error is not None and ep.error.startswith("generate:") and not ep.turn_spans for ep in episodes):
        # not one request was served: the engine cannot generate at all (e.g. not running), not one bad request
        raise RuntimeError(f"the engine failed every episode's first request; the first: {episodes[0].error}")


async def _all_episodes(engine, runner, episodes, seeds, sampling, tools, tool_timeout_s, bar) -> None:
    tasks = [asyncio.ensure_future(_episode(engine, runner, ep, seed, sampling, tools, tool_timeout_s, bar))
             for ep, seed in zip(episodes, seeds)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        # One episode's loop raised (the engine's bug or shutdown): stop the others before the loop is left, so
        # none is left pending on the shared loop; their in-flight engine requests are cancelled with them.
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _episode(engine: Engine, runner: EpisodeRunner, ep: _Episode, seed: int, sampling: SamplingParams,
                   tools: ToolPool, tool_timeout_s: float | None, bar) -> None:
    loop = asyncio.get_running_loop()
    try:
        while True:
            req = ep.request(sampling, runner.limits, seed)
            if req is None:
                break
            try:
                res = await engine.agenerate(req, sampling)
            except EngineShutdown:
                raise
            except Exception as e:  # noqa: BLE001 -- this request's failure (its inputs, its forward) ends this episode only
                runner.fail(ep, "generate", e)
                break
            runner.apply_result(ep, res)
            if ep.done:
                break
            call = ToolCall(ep.pending, ep.session, ep.input_images)
            if call.action.kind == "invalid":  # no tool runs: the feedback is made here
                runner.apply_tool(ep, call, runner.call_tool(call))
            else:
                fut = tools.submit(runner.call_tool, call)
                waiter = asyncio.wrap_future(fut, loop=loop)
                done, _ = await asyncio.wait([waiter], timeout=tool_timeout_s)
                if not done:
                    waiter.cancel()  # the call itself keeps running; its late outcome is dropped
                    runner.tool_overdue(ep, call, fut, tools, tool_timeout_s)
                    break
                runner.apply_tool(ep, call, fut.result())
            if ep.done:
                break
    finally:
        runner.report([ep])
    # A finished episode gives its sandbox back now (a large batch would otherwise hold one worker per episode).
    session, ep.session = ep.session, None
    if session is not None:
        await loop.run_in_executor(tools.executor, close_quietly, session)
    bar.update(1)
