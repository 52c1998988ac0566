"""Tool plumbing shared by every tool: the result type, the Tool protocol and the registry.

Tools never raise to the caller: every failure (bad arguments, unknown tool, a crashed sandbox,
an unreachable search server) comes back as a ``ToolResult`` with ``status`` "error" or
"timeout" and a one-line ``error`` the policy can read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from PIL import Image

if TYPE_CHECKING:
    from .sandbox import Session

STATUSES = ("ok", "error", "timeout")


@dataclass
class ToolResult:
    """What a tool call gives back to the episode loop.

    text: what goes back to the policy, already formatted and truncated.
    images: images the tool returned (shown by code, or image-search hits), RGB PIL images.
    status: "ok" | "error" | "timeout".
    error: one clear line for the policy when status != "ok", else None.
    latency_s: wall-clock seconds the call took.
    stdout, stderr: a code call's streams (None for other tools): the episode loop lays them out with its
    protocol profile's code template (`text` holds them in the "ours" layout).
    """

    text: str
    images: list[Image.Image] = field(default_factory=list)
    status: str = "ok"
    error: str | None = None
    latency_s: float = 0.0
    stdout: str | None = None
    stderr: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"ToolResult.status must be one of {STATUSES}, got {self.status!r}")


def error_result(message: str, started: float | None = None, status: str = "error",
                 text: str | None = None) -> ToolResult:
    """A failed call: ``text`` defaults to ``"Error: <message>"`` so the policy sees why."""
    latency = 0.0 if started is None else time.perf_counter() - started
    return ToolResult(text=f"Error: {message}" if text is None else text, images=[], status=status,
                      error=message, latency_s=latency)


@runtime_checkable
class Tool(Protocol):
    name: str

    def call(self, args: dict, session: Session) -> ToolResult: ...


class ToolRegistry:
    """Name -> tool. ``call`` never raises: unknown names and bad args become error results."""

    def __init__(self, tools: list[Tool]):
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        """Raises ValueError on a nameless tool or a name registered twice (a setup bug)."""
        name = getattr(tool, "name", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"tool {tool!r} has no string `name`")
        if not callable(getattr(tool, "call", None)):
            raise ValueError(f"tool {name!r} has no `call(args, session)` method")
        if name in self._tools:
            raise ValueError(f"tool {name!r} is registered twice")
        self._tools[name] = tool

    def names(self) -> list[str]:
        return list(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def call(self, name: str, args: dict, session: Session) -> ToolResult:
        started = time.perf_counter()
        tool = self._tools.get(name) if isinstance(name, str) else None
        if tool is None:
            return error_result(f"unknown tool {name!r}; available tools: {', '.join(self._tools)}",
                                started)
        if args is None:
            args = {}
        if not isinstance(args, dict):
            return error_result(f"arguments for tool {name!r} must be a JSON object, "
                                f"got {type(args).__name__}", started)
        try:
            result = tool.call(args, session)
        except Exception as e:  # noqa: BLE001 -- last guard: tools should not raise, but never crash the loop
            return error_result(f"tool {name!r} failed: {type(e).__name__}: {e}", started)
        if not isinstance(result, ToolResult):
            return error_result(f"tool {name!r} returned {type(result).__name__}, not ToolResult",
                                started)
        return result
