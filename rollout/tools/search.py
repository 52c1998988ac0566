"""Text search: an offline BM25 backend over a local JSONL corpus, an HTTP backend, and the tool.

The tool's text is always wrapped as ``<tool_response>...</tool_response>`` (the episode loop adds
nothing), hits numbered as::

    <tool_response>
    [1] <title>
    <text, at most max_chars_per_hit chars>
    URL: <url>

    [2] ...
    </tool_response>
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from .base import ToolResult, error_result

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus.jsonl"


@dataclass
class SearchHit:
    title: str
    text: str
    url: str
    score: float


class SearchError(RuntimeError):
    """The backend failed (unreachable server, bad reply); the message is one clear line."""


class SearchTimeout(SearchError):
    pass


@runtime_checkable
class SearchBackend(Protocol):
    def search(self, query: str, k: int) -> list[SearchHit]: ...


def load_corpus(path: str | Path | None = None) -> list[dict]:
    """Read a JSONL corpus: one {"id", "title", "text", "url", ...} object per line.

    Extra fields are kept (the shipped corpus has ``kind`` and ``facts``: the attributes stated
    in ``text``, for building questions whose answers are in the corpus).
    """
    path = Path(path) if path is not None else DEFAULT_CORPUS
    if not path.is_file():
        raise ValueError(f"corpus file not found: {path}")
    docs = []
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            missing = [k for k in ("id", "title", "text", "url") if not isinstance(doc.get(k), str)]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing string field(s) {missing}")
            docs.append(doc)
    if not docs:
        raise ValueError(f"corpus file is empty: {path}")
    return docs


def _tokens(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class LocalBM25Search:
    """Offline BM25 (``bm25s``) over title + text of a local JSONL corpus."""

    def __init__(self, corpus_path: str | Path | None = None):
        import bm25s

        self.docs = load_corpus(corpus_path)
        self._index = bm25s.BM25()
        self._index.index(_tokens([f"{d['title']}\n{d['text']}" for d in self.docs]),
                          show_progress=False)

    def search(self, query: str, k: int) -> list[SearchHit]:
        if not isinstance(query, str) or not query.strip():
            raise ValueError("query must be a non-empty string")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        tokens = _tokens([query])
        if not tokens[0]:
            return []
        ids, scores = self._index.retrieve(tokens, k=min(k, len(self.docs)), show_progress=False)
        hits = []
        for i, score in zip(ids[0].tolist(), scores[0].tolist()):
            if score > 0:  # bm25s pads with zero-score documents when few terms match
                d = self.docs[i]
                hits.append(SearchHit(d["title"], d["text"], d["url"], float(score)))
        return hits


class HttpSearch:
    """POSTs {"query", "k"} as JSON to ``url``; expects {"results": [{title, text, url, score}]}
    (or a bare list of those). Errors and timeouts raise SearchError / SearchTimeout."""

    def __init__(self, url: str, timeout: float = 10.0):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"HttpSearch url must start with http:// or https://, got {url!r}")
        self.url, self.timeout = url, timeout

    def search(self, query: str, k: int) -> list[SearchHit]:
        body = json.dumps({"query": query, "k": k}).encode()
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                payload = json.loads(resp.read(16 << 20))
        except urllib.error.HTTPError as e:
            raise SearchError(f"search server {self.url} answered HTTP {e.code}") from None
        except (TimeoutError, socket.timeout):
            raise SearchTimeout(f"search server {self.url} did not answer within "
                                f"{self.timeout:g} s") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise SearchTimeout(f"search server {self.url} did not answer within "
                                    f"{self.timeout:g} s") from None
            raise SearchError(f"search server {self.url} unreachable: {e.reason}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SearchError(f"search server {self.url} sent invalid JSON: {e}") from None
        except OSError as e:
            raise SearchError(f"search server {self.url} failed: {e}") from None
        rows = payload.get("results") if isinstance(payload, dict) else payload
        if not isinstance(rows, list):
            raise SearchError(f"search server {self.url} reply has no 'results' list")
        try:
            return [SearchHit(str(r.get("title", "")), str(r.get("text", "")),
                              str(r.get("url", "")), float(r.get("score", 0.0)))
                    for r in rows[:k]]
        except (AttributeError, TypeError, ValueError) as e:
            raise SearchError(f"search server {self.url} sent malformed results: {e}") from None


def wrap_response(body: str) -> str:
    return f"<tool_response>\n{body}\n</tool_response>"


def format_hits(hits: list[SearchHit], max_chars_per_hit: int) -> str:
    parts = []
    for i, h in enumerate(hits, start=1):
        text = h.text if len(h.text) <= max_chars_per_hit else (
            h.text[:max_chars_per_hit] + f" [... truncated {len(h.text) - max_chars_per_hit} chars]")
        parts.append(f"[{i}] {h.title}\n{text}\nURL: {h.url}")
    return "\n\n".join(parts)


class SearchTool:
    """``{"query": str}`` -> the top ``k`` hits of ``backend``, wrapped in <tool_response>."""

    name = "search"

    def __init__(self, backend: SearchBackend, k: int = 5, max_chars_per_hit: int = 600):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"SearchTool k must be a positive int, got {k!r}")
        self.backend, self.k, self.max_chars_per_hit = backend, k, max_chars_per_hit

    def call(self, args: dict, session=None) -> ToolResult:
        started = time.perf_counter()
        query = args.get("query") if isinstance(args, dict) else None
        if not isinstance(query, str) or not query.strip():
            msg = ("search needs a non-empty string argument 'query'"
                   if not isinstance(args, dict) or "query" not in args or isinstance(query, str)
                   else f"search 'query' must be a string, got {type(query).__name__}")
            return error_result(msg, started, text=wrap_response(f"Error: {msg}"))
        try:
            hits = self.backend.search(query.strip(), self.k)
        except SearchTimeout as e:
            return error_result(str(e), started, status="timeout",
                                text=wrap_response(f"Error: {e}"))
        except Exception as e:  # noqa: BLE001 -- any backend failure becomes a tool error
            msg = str(e) if isinstance(e, (SearchError, ValueError)) else f"{type(e).__name__}: {e}"
            return error_result(msg, started, text=wrap_response(f"Error: {msg}"))
        body = format_hits(hits, self.max_chars_per_hit) if hits else f"No results for {query!r}."
        return ToolResult(text=wrap_response(body), images=[], status="ok", error=None,
                          latency_s=time.perf_counter() - started)
