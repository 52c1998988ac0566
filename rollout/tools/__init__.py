"""Tools the policy can call: a sandboxed stateful Python ("code"), text "search", "image_search".

Every tool returns a ``ToolResult`` and never raises to the episode loop.
"""

from .base import Tool, ToolRegistry, ToolResult
from .code import CodeTool, strip_fence
from .image_search import ImageHit, ImageIndex, ImageSearchTool
from .registry import default_registry
from .sandbox import (Isolation, SandboxError, SandboxLimits, SandboxPool, Session,
                      detect_isolation, format_code_result, isolation_report)
from .search import (HttpSearch, LocalBM25Search, SearchBackend, SearchError, SearchHit,
                     SearchTimeout, SearchTool, load_corpus)

__all__ = [
    "CodeTool", "HttpSearch", "ImageHit", "ImageIndex", "ImageSearchTool", "Isolation",
    "LocalBM25Search", "SandboxError", "SandboxLimits", "SandboxPool", "SearchBackend",
    "SearchError", "SearchHit", "SearchTimeout", "SearchTool", "Session", "Tool", "ToolRegistry",
    "ToolResult", "default_registry", "detect_isolation", "format_code_result",
    "isolation_report", "load_corpus", "strip_fence",
]
