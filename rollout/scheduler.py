"""The embedded engine's scheduler: continuous batching of generation requests over a K/V slot pool.

One `step()`:
1. admit waiting requests while fewer than `max_running` sequences are prefilling or decoding. Requests whose
   whole context (tokens + image content hashes) is equal join one prefill job: the G samples of a group
   prefill their common prompt once, and each gets a copy of its K/V in its own slot (a fork);
2. prefill: up to `prefill_tokens_per_step` context tokens, given to the jobs first come first served, in one
   batched forward. A job starts with the radix prefix cache's longest match of its context (so an episode's
   next turn only prefills what the environment appended); a context longer than the budget is prefilled in
   chunks over several steps, so the decoding sequences keep stepping meanwhile. A job whose context is
   complete caches its K/V in the radix tree, moves its sequences into decode slots and picks their first
   tokens from the shared last-token logits;
3. decode: one token for every decoding sequence in one batched forward over the slot pool
   (rollout/kv_pool.py); a sequence that finishes is retired at once -- its fed tokens' K/V go to the radix
   cache, its slot is freed for the next request, its future gets the result.

A result depends only on (request, its seed, sampling): every sequence samples with its own generator, and
batching changes nothing but the rows a matmul runs on (fp32 round-off, no semantic dependence).
Per-request failures (a bad image, a context over `max_seq_len`) fail only that request; a failing batched
forward fails the requests in that forward.

Log-probs are log_softmax(logits / T) in fp32 at the chosen token over the full vocabulary (see
SamplingParams), the trainer's quantity. The language model is called with a dict of explicit masks, so
transformers never builds its own (its mask-free path would crop keys to the query length when a cached
prefix is longer than the query).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Hashable
from concurrent.futures import Future
from time import perf_counter
from typing import Any

import torch

from .qwen import ChatProcessor, image_embeddings, mrope_position_ids
from .kv_pool import KV, PrefillCache, SlotPool
from .radix_cache import RadixCache, cache_key, image_hashes
from .sampling import StopChecker, request_generator, sample_tokens, sequence_bans
from .types import BatchingConfig, GenerateRequest, GenerateResult, SamplingParams


# A context waits for another being prefilled when they share at least this many uncached tokens (one step of
# delay for it, against recomputing them).
SHARED_PREFIX_WAIT = 32


class Sequence:
    """One request in flight: its validated inputs and its decoding state."""

    def __init__(self, req: GenerateRequest, sampling: SamplingParams, stopper: StopChecker, key: list[Hashable],
                 positions: torch.Tensor, max_new: int, gen: torch.Generator | None, future: Future):
        self.req, self.sampling, self.stopper, self.key = req, sampling, stopper, key
        self.group_key = tuple(key)  # equal contexts share one prefill
        self.positions = positions  # [3, L] M-RoPE positions of the context
        self.max_new, self.gen, self.future = max_new, gen, future
        self.next_pos = int(positions.max()) + 1
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.finish: str | None = None
        self.matched: str | None = None
        self.cached = 0

    @property
    def context_len(self) -> int:
        return len(self.req.token_ids)

    @property
    def filled(self) -> int:
        """Tokens whose K/V the sequence's slot holds: the context and every new token but the last."""
        return self.context_len + len(self.ids) - 1

    def result(self) -> GenerateResult:
        return GenerateResult(self.ids, self.logprobs, self.finish, self.matched, self.cached)


class _Prefill:
    """One context being prefilled, for one or more sequences (the samples of a group)."""

    def __init__(self, seq: Sequence, device: torch.device):
        self.seqs = [seq]
        self.key, self.group_key = seq.key, seq.group_key
        self.req = seq.req  # equal keys imply equal images: the first request's pixels serve all
        self.positions = seq.positions
        self.ids = torch.tensor(seq.req.token_ids, device=device)
        self.length = seq.context_len
        self.cached = 0  # radix cache hit
        self.done = 0  # tokens whose K/V `kv` holds
        self.kv: KV | None = None
        self.embeds: torch.Tensor | None = None  # [length - cached, H], computed when the job starts
        self.buffer: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # K/V [1, Hk, length, D] when prefilled alone

    @property
    def started(self) -> bool:
        return self.embeds is not None


class Scheduler:
    """Admission, batched (chunked) prefill and batched decode over a SlotPool; driven by `step()` from one
    thread at a time (the engine's scheduler thread, or the caller's). `prepare` is safe from any thread."""

    def __init__(self, model: Any, processor: ChatProcessor, cache: RadixCache, config: BatchingConfig,
                 autocast_dtype: torch.dtype | None):
        self.model, self.processor, self.cache, self.config = model, processor, cache, config
        self.autocast_dtype = autocast_dtype
        self.waiting: deque[Sequence] = deque()
        self.prefills: list[_Prefill] = []
        self._by_key: dict[tuple, _Prefill] = {}
        self.running: list[Sequence] = []  # running[i] owns pool slot i
        self.pool: SlotPool | None = None
        self._stoppers: dict[tuple[str, ...], StopChecker] = {}
        self._resolved: list[tuple[Future, GenerateResult | None, BaseException | None]] = []
        self.counters = dict(tokens_prefilled=0, tokens_cached=0, tokens_shared=0, tokens_decoded=0, requests=0,
                             requests_failed=0, forward_calls=0, prefill_steps=0, decode_steps=0, prefill_s=0.0,
                             decode_s=0.0, idle_s=0.0)  # idle_s: written by the engine's scheduler thread

    # -- requests -------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def prepare(self, req: GenerateRequest, sampling: SamplingParams, label: str, future: Future) -> Sequence:
        """Validate a request and compute what does not need the model (positions, cache key, image hashes);
        raises ValueError naming `label`."""
        p = self.processor
        ids = list(req.token_ids)
        if not ids:
            raise ValueError(f"{label}: empty token_ids")
        grids = req.image_grid_thw
        n_img = 0 if grids is None else int(grids.shape[0])
        try:
            keys = req.image_keys if req.image_keys is not None else image_hashes(req.pixel_values, grids)
            if len(keys) != n_img:
                raise ValueError(f"{len(keys)} image_keys for {n_img} images")
            pos = mrope_position_ids(torch.tensor(ids), grids, p.image_pad_id, p.merge_size)
            key = cache_key(ids, p.image_pad_id, keys, [p.num_image_tokens(g) for g in (grids if n_img else [])])
        except ValueError as e:
            raise ValueError(f"{label}: {e}") from None
        max_new = sampling.max_new_tokens if req.max_new_tokens is None else min(req.max_new_tokens, sampling.max_new_tokens)
        if req.forced_tokens is not None:
            if not req.forced_tokens:
                raise ValueError(f"{label}: forced_tokens is empty")
            max_new = min(max_new, len(req.forced_tokens))
        if max_new < 1:
            raise ValueError(f"{label}: max_new_tokens must be >= 1, got {max_new}")
        if len(ids) + max_new > self.config.max_seq_len:
            raise ValueError(f"{label}: context of {len(ids)} tokens + {max_new} new tokens exceeds "
                             f"batching.max_seq_len={self.config.max_seq_len}")
        seed = req.seed if req.seed is not None else sampling.seed
        gen = None if sampling.greedy or req.forced_tokens is not None else request_generator(seed, self.device)
        stop = tuple(sampling.stop)
        stopper = self._stoppers.get(stop)
        if stopper is None:
            stopper = self._stoppers[stop] = StopChecker(p, list(stop))
        return Sequence(req, sampling, stopper, key, pos, max_new, gen, future)

    # -- state ------------------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefills or self.running)

    def gauges(self) -> dict:
        pool = self.pool
        return dict(requests_waiting=len(self.waiting), requests_prefilling=sum(len(j.seqs) for j in self.prefills),
                    requests_running=len(self.running), kv_slots_in_use=pool.n if pool else 0,
                    kv_pool_tokens=pool.slots * pool.length if pool else 0, kv_slot_moves=pool.moves if pool else 0)

    def set_model(self, model: Any) -> None:
        if self.has_work():
            raise RuntimeError("set_model: requests are in flight")
        self.model = model
        self.pool = None  # rebuilt from the new model's shapes, device and dtype

    def release_pool(self) -> None:
        if self.pool is not None:
            self.pool.release()

    def precision(self) -> contextlib.AbstractContextManager:
        """Autocast for a step (thread-local in torch: entered by whichever thread drives the scheduler)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _pool(self) -> SlotPool:
        if self.pool is None:
            cfg = self.model.model.language_model.config
            self.pool = SlotPool(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                                 self.autocast_dtype or self.model.lm_head.weight.dtype, self.device,
                                 self.config.max_running, self.config.max_seq_len)
        return self.pool

    # -- futures ------------------------------------------------------------------------------------------
    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        self.counters["requests_failed"] += 1
        self._resolved.append((seq.future, None, exc))

    def flush(self) -> None:
        """Resolve the futures decided so far -- after the bookkeeping, so a caller woken by its last result
        sees the slots already free."""
        done, self._resolved = self._resolved, []
        for fut, res, exc in done:
            if fut.cancelled():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(res)

    def fail_all(self, exc: BaseException) -> None:
        """Fail every request in flight (shutdown, or an error not attributable to some requests)."""
        for seq in self.waiting:
            self._fail(seq, exc)
        for job in self.prefills:
            for seq in job.seqs:
                self._fail(seq, exc)
        for seq in self.running:
            self._fail(seq, exc)
        self.waiting.clear()
        self.prefills.clear()
        self._by_key.clear()
        self.running.clear()
        if self.pool is not None:
            self.pool.clear()
        self.flush()

    # -- one step -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        try:
            self._admit()
            if self.prefills:
                self._prefill_step()
            if self.running:
                self._decode_step()
        finally:
            self.flush()

    def _admit(self) -> None:
        reserved = len(self.running) + sum(len(j.seqs) for j in self.prefills)
        while self.waiting and reserved < self.config.max_running:
            seq = self.waiting.popleft()
            if not seq.future.set_running_or_notify_cancel():
                continue  # cancelled while waiting
            job = self._by_key.get(seq.group_key)
            if job is None:
                job = self._by_key[seq.group_key] = _Prefill(seq, self.device)
                self.prefills.append(job)
            else:
                job.seqs.append(seq)
            reserved += 1

    def _drop(self, job: _Prefill, exc: BaseException | None) -> None:
        self.prefills.remove(job)
        del self._by_key[job.group_key]
        if exc is not None:
            for seq in job.seqs:
                self._fail(seq, exc)

    @staticmethod
    def _waits_for_shared_prefix(job: _Prefill, m: int, started: list[_Prefill]) -> bool:
        """Whether a job should start later: it shares at least SHARED_PREFIX_WAIT not yet cached tokens with a
        context being prefilled now (e.g. the system prompt of different prompts), which the radix cache will
        hold once that prefill completes. The old engine prefilled requests one after another, so later ones
        always found such prefixes cached; prefilling them side by side would compute them again."""
        end = m + SHARED_PREFIX_WAIT
        if job.length - 1 < end:
            return False
        probe = job.key[m:end]
        return any(other.length >= end and other.key[m:end] == probe and other.key[:m] == job.key[:m] for other in started)

    def _start(self, job: _Prefill, m: int, kv: KV | None) -> None:
        """Begin a job's prefill after its radix match (m tokens, their K/V)."""
        job.cached = job.done = m
        job.kv = kv
        job.embeds = self._embed(job.ids, m, job.req)
        self.counters["tokens_cached"] += m

    def _prefill_step(self) -> None:
        budget = self.config.prefill_tokens_per_step
        rows: list[tuple[_Prefill, int]] = []
        started = [job for job in self.prefills if job.started]
        for job in list(self.prefills):
            if budget == 0:
                break
            if not job.started:
                try:
                    # At least one token is always recomputed: its logits start the turn.
                    m, kv = self.cache.match(job.key[: job.length - 1])
                    if self._waits_for_shared_prefix(job, m, started):
                        continue
                    self._start(job, m, kv)
                except Exception as e:  # noqa: BLE001 -- this request's inputs (e.g. its images) are bad
                    self._drop(job, e)
                    continue
                started.append(job)
            q = min(job.length - job.done, budget)
            rows.append((job, q))
            budget -= q
        if not rows:
            return
        t0 = perf_counter()
        try:
            h = self._prefill_forward(rows)
            complete = [b for b, (job, _) in enumerate(rows) if job.done == job.length]
            logits = self._logits(h[complete, torch.tensor([rows[b][1] - 1 for b in complete])]) if complete else None
        except Exception as e:  # noqa: BLE001 -- fails the requests of this forward only
            for job, _ in rows:
                self._drop(job, e)
            return
        finally:
            self.counters["prefill_s"] += perf_counter() - t0
            self.counters["prefill_steps"] += 1
        for i, b in enumerate(complete):
            job = rows[b][0]
            self._drop(job, None)
            if self.cache.enabled:
                self.cache.insert(job.key, job.kv)
            self._start_decoding(job, logits[i])

    def _prefill_forward(self, rows: list[tuple[_Prefill, int]]) -> torch.Tensor:
        """One forward over chunks of several contexts -> hidden states [P, qmax, H].

        Each row's K/V so far is right-aligned to column S = the longest of them, its chunk written at
        [S, S + q). Several rows: their earlier K/V are copied into buffers made for this step (bounded by the
        prefilling contexts). One row -- the common case of a long context prefilled in chunks, which takes the
        whole budget -- uses a buffer of its full context length kept across its chunks: nothing copied.
        Padded query positions attend to their own (finite) padded keys, which no real query sees: no
        all-masked row, no NaN in a buffer."""
        dev = self.device
        P = len(rows)
        S = max(job.done for job, _ in rows)
        qmax = max(q for _, q in rows)
        if P == 1:
            job = rows[0][0]
            if job.buffer is None:
                job.buffer = self._buffers(1, job.length)
                self._copy_in(job, job.buffer, 0, S)
            keys, values = job.buffer
        else:
            keys, values = self._buffers(P, S + qmax)
            for b, (job, _) in enumerate(rows):
                self._copy_in(job, (keys, values), b, S)
                job.buffer = None  # its K/V now continue in this step's buffers
        embeds = torch.zeros(P, qmax, rows[0][0].embeds.shape[-1], device=dev, dtype=rows[0][0].embeds.dtype)
        pos = torch.zeros(3, P, qmax, dtype=torch.long)
        for b, (job, q) in enumerate(rows):
            off = job.done - job.cached
            embeds[b, :q] = job.embeds[off : off + q]
            pos[:, b, :q] = job.positions[:, job.done : job.done + q]
            pos[:, b, q:] = job.positions[:, job.done + q - 1 : job.done + q]
        cols = torch.arange(S + qmax, device=dev)
        lo = torch.tensor([S - job.done for job, _ in rows], device=dev)
        qi = torch.arange(qmax, device=dev)
        mask = (cols[None, None, :] >= lo[:, None, None]) & (cols[None, None, :] <= S + qi[None, :, None])
        h = self._forward(embeds, pos.to(dev), mask[:, None], PrefillCache(keys, values, S))
        for b, (job, q) in enumerate(rows):
            job.kv = [(kb[b, :, S - job.done : S + q], vb[b, :, S - job.done : S + q]) for kb, vb in zip(keys, values)]
            job.done += q
            self.counters["tokens_prefilled"] += q
        return h

    def _buffers(self, rows: int, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Zeroed per-layer K/V [rows, Hk, length, D] (zeros: masked columns still enter SDPA's 0-weighted sum)."""
        cfg = self.model.model.language_model.config
        dtype = self.autocast_dtype or self.model.lm_head.weight.dtype
        shape = (rows, cfg.num_key_value_heads, length, cfg.hidden_size // cfg.num_attention_heads)
        keys = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        return keys, [torch.zeros_like(k) for k in keys]

    @staticmethod
    def _copy_in(job: _Prefill, buffers: tuple[list[torch.Tensor], list[torch.Tensor]], row: int, end: int) -> None:
        """The job's K/V so far into columns [end - done, end) of buffers' row."""
        if job.done:
            for (k, v), kb, vb in zip(job.kv, *buffers):
                kb[row, :, end - job.done : end] = k
                vb[row, :, end - job.done : end] = v

    def _start_decoding(self, job: _Prefill, logits: torch.Tensor) -> None:
        """A prefilled context's sequences take decode slots (each a copy of the context's K/V) and their
        first tokens."""
        pool = self._pool()
        first = len(self.running)
        for g, seq in enumerate(job.seqs):
            pool.append(job.kv, job.length, seq.context_len + seq.max_new)
            self.running.append(seq)
            if g == 0:
                seq.cached = job.cached
            else:  # forked: its whole context came from the group's shared prefill
                seq.cached = job.length
                self.counters["tokens_cached"] += job.length
                self.counters["tokens_shared"] += job.length
        self._choose(job.seqs, logits.expand(len(job.seqs), -1))
        self._retire([i for i in range(first, len(self.running)) if self.running[i].finish is not None])

    def _decode_step(self) -> None:
        seqs = self.running
        dev = self.device
        t0 = perf_counter()
        try:
            lm = self.model.model.language_model
            tokens = torch.tensor([[s.ids[-1]] for s in seqs], device=dev)
            pos = torch.tensor([s.next_pos + len(s.ids) - 1 for s in seqs], device=dev).view(1, -1, 1).expand(3, -1, 1)
            cache = self._pool().decode_cache([s.filled for s in seqs])
            mask = torch.arange(cache.width, device=dev)[None, :] <= cache.cols[:, None]
            h = self._forward(lm.embed_tokens(tokens), pos, mask[:, None, None, :], cache)
            self._choose(seqs, self._logits(h[:, -1]))
        except Exception as e:  # noqa: BLE001 -- fails the requests of this forward
            for seq in seqs:
                self._fail(seq, e)
            self.running = []
            self.pool.clear()
            return
        finally:
            self.counters["decode_s"] += perf_counter() - t0
            self.counters["decode_steps"] += 1
        self._retire([i for i, s in enumerate(seqs) if s.finish is not None])

    def _retire(self, idxs: list[int]) -> None:
        """Finished sequences leave at once: their fed tokens' K/V go to the prefix cache, their slots are freed
        (highest first, so the slot-filling move never picks a sequence still to be retired)."""
        pool = self.pool
        for i in sorted(idxs, reverse=True):
            seq = self.running[i]
            fed = len(seq.ids) - 1
            if self.cache.enabled and fed > 0:
                self.cache.insert(seq.key + seq.ids[:fed], pool.kv(i, seq.filled))
            last = self.running.pop()
            pool.remove(i, last.filled)
            if last is not seq:
                self.running[i] = last
            self.counters["tokens_decoded"] += len(seq.ids)
            self.counters["requests"] += 1
            self._resolved.append((seq.future, seq.result(), None))

    # -- model calls ------------------------------------------------------------------------------------------
    def _forward(self, embeds: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
        """embeds [b, q, H]; pos [3, b, q]; mask [b, 1, q, K] bool -> last hidden states [b, q, H]."""
        lm = self.model.model.language_model
        masks = {t: mask for t in set(lm.config.layer_types)}
        out = lm(inputs_embeds=embeds, position_ids=pos, attention_mask=masks, cache=cache, use_cache=False)
        self.counters["forward_calls"] += 1
        return out.last_hidden_state

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [n, H] -> next-token logits [n, V] fp32."""
        if self.autocast_dtype is None:
            return self.model.lm_head(h).float()
        # fp32 logits like the trainer's fused kernel (which runs outside autocast): the sampling-time
        # log-probs are the old policy's, and a bf16 lm_head would put the first ratio off 1
        with torch.autocast(h.device.type, enabled=False):
            return self.model.lm_head(h.float()).float()

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

    def _choose(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Pick the next token of each sequence (sampled or forced), record its log-prob, check stops. Rows are
        grouped by their sampling parameters; every computation is per row."""
        groups: dict[int, list[int]] = {}
        for j, s in enumerate(seqs):
            groups.setdefault(id(s.sampling), []).append(j)
        for rows in groups.values():
            sampling = seqs[rows[0]].sampling
            free = [j for j in rows if seqs[j].req.forced_tokens is None]
            forced = [j for j in rows if seqs[j].req.forced_tokens is not None]
            picks: dict[int, tuple[int, float]] = {}
            if free:
                bans = None
                if sampling.banned_sequences:
                    bans = [sequence_bans(seqs[j].req.token_ids, seqs[j].ids, sampling.banned_sequences) for j in free]
                tokens, logp = sample_tokens(logits[free], sampling, [seqs[j].gen for j in free],
                                             draw_rows=len(self.processor.tokenizer), row_bans=bans)
                picks.update({j: (int(t), float(lp)) for j, t, lp in zip(free, tokens.tolist(), logp.tolist())})
            if forced:
                lp_all = torch.log_softmax(logits[forced].float() / sampling.logprob_temperature, dim=-1)
                for r, j in enumerate(forced):
                    tok = int(seqs[j].req.forced_tokens[len(seqs[j].ids)])
                    picks[j] = (tok, float(lp_all[r, tok]))
            for j in rows:
                seq = seqs[j]
                tok, lp = picks[j]
                seq.ids.append(tok)
                seq.logprobs.append(lp)
                seq.finish, seq.matched = seq.stopper.check(seq.ids, seq.max_new)
