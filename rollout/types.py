"""Types that cross the rollout's module lines: sampling parameters, engine requests/results, trajectories."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from .protocol import OURS, SYSTEM_PROMPT

DEFAULT_STOP = OURS.stop
FINISH_REASONS = ("stop", "length", "eos")
# How an episode ended (Trajectory.stop_reason). tool_error: the tool call itself failed beyond what the tool
# reports to the policy (its sandbox would not start, the registry raised); env_error: the episode loop failed
# on this episode's data (decoding or parsing the policy's turn, encoding or processing the observation). Both
# record Trajectory.error, and end that episode only.
STOP_REASONS = ("answer", "max_turns", "max_tokens", "max_images", "no_action", "invalid_token", "tool_error",
                "env_error")


def logprob_temperature(temperature: float) -> float:
    """The temperature log-probs are scored at for a sampling temperature: T itself, or 1.0 when greedy (T == 0),
    where log_softmax(logits / 0) is undefined. The one rule engines and trainer share."""
    return 1.0 if temperature == 0 else float(temperature)


@dataclass
class SamplingParams:
    """How the policy samples one turn. temperature == 0 is greedy. top_k == 0 and top_p == 1 disable those
    filters. `stop` strings are matched on decoded text; `<|im_end|>` and eos always stop.

    Log-probs returned with samples are log_softmax(logits / T) at the sampled token, fp32, over the full
    vocabulary (top-k/top-p only restrict what is drawn), with T = temperature (1.0 when greedy): exactly the
    quantity the trainer recomputes, so the on-policy importance ratio is 1. `banned_token_ids` are never drawn
    (their logits are masked for the draw only, like the lm head's padding rows past the tokenizer, which the
    engines never draw either); log-probs still span every row, as the trainer's do. `banned_sequences`: token
    sequences never completed -- a sequence's last token is masked wherever the context (prompt and turn) ends
    with the rest of it (a banned string of several tokens; SGLang: through its custom logit processor).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=lambda: list(DEFAULT_STOP))
    seed: int | None = None
    banned_token_ids: tuple[int, ...] = ()
    banned_sequences: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(len(s) < 2 for s in self.banned_sequences):
            raise ValueError("sampling.banned_sequences must hold sequences of 2+ tokens (one token: banned_token_ids)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def logprob_temperature(self) -> float:
        return logprob_temperature(self.temperature)


@dataclass
class BatchingConfig:
    """How EmbeddedEngine's scheduler batches (see rollout/scheduler.py). The K/V slot pool holds at most
    max_running * max_seq_len tokens per layer; it is allocated lazily and grows to what the requests need."""

    max_running: int = 64  # sequences decoding at once (K/V pool slots); further requests wait for a free slot
    max_seq_len: int = 32768  # context + max new tokens one sequence may reach (a slot's length); longer requests fail
    prefill_tokens_per_step: int = 2048  # context tokens prefilled per scheduler step, all requests together; longer contexts are prefilled in chunks over several steps

    def __post_init__(self) -> None:
        for name, value in (("max_running", self.max_running), ("max_seq_len", self.max_seq_len),
                            ("prefill_tokens_per_step", self.prefill_tokens_per_step)):
            if value < 1:
                raise ValueError(f"batching.{name} must be >= 1, got {value}")


@dataclass
class GenerateRequest:
    """One sequence to continue.

    token_ids: the whole context so far [L]; pixel_values [P, D] fp32 and image_grid_thw [N, 3] for every
    image whose <|image_pad|> block is in the context, in order; image_keys: one content hash per image
    (computed from the pixels when None) -- it keys the image's pad tokens in the prefix cache.
    seed: per-request sampling seed (results then do not depend on how requests are batched).
    max_new_tokens: per-request cap below sampling.max_new_tokens (e.g. the episode's remaining budget).
    forced_tokens: teacher-force these tokens instead of sampling (their log-probs are still returned).
    tag: opaque caller data (e.g. (prompt, sample, turn)), passed through untouched.
    """

    token_ids: list[int]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    image_keys: list[int] | None = None
    seed: int | None = None
    max_new_tokens: int | None = None
    forced_tokens: list[int] | None = None
    tag: Any = None


@dataclass
class GenerateResult:
    """token_ids [n] new tokens (the stop tag / eos that ended the turn included); logprobs [n] fp32 values
    (see SamplingParams); finish_reason "stop" | "length" | "eos"; matched_stop: the stop string or stop
    token text that ended the turn; cached_tokens: context tokens served from the prefix cache."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    matched_stop: str | None = None
    cached_tokens: int = 0


@dataclass
class Prompt:
    """One task, as the trainer loads it and the episode loop runs it: the one prompt type of both packages.

    Either `messages` (chat.render_chat format, images by `<image>` placeholder or inline) or `question`
    (rendered as one user turn with the images first). `system` is used when the messages carry no system
    turn. `answer` is the gold answer (one string, or a list of accepted ones) with `answer_type` saying how
    rewards match it (deepeyesv2.rewards.ANSWER_TYPES); `category` groups evaluation results. `metadata`: any
    other fields of the record, passed through to every trajectory."""

    id: str
    question: str | None = None
    images: list[Any] = field(default_factory=list)
    answer: str | list[str] | None = None
    answer_type: str = "auto"
    category: str = ""
    messages: list[dict] | None = None
    system: str | None = SYSTEM_PROMPT
    metadata: dict = field(default_factory=dict)

    def chat_messages(self) -> list[dict]:
        if self.messages is not None:
            return self.messages
        if self.question is None:
            raise ValueError(f"prompt {self.id!r}: needs `messages` or `question`")
        return [{"role": "user", "content": "<image>" * len(self.images) + self.question}]


@dataclass
class ToolCallRecord:
    """One tool/code call: output is the tool's text reply before the episode loop truncates it (None when the
    loop did not record it)."""

    name: str
    args: dict
    status: str
    latency_s: float
    error: str | None = None
    output: str | None = None


@dataclass
class Trajectory:
    """One episode, ready for rewards and packing.

    token_ids [L]: prompt + all turns; loss_mask [L]: 1 only on tokens the policy sampled; sample_logprobs [L]:
    the sampling-time log-prob of those tokens (0 elsewhere); images: input images then tool-returned ones, in
    order of appearance, with pixel_values [P, D] fp32 / image_grid_thw [N, 3] int64 (None when no images);
    turn_spans: [start, end) of each policy turn in token_ids; tool_calls: one record per tool/code call;
    stop_reason: one of STOP_REASONS; error: "stage: ExceptionType: message (at file:line)" when the episode
    ended with tool_error / env_error, else None; answer: the text inside <answer>...</answer> (None if the
    episode did not answer); prompt: the Prompt it ran (the gold answer, its type, category and question, held
    once); metadata: the prompt's own extra fields.
    """

    token_ids: list[int]
    loss_mask: list[int]
    sample_logprobs: list[float]
    images: list[Image.Image]
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    turn_spans: list[tuple[int, int]]
    tool_calls: list[ToolCallRecord]
    stop_reason: str
    group_id: int
    prompt_len: int
    num_turns: int
    answer: str | None = None
    turn_texts: list[str] = field(default_factory=list)
    prompt_id: str = ""
    sample_index: int = 0
    metadata: dict = field(default_factory=dict)
    error: str | None = None
    prompt: Prompt | None = None

    def __len__(self) -> int:
        return len(self.token_ids)
