"""The "code" tool: runs ``{"code": str}`` in the episode's sandbox session (see sandbox.py)."""

from __future__ import annotations

import re
import time

from .base import ToolResult, error_result
from .sandbox import Session

_FENCE = re.compile(r"^\s*```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)\n?```\s*$", re.DOTALL)


def strip_fence(code: str) -> str:
    """``\u0060\u0060\u0060python ... \u0060\u0060\u0060`` -> the code inside; anything else unchanged."""
    m = _FENCE.match(code)
    return m.group(1) if m else code


class CodeTool:
    """``{"code": str}`` -> stdout/stderr text (``format_code_result``) + images shown by the code."""

    name = "code"

    def call(self, args: dict, session: Session) -> ToolResult:
        started = time.perf_counter()
        if not isinstance(args, dict) or "code" not in args:
            return error_result("the code tool needs an argument 'code' (a string of Python)",
                                started)
        code = args["code"]
        if not isinstance(code, str):
            return error_result(f"'code' must be a string of Python, got {type(code).__name__}",
                                started)
        if not isinstance(session, Session):
            return error_result("the code tool was called without a sandbox Session", started)
        return session.run_code(strip_fence(code))
