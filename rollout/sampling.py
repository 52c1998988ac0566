"""Choosing tokens: stop rules, per-request RNGs and sampling with the trainer's log-probs. Shared by the
embedded engine's scheduler and the SGLang adapter (which applies the same stop rules to SGLang's output)."""

from __future__ import annotations

import torch

from .qwen import ChatProcessor
from .types import SamplingParams


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


def sequence_bans(prompt: list[int], output: list[int], banned_sequences: tuple[tuple[int, ...], ...]) -> list[int]:
    """The tokens that would complete a banned sequence after the context prompt + output (its last token, where
    the context ends with the rest of it, which may begin in the prompt)."""
    tail = max((len(s) for s in banned_sequences), default=0)  # only the context's end can match
    context = (list(prompt[-tail:]) + list(output))[-tail:] if tail else []
    out = []
    for seq in banned_sequences:
        n = len(seq) - 1
        if len(context) >= n and tuple(context[len(context) - n:]) == seq[:-1]:
            out.append(seq[-1])
    return out


def mask_banned_sequences(logits: torch.Tensor, custom_param_list: list[dict | None] | None) -> torch.Tensor:
    """SGLang's custom-logit-processor contract, for banned token sequences: row i's params hold
    "banned_sequences" and SGLang's "__req__" (origin_input_ids, output_ids); the tokens that would complete a
    banned sequence after that row's context get -inf. Other rows are left alone. Returns `logits` (in place)."""
    for i, params in enumerate(custom_param_list or []):
        if not params or not params.get("banned_sequences"):
            continue
        req = params["__req__"]
        seqs = tuple(tuple(int(t) for t in s) for s in params["banned_sequences"])
        bans = sequence_bans(req.origin_input_ids, req.output_ids, seqs)
        if bans:
            logits[i, bans] = float("-inf")
    return logits


def sample_tokens(
    logits: torch.Tensor, sampling: SamplingParams, generators: list[torch.Generator | None],
    draw_rows: int | None = None, row_bans: list[list[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (tokens [B] int64, logprobs [B] fp32 of log_softmax(logits / T) at the tokens).

    Only ids < `draw_rows` (the tokenizer's size, when the lm head has padding rows past it), not in
    sampling.banned_token_ids and not in the row's `row_bans` (sequence_bans) are drawn; the log-probs are over
    all V rows, the trainer's quantity."""
    logits = logits.float()
    scaled = logits / sampling.logprob_temperature
    logp = torch.log_softmax(scaled, dim=-1)
    any_row_ban = row_bans is not None and any(row_bans)
    if (draw_rows is not None and draw_rows < scaled.shape[-1]) or sampling.banned_token_ids or any_row_ban:
        scaled = scaled.clone()
        if draw_rows is not None:
            scaled[:, draw_rows:] = float("-inf")
        if sampling.banned_token_ids:
            scaled[:, list(sampling.banned_token_ids)] = float("-inf")
        if any_row_ban:
            for b, bans in enumerate(row_bans):
                if bans:
                    scaled[b, bans] = float("-inf")
    if sampling.greedy:
        tokens = scaled.argmax(dim=-1)
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
