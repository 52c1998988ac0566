"""An LLM judge served over an OpenAI-compatible chat endpoint (vLLM or SGLang serving, e.g., Qwen2.5-72B-Instruct
as DeepEyesV2 does): `JudgeClient(question, pred, gold) -> 1.0 | 0.0` from the model's `\\boxed{yes}` / `\\boxed{no}`.

A verdict is asked once per (question, answer, gold): verdicts are cached (LRU, `judge.cache_size` entries) and
identical questions asked at the same time share one request. At most `judge.concurrency` requests are in flight;
each has a timeout and is retried with exponential backoff on connection errors, timeouts, HTTP 429 / 5xx, a body
that is not the chat-completion JSON, and a reply without a boxed verdict. A verdict that still fails is counted
(`judge_failures`, with its reason) and scored as `judge.on_failure` says: `rules` (the rule matcher's score,
`deepeyesv2.rewards.match_answer` with answer_type auto) or `zero` -- never an exception into the RL step, never
a silent 0. `take_stats()` hands the counters since its last call to the step's metrics.

The request is the standard `POST {url}/chat/completions` with `model`, `messages`, `temperature`, `max_tokens`;
the transport is the standard library's `urllib.request` (one short-lived connection per request).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections import Counter, OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass

from .config import JUDGE_FAILURE_SCORES, JudgeConfig
from .rewards import match_answer

# Our wording; the boxed yes/no answer is DeepEyesV2's judge protocol.
JUDGE_SYSTEM = ("You grade answers. Compare a candidate answer with the reference answer to a question and decide "
                "whether the candidate is correct: it states the same fact, entity, number or choice as the reference "
                "(other wording, units written differently or extra explanation are fine; a different or an "
                "incomplete answer is not).")
JUDGE_TEMPLATE = ("Question: {question}\n\nReference answer: {gold}\n\nCandidate answer: {pred}\n\n"
                  "Is the candidate answer correct? Reason in one or two sentences, then give your verdict as "
                  "\\boxed{{yes}} or \\boxed{{no}}.")
_VERDICT = re.compile(r"\\boxed\{\s*(?:\\text\{\s*)?(yes|no)\s*\}?\s*\}", re.IGNORECASE)
MAX_BACKOFF_S = 30.0


def parse_verdict(text: str) -> float | None:
    """The last `\\boxed{yes}` / `\\boxed{no}` of a judge reply as 1.0 / 0.0 (`\\boxed{\\text{yes}}` too); None if none."""
    hits = _VERDICT.findall(text)
    return None if not hits else float(hits[-1].lower() == "yes")


def judge_messages(question: str, pred: str, gold: str) -> list[dict]:
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_TEMPLATE.format(question=question.strip() or "(not given)",
                                                               gold=gold.strip(), pred=pred.strip())}]


def chat_url(url: str) -> str:
    """`http://host:8000/v1` -> `http://host:8000/v1/chat/completions` (a full `.../chat/completions` URL is kept)."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


@dataclass(frozen=True)
class Verdict:
    """score: 1.0 (yes), 0.0 (no), None (the judge failed: `reason` says why, after `attempts` requests)."""

    score: float | None
    reason: str = ""
    attempts: int = 1


class _Failed(Exception):
    """One attempt failed; `retry`: whether another attempt may succeed."""

    def __init__(self, reason: str, retry: bool):
        super().__init__(reason)
        self.reason, self.retry = reason, retry


class JudgeClient:
    """judge(question, pred, gold) -> score in [0, 1] through the endpoint of `cfg` (see the module docstring).
    Thread-safe: the reward of a batch is computed from a thread pool and every thread may call it."""

    def __init__(self, cfg: JudgeConfig, api_key: str | None = None):
        if not cfg.url:
            raise ValueError("judge.url is empty: no judge endpoint to call")
        if not cfg.model:
            raise ValueError("judge.model is empty: name the served judge model (vLLM --served-model-name)")
        if cfg.on_failure not in JUDGE_FAILURE_SCORES:
            raise ValueError(f"judge.on_failure must be one of {JUDGE_FAILURE_SCORES}, got {cfg.on_failure!r}")
        if api_key is None and cfg.api_key_env:
            api_key = os.environ.get(cfg.api_key_env)
            if not api_key:
                raise ValueError(f"judge.api_key_env={cfg.api_key_env!r}: that environment variable is not set")
        self.cfg, self.endpoint, self._api_key = cfg, chat_url(cfg.url), api_key
        self._slots = threading.BoundedSemaphore(cfg.concurrency)
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        self._inflight: dict[tuple[str, str, str], Future] = {}
        self._counts: Counter = Counter()
        self._reasons: Counter = Counter()
        self._warned: set[str] = set()

    # -- the callback rewards call -----------------------------------------------------------------------
    def __call__(self, question: str, pred: str, gold: str) -> float:
        v = self.verdict(question, pred, gold)
        if v.score is not None:
            return v.score
        # counted in judge_failures by verdict(); scored as configured
        return match_answer(pred, gold, "auto") if self.cfg.on_failure == "rules" else 0.0

    def verdict(self, question: str, pred: str, gold: str) -> Verdict:
        """The cached verdict, the one an identical in-flight request gets, or a new request's."""
        key = (question, pred, gold)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                self._counts["cache_hits"] += 1
                return Verdict(self._cache[key])
            fut = self._inflight.get(key)
            owner = fut is None
            if owner:
                fut = self._inflight[key] = Future()
                self._counts["requests"] += 1
            else:
                self._counts["cache_hits"] += 1  # answered by the request already out: no request of its own
        if not owner:
            return fut.result()
        try:
            v = self._ask(key)
        except BaseException as e:  # a bug of ours, not the service's: the waiters see it too, then it propagates
            with self._lock:
                self._inflight.pop(key, None)
            fut.set_exception(e)
            raise
        with self._lock:
            self._inflight.pop(key, None)
            if v.score is None:
                self._counts["failures"] += 1
                self._reasons[v.reason] += 1
            elif self.cfg.cache_size > 0:
                self._cache[key] = v.score
                while len(self._cache) > self.cfg.cache_size:
                    self._cache.popitem(last=False)
        fut.set_result(v)
        if v.score is None:
            self._warn_once(v)
        return v

    def take_stats(self) -> dict[str, int]:
        """judge_requests (verdicts asked of the service), judge_retries (further attempts), judge_failures (verdicts
        that failed after every attempt), judge_cache_hits, since the last call; the counters restart at 0."""
        with self._lock:
            c, self._counts = self._counts, Counter()
        return {f"judge_{k}": int(c[k]) for k in ("requests", "retries", "failures", "cache_hits")}

    def failure_reasons(self) -> dict[str, int]:
        """Every failure reason seen so far and how often (e.g. {"timeout": 3, "http 500": 1})."""
        with self._lock:
            return dict(self._reasons)

    # -- the service ---------------------------------------------------------------------------------------
    def _ask(self, key: tuple[str, str, str]) -> Verdict:
        body = json.dumps({"model": self.cfg.model, "messages": judge_messages(*key),
                           "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens}).encode()
        reason, attempt = "", 0
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                with self._lock:
                    self._counts["retries"] += 1
                # exponential backoff with jitter, so that many callers failing together do not retry together
                time.sleep(min(MAX_BACKOFF_S, self.cfg.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0))
            try:
                with self._slots:
                    text = self._post(body)
                score = parse_verdict(text)
                if score is None:
                    raise _Failed("no boxed verdict", retry=True)
                return Verdict(score, attempts=attempt + 1)
            except _Failed as e:
                reason = e.reason
                if not e.retry:
                    break
        return Verdict(None, reason, attempts=attempt + 1)

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        req = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:  # before URLError: it is one
            # 429 and 5xx are the server's passing trouble; any other 4xx (bad model name, bad request) stays
            raise _Failed(f"http {e.code}", retry=e.code == 429 or e.code >= 500) from None
        except (TimeoutError, urllib.error.URLError, http.client.HTTPException, OSError) as e:
            timeout = isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError)
            raise _Failed("timeout" if timeout else f"connection: {type(e).__name__}", retry=True) from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Failed("bad response json", retry=True) from None
        if not isinstance(content, str):
            raise _Failed("bad response json", retry=True)
        return content

    def _warn_once(self, v: Verdict) -> None:
        with self._lock:
            if v.reason in self._warned:
                return
            self._warned.add(v.reason)
        warnings.warn(f"judge {self.endpoint}: a verdict failed ({v.reason}) after {v.attempts} attempt(s); "
                      f"scored by on_failure={self.cfg.on_failure!r} and counted in judge_failures (further failures "
                      "for this reason are counted, not shown)", RuntimeWarning, stacklevel=3)


def make_judge(cfg: JudgeConfig) -> JudgeClient | None:
    """The configured judge, or None when `judge.url` is empty (answers are then matched by rules only)."""
    return JudgeClient(cfg) if cfg.url else None
