"""SGLang engine adapter (GPU): `sgl.Engine` in process, RadixAttention prefix cache, multi-turn by
re-submitting each episode's growing context as `input_ids` (+ its images as processor output).

SGLang's own radix cache does what EmbeddedEngine's does on CPU: the G samples of a group share the
prompt's prefill and each turn only prefills what the environment appended. Log-probs come back from
`return_logprob=True`; by default SGLang computes them after temperature scaling, i.e.
log_softmax(logits / T) -- the trainer's quantity. `SGLANG_RETURN_ORIGINAL_LOGPROB=1` would switch them to
the unscaled distribution and bias the importance ratio, so the adapter refuses to run with it.

Banned token sequences (a banned string of several tokens) go through SGLang's custom logit processor
(`BannedSequences`, sampling.mask_banned_sequences; the engine starts with enable_custom_logit_processor); single
banned tokens through logit_bias.

`sglang` is imported lazily in __init__; pass `engine=` to inject a stand-in (tests use a fake backed by
the tiny HF model).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .qwen import ChatProcessor
from .sampling import StopChecker, mask_banned_sequences, stop_token_sets
from .types import GenerateRequest, GenerateResult, SamplingParams


def banned_sequences_processor() -> str:
    """SGLang's serialized custom logit processor masking banned token sequences (imports sglang: GPU only)."""
    from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor

    class BannedSequences(CustomLogitProcessor):
        def __call__(self, logits, custom_param_list=None):
            return mask_banned_sequences(logits, custom_param_list)

    return BannedSequences.to_str()


def hf_to_checkpoint_name(name: str) -> str:
    """transformers >= 4.52 module names -> Qwen2.5-VL checkpoint names (what SGLang's loader reads)."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return "visual." + name[len("model.visual."):]
    return name


class SGLangEngine:
    """Engine protocol over `sglang.Engine`.

    model_path: checkpoint directory SGLang loads at start (weights are then pushed with update_weights);
    processor: the ChatProcessor whose token ids the requests use; engine: an already built sgl.Engine (or
    a stand-in with the same methods); engine_kwargs: forwarded to sgl.Engine (e.g. mem_fraction_static).
    """

    def __init__(
        self,
        model_path: str | None,
        processor: ChatProcessor,
        *,
        engine: Any = None,
        name_map: Callable[[str], str] = hf_to_checkpoint_name,
        update_bucket_bytes: int = 512 << 20,
        **engine_kwargs: Any,
    ):
        if os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true", "yes"):
            raise RuntimeError("SGLANG_RETURN_ORIGINAL_LOGPROB is set: SGLang would return log-probs before "
                               "temperature scaling, which biases the importance ratio; unset it")
        if engine is None:
            try:
                import sglang as sgl  # lazy: GPU-only package
            except ImportError:
                raise RuntimeError("SGLangEngine needs the `sglang` package, which is not installed "
                                   "(pip install sglang on a CUDA machine; use EmbeddedEngine on CPU)") from None
            if not torch.cuda.is_available():
                raise RuntimeError("SGLangEngine needs a CUDA GPU and none is available; use EmbeddedEngine on CPU")
            if model_path is None:
                raise ValueError("SGLangEngine: model_path is required when no engine is given")
            engine_kwargs.setdefault("enable_memory_saver", True)  # release/resume_memory need it
            engine_kwargs.setdefault("enable_custom_logit_processor", True)  # banned token sequences need it
            engine = sgl.Engine(model_path=str(model_path), **engine_kwargs)
        self.engine = engine
        self.processor = processor
        self.name_map = name_map
        self.update_bucket_bytes = update_bucket_bytes
        self.eos, self.special = stop_token_sets(processor)
        self._stats = dict(tokens_prefilled=0, tokens_cached=0, tokens_decoded=0, requests=0)
        self._submitter: ThreadPoolExecutor | None = None  # made by the first submit
        self._ban_processor: str | None = None  # banned_sequences_processor(), made by the first request needing it

    # -- Engine protocol --------------------------------------------------------------------------
    def generate(self, requests: list[GenerateRequest], sampling: SamplingParams) -> list[GenerateResult]:
        if not requests:
            return []
        for i, r in enumerate(requests):
            self._check(r, f"request {i}")
        params = [self._sampling_params(r, sampling) for r in requests]
        images = [self._image_data(r) for r in requests]
        out = self.engine.generate(
            input_ids=[list(r.token_ids) for r in requests],
            sampling_params=params,
            return_logprob=True,
            image_data=images if any(x is not None for x in images) else None,
            **self._processor_kwargs(sampling, len(requests)),
        )
        if isinstance(out, dict):
            out = [out]
        if len(out) != len(requests):
            raise RuntimeError(f"sglang returned {len(out)} outputs for {len(requests)} requests")
        stopper = StopChecker(self.processor, sampling.stop)
        return [self._result(o, p["max_new_tokens"], stopper) for o, p in zip(out, params)]

    async def agenerate(self, request: GenerateRequest, sampling: SamplingParams) -> GenerateResult:
        """One request through sgl.Engine.async_generate (SGLang batches concurrent ones itself). Use one event
        loop for all calls: SGLang's tokenizer manager binds to the loop it first runs in."""
        self._check(request, "request")
        params = self._sampling_params(request, sampling)
        images = self._image_data(request)
        out = await self.engine.async_generate(input_ids=list(request.token_ids), sampling_params=params,
                                               return_logprob=True, image_data=images,
                                               **self._processor_kwargs(sampling, None))
        return self._result(out, params["max_new_tokens"], StopChecker(self.processor, sampling.stop))

    def submit(self, request: GenerateRequest, sampling: SamplingParams) -> Future:
        """`generate([request])` on a one-thread executor: requests submitted this way run one after another
        (no batching between them); for concurrency use `generate` with a batch, or `agenerate`."""
        if self._submitter is None:
            self._submitter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="SGLangEngine-submit")
        return self._submitter.submit(lambda: self.generate([request], sampling)[0])

    def update_weights(self, model: Any) -> None:
        """Push all of the policy's weights (bucketed) and flush the prefix cache once.

        Frozen ones too: `release_memory` frees SGLang's copy of the weights as well (memory saver), so after
        `resume_memory` every tensor must come back -- and the trainer may hand over a frozen replica (FSDP2)."""
        named = [(self.name_map(n), p.detach()) for n, p in model.named_parameters()]
        if not named:
            raise ValueError("update_weights: the model has no parameters to send")
        buckets, cur, size = [], [], 0
        for name, t in named:
            nbytes = t.numel() * t.element_size()
            if cur and size + nbytes > self.update_bucket_bytes:
                buckets.append(cur)
                cur, size = [], 0
            cur.append((name, t))
            size += nbytes
        buckets.append(cur)
        for i, bucket in enumerate(buckets):
            # K/V computed with the old weights are stale: the last bucket flushes the radix cache.
            self.engine.update_weights_from_tensor(bucket, flush_cache=(i == len(buckets) - 1))

    def stats(self) -> dict:
        return dict(self._stats)

    def clear_cache(self) -> None:
        """Drop every cached prefix (the KV pool itself stays allocated; see release_memory)."""
        self.engine.flush_cache()

    # -- memory hooks around the training step --------------------------------------------------------
    def release_memory(self, tags: list[str] | None = None) -> None:
        """Free GPU memory (KV cache and weights, or `tags`) while the trainer runs."""
        self.engine.release_memory_occupation(tags=tags)

    def resume_memory(self, tags: list[str] | None = None) -> None:
        self.engine.resume_memory_occupation(tags=tags)

    def shutdown(self) -> None:
        if self._submitter is not None:
            self._submitter.shutdown(wait=True)
            self._submitter = None
        self.engine.shutdown()

    # -- internals ----------------------------------------------------------------------------------
    @staticmethod
    def _check(r: GenerateRequest, label: str) -> None:
        if not r.token_ids:
            raise ValueError(f"{label}: empty token_ids")
        if r.forced_tokens is not None:
            raise ValueError(f"{label}: SGLangEngine cannot teacher-force tokens; use EmbeddedEngine")

    def _sampling_params(self, r: GenerateRequest, sampling: SamplingParams) -> dict:
        max_new = sampling.max_new_tokens if r.max_new_tokens is None else min(r.max_new_tokens, sampling.max_new_tokens)
        params = dict(
            temperature=float(sampling.temperature),
            top_p=float(sampling.top_p),
            top_k=int(sampling.top_k) if sampling.top_k > 0 else -1,  # sglang: -1 disables top-k
            max_new_tokens=int(max_new),
            stop=list(sampling.stop),
            stop_token_ids=sorted(self.eos | set(self.special)),
            skip_special_tokens=False,
            spaces_between_special_tokens=False,
            no_stop_trim=True,
        )
        if sampling.banned_sequences:  # masked by BannedSequences (custom logit processor) from the context
            params["custom_params"] = {"banned_sequences": [list(q) for q in sampling.banned_sequences]}
        if sampling.banned_token_ids:  # never drawn (SGLang adds the bias to the logits before sampling)
            params["logit_bias"] = {str(int(t)): -1e9 for t in sampling.banned_token_ids}
        seed = r.seed if r.seed is not None else sampling.seed
        if seed is not None and not sampling.greedy:
            params["sampling_seed"] = int(seed) & 0x7FFF_FFFF
        return params

    def _processor_kwargs(self, sampling: SamplingParams, batch: int | None) -> dict:
        """custom_logit_processor for a request (batch None) or a batch, when sampling bans token sequences."""
        if not sampling.banned_sequences:
            return {}
        if self._ban_processor is None:
            self._ban_processor = banned_sequences_processor()
        return {"custom_logit_processor": self._ban_processor if batch is None else [self._ban_processor] * batch}

    @staticmethod
    def _image_data(r: GenerateRequest) -> list[dict] | None:
        if r.image_grid_thw is None or r.image_grid_thw.shape[0] == 0:
            return None
        # The context's pads are already expanded (chat.py), so the images go in as processor output.
        return [dict(format="processor_output", pixel_values=r.pixel_values, image_grid_thw=r.image_grid_thw)]

    def _result(self, out: dict, max_new: int, stopper: StopChecker) -> GenerateResult:
        meta = out.get("meta_info", {})
        lp = meta.get("output_token_logprobs")
        if lp is None:
            raise RuntimeError("sglang output has no meta_info.output_token_logprobs (return_logprob ignored?)")
        ids = [int(t[1]) for t in lp]
        logprobs = [float(t[0]) for t in lp]
        if "output_ids" in out and list(out["output_ids"])[: len(ids)] != ids:
            raise RuntimeError("sglang output_ids and output_token_logprobs disagree")
        fin = meta.get("finish_reason") or {}
        kind, matched = fin.get("type"), fin.get("matched")
        # Our own stop rules decide, on the returned ids: a turn ends at the first stop token or at the
        # token completing the first stop string, whatever was generated after it.
        cut, finish, matched_text = len(ids), None, None
        for k, t in enumerate(ids):
            if t in self.eos or t in self.special:
                cut, finish = k + 1, ("eos" if t in self.eos else "stop")
                matched_text = self.processor.tokenizer.convert_ids_to_tokens(t) if t in self.eos else self.special[t]
                break
        hit = stopper.stop_string_end(ids[:cut])
        if hit is not None:
            cut, finish, matched_text = hit[0], "stop", hit[1]
        if finish is None:
            if kind == "length" or len(ids) >= max_new:
                finish = "length"
            elif kind == "stop" and isinstance(matched, str):
                finish, matched_text = "stop", matched
            elif kind == "stop":
                finish = "eos"
            else:
                raise RuntimeError(f"sglang finished a request with {fin!r}")
        ids, logprobs = ids[:cut], logprobs[:cut]
        prompt = int(meta.get("prompt_tokens", 0))
        cached = int(meta.get("cached_tokens", 0))
        self._stats["tokens_prefilled"] += prompt - cached
        self._stats["tokens_cached"] += cached
        self._stats["tokens_decoded"] += len(ids)
        self._stats["requests"] += 1
        return GenerateResult(ids, logprobs, finish, matched_text, cached)
