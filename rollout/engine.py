"""Generation engines: the `Engine` protocol and `EmbeddedEngine`, which runs the HF Qwen2.5-VL model in
process with a radix prefix KV cache.

EmbeddedEngine.generate, for a batch of requests:
1. per request: look up the longest cached prefix of its context (radix tree, images keyed by content
   hash), prefill only the rest with explicit M-RoPE positions (sliced from the full context's), and
   cache the context's K/V -- so later requests of the same group reuse it;
2. all requests decode together, one token per step for every unfinished sequence: contexts are
   left-aligned into one K/V buffer [B, Hk, Lmax + steps, D] per layer with a boolean attention mask;
3. every fed token's K/V is cached, so an episode's next turn prefills only what the environment added.

Log-probs are log_softmax(logits / T) in fp32 at the chosen token over the full vocabulary (see
SamplingParams), the trainer's quantity. The language model is called with a dict of explicit masks, so
transformers never builds its own (its mask-free path would crop keys to the query length when a cached
prefix is longer than the query).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from .chat import ChatProcessor, mrope_position_ids
from .qwen import image_embeddings
from .radix_cache import RadixCache, cache_key, image_hashes
from .types import GenerateRequest, GenerateResult, SamplingParams


@runtime_checkable
class Engine(Protocol):
    def generate(self, requests: list[GenerateRequest], sampling: SamplingParams) -> list[GenerateResult]: ...

    def update_weights(self, model: Any) -> None: ...

    def stats(self) -> dict: ...

    def clear_cache(self) -> None: ...

    def release_memory(self) -> None:
        """Hand the engine's device memory back for the training step (colocated; SGLang: KV pool and weights)."""
        ...

    def resume_memory(self) -> None:
        """Take it back after the step (the weights then come with the next `update_weights`)."""
        ...

    def shutdown(self) -> None:
        """Stop whatever the engine started (SGLang: its scheduler processes and GPU pools)."""
        ...


# -- shared helpers (also used by the SGLang adapter) ------------------------------------------------
def stop_token_sets(processor: ChatProcessor) -> tuple[set[int], dict[int, str]]:
    """(eos ids, other stop ids -> their text). <|im_end|> and eos end a turn normally; a vision token or
    a new <|im_start|> inside a turn can never be continued consistently, so generation stops there too
    (the episode loop then ends the episode; the token keeps its log-prob)."""
    tok = processor.tokenizer
    eos = {processor.im_end_id}
    for t in (tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")):
        if t is not None and t != tok.unk_token_id:
            eos.add(int(t))
    special = {}
    for name in ("<|im_start|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"):
        t = tok.convert_tokens_to_ids(name)
        if t is not None and t != tok.unk_token_id and t not in eos:
            special[int(t)] = name
    return eos, special


class StopChecker:
    """Decides after each new token whether a sequence is finished: eos -> "eos"; a special stop token or a
    stop string in the decoded new text -> "stop"; max_new tokens -> "length"."""

    def __init__(self, processor: ChatProcessor, stop: list[str]):
        self.processor = processor
        self.stop = [s for s in stop if s]
        self.eos, self.special = stop_token_sets(processor)
        # A stop string of c characters ends within the last c tokens (every token decodes to >= 1
        # character), so only a short tail is decoded per step instead of the whole turn.
        self.window = max((len(s) for s in self.stop), default=0) + 1

    def stop_string_end(self, ids: list[int]) -> tuple[int, str] | None:
        """(k, stop): the shortest prefix ids[:k] whose text contains a stop string, or None."""
        if not self.stop:
            return None
        text = self.processor.decode(ids)
        if not any(s in text for s in self.stop):
            return None
        lo, hi = 1, len(ids)  # containment is monotone in the prefix length: binary search
        while lo < hi:
            mid = (lo + hi) // 2
            if any(s in self.processor.decode(ids[:mid]) for s in self.stop):
                hi = mid
            else:
                lo = mid + 1
        text = self.processor.decode(ids[:lo])
        return lo, min((text.find(s), s) for s in self.stop if s in text)[1]

    def check(self, new_ids: list[int], max_new: int) -> tuple[str | None, str | None]:
        last = new_ids[-1]
        if last in self.eos:
            return "eos", self.processor.tokenizer.convert_ids_to_tokens(last)
        if last in self.special:
            return "stop", self.special[last]
        if self.stop:
            # Decoded text, not ids: a tag may be several tokens (real Qwen tokenizer) or one (tiny one).
            text = self.processor.decode(new_ids[-self.window :])
            hits = [(text.find(s), s) for s in self.stop if s in text]
            if hits:
                return "stop", min(hits)[1]
        if len(new_ids) >= max_new:
            return "length", None
        return None, None


def sample_tokens(
    logits: torch.Tensor, sampling: SamplingParams, generators: list[torch.Generator | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (tokens [B] int64, logprobs [B] fp32 of log_softmax(logits / T) at the tokens)."""
    logits = logits.float()
    scaled = logits / sampling.logprob_temperature
    logp = torch.log_softmax(scaled, dim=-1)
    if sampling.greedy:
        tokens = logits.argmax(dim=-1)
    else:
        filt = scaled.clone()
        if sampling.top_k > 0 and sampling.top_k < filt.shape[-1]:
            kth = torch.topk(filt, sampling.top_k, dim=-1).values[:, -1:]
            filt[filt < kth] = float("-inf")
        if sampling.top_p < 1.0:
            sorted_logits, order = filt.sort(dim=-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            # keep the smallest set whose mass reaches top_p (the first token always stays)
            drop_sorted = cum - sorted_logits.softmax(-1) >= sampling.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            filt[drop] = float("-inf")
        probs = filt.softmax(-1)
        tokens = torch.stack([torch.multinomial(probs[b], 1, generator=g)[0] for b, g in enumerate(generators)])
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


def request_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A per-request RNG on the logits' device (torch.multinomial needs the generator where the probs are)."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return g


class _BufferCache:
    """Stands in for transformers' Cache: K/V live in preallocated per-layer buffers [B, Hk, C, D]. A call
    writes the new tokens at columns [write, write + q) of `rows` and attends to columns [start, write + q)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], rows: slice | torch.Tensor, start: int, write: int):
        self.keys, self.values, self.rows, self.start, self.write = keys, values, rows, start, write

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        q = key_states.shape[2]
        kb, vb = self.keys[layer_idx], self.values[layer_idx]
        # Under autocast the keys arrive fp32 (RoPE multiplies by fp32 cos/sin) and the values bf16: store both
        # in the buffers' dtype (index_put with a tensor of rows refuses a dtype mismatch).
        kb[self.rows, :, self.write : self.write + q] = key_states.to(kb.dtype)
        vb[self.rows, :, self.write : self.write + q] = value_states.to(vb.dtype)
        return kb[self.rows, :, self.start : self.write + q], vb[self.rows, :, self.start : self.write + q]


class _Seq:
    """Per-request decoding state."""

    def __init__(self, req: GenerateRequest, key: list, max_new: int, next_pos: int, gen: torch.Generator):
        self.req, self.key, self.max_new, self.next_pos, self.gen = req, key, max_new, next_pos, gen
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.finish: str | None = None
        self.matched: str | None = None
        self.cached = 0


class EmbeddedEngine:
    """The HF model in process, with a radix prefix KV cache of `cache_tokens_budget` tokens (0 disables it).

    model: Qwen2_5_VLForConditionalGeneration (any dtype/device); processor: the ChatProcessor its
    tokenizer belongs to. Weights are shared with the trainer: `update_weights(model)` only re-points and
    drops the cache, whose K/V came from the old weights. `autocast_dtype` (e.g. torch.bfloat16): sample
    under autocast, K/V kept in that dtype -- the trainer passes the precision its forward passes use.
    """

    def __init__(self, model: Any, processor: ChatProcessor, cache_tokens_budget: int = 65536,
                 autocast_dtype: torch.dtype | None = None):
        self.model = model
        self.processor = processor
        self.autocast_dtype = autocast_dtype
        self.cache = RadixCache(cache_tokens_budget)
        self._stats = dict(tokens_prefilled=0, tokens_cached=0, tokens_decoded=0, requests=0, forward_calls=0)

    # -- Engine protocol --------------------------------------------------------------------------
    def update_weights(self, model: Any) -> None:
        self.model = model
        self.clear_cache()

    def clear_cache(self) -> None:
        self.cache.clear()

    # The embedded engine holds no memory of its own beyond the prefix cache (emptied by clear_cache before the
    # update) and shares the trainer's weights, so there is nothing to release, resume or stop.
    def release_memory(self) -> None:
        pass

    def resume_memory(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def stats(self) -> dict:
        return dict(self._stats, cache_tokens=self.cache.total_tokens, cache_evicted_tokens=self.cache.evicted_tokens)

    @torch.inference_mode()
    def generate(self, requests: list[GenerateRequest], sampling: SamplingParams) -> list[GenerateResult]:
        if not requests:
            return []
        if self.autocast_dtype is None:
            return self._generate(requests, sampling)
        with torch.autocast(self.model.lm_head.weight.device.type, dtype=self.autocast_dtype):
            return self._generate(requests, sampling)

    def _generate(self, requests: list[GenerateRequest], sampling: SamplingParams) -> list[GenerateResult]:
        stopper = StopChecker(self.processor, sampling.stop)
        lm = self.model.model.language_model
        cfg = lm.config
        n_layers = cfg.num_hidden_layers
        hk = cfg.num_key_value_heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        device = self.model.lm_head.weight.device
        dtype = self.autocast_dtype or self.model.lm_head.weight.dtype

        seqs, positions = [], []
        for i, req in enumerate(requests):
            seq, pos = self._prepare(i, req, sampling)
            seqs.append(seq)
            positions.append(pos)
        lens = [len(s.req.token_ids) for s in seqs]
        lmax = max(lens)
        steps = max(s.max_new for s in seqs)
        B = len(seqs)
        # Zeros, not empty: masked columns still enter SDPA's (0-weighted) sum, and garbage NaNs would leak.
        keys = [torch.zeros(B, hk, lmax + steps, hd, device=device, dtype=dtype) for _ in range(n_layers)]
        values = [torch.zeros_like(k) for k in keys]
        valid = torch.zeros(B, lmax + steps, dtype=torch.bool, device=device)

        first_logits = []
        for b, (seq, pos) in enumerate(zip(seqs, positions)):
            first_logits.append(self._prefill(b, seq, pos, keys, values, lmax))
            valid[b, lmax - lens[b] : lmax] = True
        self._choose(seqs, torch.stack(first_logits), sampling, stopper)

        col = lmax
        while True:
            active = [b for b, s in enumerate(seqs) if s.finish is None]
            if not active:
                break
            rows = slice(None) if len(active) == B else torch.tensor(active, device=device)
            tokens = torch.tensor([[seqs[b].ids[-1]] for b in active], device=device)
            pos = torch.tensor([seqs[b].next_pos + len(seqs[b].ids) - 1 for b in active], device=device)
            pos = pos.view(1, -1, 1).expand(3, -1, 1)
            valid[active, col] = True
            mask = valid[active, : col + 1][:, None, None, :]
            cache = _BufferCache(keys, values, rows, 0, col)
            logits = self._forward(lm.embed_tokens(tokens), pos, mask, cache)
            self._choose([seqs[b] for b in active], logits, sampling, stopper)
            col += 1

        results = []
        for b, seq in enumerate(seqs):
            # Every token but the last was fed through the model: its K/V is valid for the next turn.
            fed = len(seq.ids) - 1
            if self.cache.enabled and fed > 0:
                start = lmax - lens[b]
                kv = [(k[b, :, start : lmax + fed], v[b, :, start : lmax + fed]) for k, v in zip(keys, values)]
                self.cache.insert(seq.key + seq.ids[:fed], kv)
            self._stats["tokens_decoded"] += len(seq.ids)
            results.append(GenerateResult(seq.ids, seq.logprobs, seq.finish, seq.matched, seq.cached))
        self._stats["requests"] += B
        return results

    # -- internals ----------------------------------------------------------------------------------
    def _prepare(self, i: int, req: GenerateRequest, sampling: SamplingParams) -> tuple[_Seq, torch.Tensor]:
        p = self.processor
        ids = list(req.token_ids)
        if not ids:
            raise ValueError(f"request {i}: empty token_ids")
        grids = req.image_grid_thw
        n_img = 0 if grids is None else int(grids.shape[0])
        keys = req.image_keys if req.image_keys is not None else image_hashes(req.pixel_values, grids)
        if len(keys) != n_img:
            raise ValueError(f"request {i}: {len(keys)} image_keys for {n_img} images")
        try:
            pos = mrope_position_ids(torch.tensor(ids), grids, p.image_pad_id, p.merge_size)
            key = cache_key(ids, p.image_pad_id, keys, [p.num_image_tokens(g) for g in (grids if n_img else [])])
        except ValueError as e:
            raise ValueError(f"request {i}: {e}") from None
        max_new = sampling.max_new_tokens if req.max_new_tokens is None else min(req.max_new_tokens, sampling.max_new_tokens)
        if req.forced_tokens is not None:
            if not req.forced_tokens:
                raise ValueError(f"request {i}: forced_tokens is empty")
            max_new = min(max_new, len(req.forced_tokens))
        if max_new < 1:
            raise ValueError(f"request {i}: max_new_tokens must be >= 1, got {max_new}")
        seed = req.seed if req.seed is not None else (None if sampling.seed is None else sampling.seed + i)
        gen = None if sampling.greedy or req.forced_tokens is not None else request_generator(seed, self.model.lm_head.weight.device)
        return _Seq(req, key, max_new, int(pos.max()) + 1, gen), pos

    def _forward(self, embeds: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, cache: _BufferCache) -> torch.Tensor:
        """embeds [b, q, H]; pos [3, b, q]; mask [b, 1, q, K] bool -> next-token logits [b, V] fp32 (last position)."""
        lm = self.model.model.language_model
        masks = {t: mask for t in set(lm.config.layer_types)}
        out = lm(inputs_embeds=embeds, position_ids=pos, attention_mask=masks, cache=cache, use_cache=False)
        self._stats["forward_calls"] += 1
        h = out.last_hidden_state[:, -1]
        if self.autocast_dtype is None:
            return self.model.lm_head(h).float()
        # fp32 logits like the trainer's fused kernel (which runs outside autocast): the sampling-time
        # log-probs are the old policy's, and a bf16 lm_head would put the first ratio off 1
        with torch.autocast(h.device.type, enabled=False):
            return self.model.lm_head(h.float()).float()

    def _prefill(self, b: int, seq: _Seq, pos: torch.Tensor, keys: list, values: list, lmax: int) -> torch.Tensor:
        """Prefill request b into row b of the buffers (context right-aligned at lmax); logits of its last token."""
        ids = seq.req.token_ids
        L = len(ids)
        # At least one token is always recomputed: its logits start the turn.
        m, kv = self.cache.match(seq.key[: L - 1])
        start = lmax - L
        if kv is not None:
            for l, (k, v) in enumerate(kv):
                keys[l][b, :, start : start + m] = k
                values[l][b, :, start : start + m] = v
        seq.cached = m
        n = L - m
        device = keys[0].device
        embeds = self._embed(torch.tensor(ids, device=device), m, seq.req)
        causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        mask = torch.cat([torch.ones(n, m, dtype=torch.bool, device=device), causal], dim=1)[None, None]
        cache = _BufferCache(keys, values, slice(b, b + 1), start, start + m)
        logits = self._forward(embeds[None], pos[:, None, m:].to(device), mask, cache)[0]
        self._stats["tokens_prefilled"] += n
        self._stats["tokens_cached"] += m
        if self.cache.enabled:
            self.cache.insert(seq.key, [(k[b, :, start:lmax], v[b, :, start:lmax]) for k, v in zip(keys, values)])
        return logits

    def _embed(self, ids: torch.Tensor, m: int, req: GenerateRequest) -> torch.Tensor:
        """Input embeddings of ids[m:] [n, H], with image features in the pads of images overlapping them."""
        model = self.model
        embeds = model.model.get_input_embeddings()(ids[m:])
        grids = req.image_grid_thw
        if grids is None or grids.shape[0] == 0:
            return embeds
        pad_pos = (ids == self.processor.image_pad_id).nonzero()[:, 0]
        counts = [self.processor.num_image_tokens(g) for g in grids]
        patches = [int(x) for x in grids.prod(-1)]
        pix = req.pixel_values.split(patches)
        need, offsets, o = [], [], 0
        for i, c in enumerate(counts):
            if c and int(pad_pos[o + c - 1]) >= m:  # the image's last pad is among the new tokens
                need.append(i)
            offsets.append(o)
            o += c
        if not need:
            return embeds
        dev = embeds.device
        feats = image_embeddings(model, torch.cat([pix[i] for i in need]).to(dev), grids[need].to(dev)).to(embeds.dtype)
        slots, rows, f = [], [], 0
        for i in need:
            p = pad_pos[offsets[i] : offsets[i] + counts[i]]
            keep = p >= m
            slots.append(p[keep] - m)
            rows.append(torch.arange(f, f + counts[i], device=dev)[keep.to(dev)])
            f += counts[i]
        embeds = embeds.clone()
        embeds[torch.cat(slots).to(dev)] = feats[torch.cat(rows)]
        return embeds

    def _choose(self, seqs: list[_Seq], logits: torch.Tensor, sampling: SamplingParams, stopper: StopChecker) -> None:
        """Pick the next token of each sequence (sampled or forced), record its log-prob, check stops."""
        free = [j for j, s in enumerate(seqs) if s.req.forced_tokens is None]
        sampled = {}
        if free:
            tokens, logp = sample_tokens(logits[free], sampling, [seqs[j].gen for j in free])
            sampled = {j: (int(t), float(l)) for j, t, l in zip(free, tokens.tolist(), logp.tolist())}
        lp_all = None
        for j, seq in enumerate(seqs):
            if j in sampled:
                tok, lp = sampled[j]
            else:
                tok = int(seq.req.forced_tokens[len(seq.ids)])
                if lp_all is None:
                    lp_all = torch.log_softmax(logits.float() / sampling.logprob_temperature, dim=-1)
                lp = float(lp_all[j, tok])
            seq.ids.append(tok)
            seq.logprobs.append(lp)
            seq.finish, seq.matched = stopper.check(seq.ids, seq.max_new)


class ScriptedEngine:
    """A policy that says what a script tells it: turn text for each request comes from `script(tag)`
    (the episode loop's RequestTag), tokenized and teacher-forced through `engine`, which still returns
    the model's log-probs of those tokens. Deterministic rollouts for tests and benchmarks."""

    def __init__(self, engine: Engine, processor: ChatProcessor, script: Callable[[Any], str]):
        self.engine, self.processor, self.script = engine, processor, script

    def generate(self, requests: list[GenerateRequest], sampling: SamplingParams) -> list[GenerateResult]:
        forced = []
        for r in requests:
            ids = self.processor.encode(self.script(r.tag))
            forced.append(GenerateRequest(**{**r.__dict__, "forced_tokens": ids}))
        return self.engine.generate(forced, sampling)

    def update_weights(self, model: Any) -> None:
        self.engine.update_weights(model)

    def stats(self) -> dict:
        return self.engine.stats()

    def clear_cache(self) -> None:
        self.engine.clear_cache()

    def release_memory(self) -> None:
        self.engine.release_memory()

    def resume_memory(self) -> None:
        self.engine.resume_memory()

    def shutdown(self) -> None:
        self.engine.shutdown()
