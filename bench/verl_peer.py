"""verl 0.9.1 itself as the judge of our verl drop-in (deepeyesv2_kernels.integrations.verl), fp32, on CPU.

    python -m bench.verl_peer [--venv DIR] [--out FILE] [--no-write]

verl pins transformers<5.11, so it lives in its own virtual environment, built on first use and reused after
(default ~/.cache/deepeyesv2/venvs/verl-0.9.1; `ensure_verl_venv`): our torch and triton at our versions, the few
packages verl's imported modules import, verl itself with --no-deps, and this checkout's packages with --no-deps
(editable), so that `patch_verl()` can run on the real verl modules. Every side runs in a subprocess
(bench/verl_peer_worker.py) on the same inputs, passed by torch.save:
  verl 0.9.1                      FusedLinearForPPO (torch backend), linear_cross_entropy (Triton), the host
                                  function under it, and dense_common.forward_with_{torch,triton}_backend -- the
                                  forwards verl puts on a model -- on a stand-in model (backbone output = hidden)
  verl 0.9.1 after patch_verl()   the same verl entry points and forwards, after our patch
  ours                            integrations.verl.FusedLinearForPPO / linear_cross_entropy in our venv (CPU: the
                                  chunked torch path), and the fp64 autograd of verl's formulas (the fp32 scale)
  ours, Triton interpreter        fused_logprobs(backend='triton'), the kernel the drop-in runs on CUDA
The reference of every row is verl's FusedLinearForPPO unpatched, except the patched model forwards, whose
reference is verl's unpatched forward_with_torch_backend. Quantities: log-probs, entropy and the gradients of
sum(logp * g_logp) + sum(entropy * g_entropy) w.r.t. hidden and weight (one case differentiates the log-probs
only, so verl's backward gets dentropy=None). A row passes when the shapes and dtypes match and every element
satisfies |x - ref| <= atol + rtol * |ref| (torch.allclose) at the fp32 tolerances in QUANTITIES; a second table
holds every side, verl's included, to the same tolerances against the fp64 autograd. A side that raises is a row
with its error line; the ones expected on CPU (EXPECTED_ON_CPU: verl's Triton path needs a CUDA build of torch
and CUDA tensors) do not fail the run, any other error does.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from bench._common import REPO_ROOT, load_average, publish, render_table

VERL_VERSION = "0.9.1"
WORKER = Path(REPO_ROOT) / "bench" / "verl_peer_worker.py"
CACHE_HOME = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
DEFAULT_VENV = CACHE_HOME / "deepeyesv2" / "venvs" / f"verl-{VERL_VERSION}"
# What the verl modules the sides import need, pinned to the versions pip first resolved here inside verl 0.9.1's
# own ranges: verl/__init__ -> verl.protocol imports numpy, ray, tensordict and packaging; verl.utils.config
# imports omegaconf; verl.models.transformers.dense_common imports transformers (verl: >=5.5.3,<5.11,!=5.6.0).
# verl goes in with --no-deps: the rest of its list (ray[default], wandb, datasets, peft, ...) is for its trainer.
VERL_IMPORT_DEPS = ("numpy==2.4.6", "packaging==25.0", "ray==2.60.0", "tensordict==0.10.0", "omegaconf==2.4.0",
                    "transformers==5.10.4")
PIP_TIMEOUT_S = 1800
WORKER_TIMEOUT_S = 1200


@dataclass(frozen=True)
class Tolerance:
    rtol: float  # relative part of torch.allclose's bound
    atol: float  # absolute part of torch.allclose's bound


# fp32 tolerances, for each side against verl and for every side (verl's too) against the fp64 autograd of verl's
# formulas. Two fp32 implementations differ by both their rounding errors, so the bound must admit verl's own and
# the run-to-run spread of the CPU GEMMs: the logits here reach |z| ~ 40 (K = 48), and one run of our CPU path out
# of several came out at 4.6e-5 (logp) and 4.9e-5 (entropy) from fp64 on T37 where the others gave 3.5e-6 and
# 2.0e-6 (same inputs and code; MKL's GEMM results may depend on buffer alignment). verl's torch path itself is
# off by 1.0e-5 in the entropy (logsumexp minus sum(p * logits) cancels for low-entropy tokens: 0.0447388 for
# 0.0447491) and 3.2e-5 in d_weight on the 600-token case. A defect (temperature ignored, entropy detached, logp
# off by 1e-4 relative) moves them by 1e-3 and more: tests/kernels/test_verl_peer.py checks that the judge fails
# those.
VALUE_TOL = Tolerance(rtol=1e-5, atol=1e-4)
GRAD_TOL = Tolerance(rtol=1e-4, atol=1e-4)
QUANTITIES = {"logp": VALUE_TOL, "entropy": VALUE_TOL, "d_hidden": GRAD_TOL, "d_weight": GRAD_TOL}
FP64 = "fp64.autograd"


@dataclass(frozen=True)
class Case:
    name: str  # row label
    shape: tuple[int, ...]  # the labels' shape: (T,) flat or (B, L); hidden is shape + (hidden,)
    hidden: int  # H
    vocab: int  # V
    temperature: float  # logits are divided by it
    entropy_grad: bool  # the loss has an entropy term (verl's entropy bonus); False: verl's backward gets dentropy=None


CASES = (
    Case("T37", (37,), 48, 1003, 0.7, True),
    Case("packed 1x37", (1, 37), 48, 1003, 1.3, True),
    Case("B3xL13 logp-grad only", (3, 13), 48, 1003, 0.7, False),
    Case("packed 1x600 (2 verl chunks)", (1, 600), 48, 1003, 0.85, True),
)


@dataclass(frozen=True)
class Run:
    label: str  # how the table names this process's sides
    venv: str  # "verl" (the cached verl venv) or "ours" (this interpreter's)
    sides: tuple[str, ...]  # names from bench/verl_peer_worker.py SIDES
    patch: bool  # call patch_verl() before the sides
    interpret: bool  # TRITON_INTERPRET=1 in the process (otherwise unset)


VERL = "verl 0.9.1"
PATCHED = "verl 0.9.1 after patch_verl()"
OURS = "ours"
INTERP = "ours, Triton interpreter"
RUNS = (
    Run(VERL, "verl", ("verl.FusedLinearForPPO", "verl.forward_with_torch_backend", "verl.linear_cross_entropy",
                       "verl.efficient_entropy_forward", "verl.forward_with_triton_backend"), False, False),
    Run(PATCHED, "verl", ("verl.FusedLinearForPPO", "verl.linear_cross_entropy", "verl.forward_with_torch_backend",
                          "verl.forward_with_triton_backend"), True, False),
    Run(OURS, "ours", ("ours.FusedLinearForPPO", "ours.linear_cross_entropy", "fp64.autograd"), False, False),
    Run(INTERP, "ours", ("ours.fused_logprobs[triton]",), False, True),
)
REFERENCE = (VERL, "verl.FusedLinearForPPO")
# (side compared, its reference); everything not listed here is compared against REFERENCE.
REFERENCE_OF = {
    (PATCHED, "verl.forward_with_torch_backend"): (VERL, "verl.forward_with_torch_backend"),
    (PATCHED, "verl.forward_with_triton_backend"): (VERL, "verl.forward_with_torch_backend"),
}
# Sides that cannot run on a CPU-only machine, with what they need; their errors are reported, not failures.
EXPECTED_ON_CPU = {
    (VERL, "verl.linear_cross_entropy"): "verl's Triton kernel: a CUDA build of torch (nvtx) and CUDA tensors",
    (VERL, "verl.efficient_entropy_forward"): "verl's Triton kernel: CUDA tensors (and hidden_size % 128 == 0)",
    (VERL, "verl.forward_with_triton_backend"): "calls verl.linear_cross_entropy",
}


# ----------------------------------------------------------------------------------------------- the verl venv
@dataclass(frozen=True)
class VenvSpec:
    path: Path  # the venv folder
    with_deps: tuple[str, ...]  # installed in one pip resolve, with their dependencies
    no_deps: tuple[str, ...]  # then installed with --no-deps

    def marker(self) -> dict:
        return {"python": sys.version, "with_deps": list(self.with_deps), "no_deps": list(self.no_deps)}


def verl_venv_spec(path: Path = DEFAULT_VENV) -> VenvSpec:
    """torch and triton at this interpreter's versions (pip takes torch's CPU build from this machine's wheel
    folder: see pip config), verl's import needs, then verl without its dependency list."""
    ours = (f"torch=={metadata.version('torch')}", f"triton=={metadata.version('triton')}")
    return VenvSpec(path=path, with_deps=ours + VERL_IMPORT_DEPS, no_deps=(f"verl=={VERL_VERSION}",))


def _run_checked(cmd: list[str], what: str, timeout: float = PIP_TIMEOUT_S) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc.stdout


def _kernels_location(python: Path) -> str:
    return _run_checked([str(python), "-P", "-c", "import deepeyesv2_kernels; print(deepeyesv2_kernels.__file__)"],
                        "locating deepeyesv2_kernels in the verl venv", timeout=300).strip()


def ensure_verl_venv(spec: VenvSpec, log=print) -> Path:
    """The verl venv's python, building the venv first when it is missing or was built from another spec (its
    marker file, written last, records the spec: a half-built venv has none and is rebuilt). The checkout's
    packages are installed editable with --no-deps, again whenever the venv's deepeyesv2_kernels is not this
    checkout's kernels/. A lock file beside the venv serialises two builds."""
    python = spec.path / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    marker = spec.path / "deepeyesv2-venv.json"
    spec.path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{spec.path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (marker.is_file() and json.loads(marker.read_text()) == spec.marker()):
            if spec.path.exists():
                log(f"rebuilding {spec.path} (no marker or another spec)")
                shutil.rmtree(spec.path)
            log(f"creating {spec.path}: {' '.join(spec.with_deps)}; --no-deps {' '.join(spec.no_deps)}")
            # run from a venv, `python -m venv` bases the new one on the same base interpreter, without our packages
            _run_checked([sys.executable, "-m", "venv", str(spec.path)], "python -m venv")
            _run_checked(pip + list(spec.with_deps), "pip install (verl's import needs)")
            _run_checked(pip + ["--no-deps", *spec.no_deps], "pip install --no-deps verl")
            _run_checked(pip + ["--no-deps", "-e", str(REPO_ROOT)], "pip install --no-deps -e <checkout>")
            marker.write_text(json.dumps(spec.marker(), indent=1))
        expected = str(Path(REPO_ROOT) / "kernels" / "__init__.py")
        if _kernels_location(python) != expected:
            log(f"pointing the verl venv's deepeyesv2_kernels at {REPO_ROOT}")
            _run_checked(pip + ["--no-deps", "-e", str(REPO_ROOT)], "pip install --no-deps -e <checkout>")
            if _kernels_location(python) != expected:
                raise RuntimeError(f"the verl venv's deepeyesv2_kernels is not {expected}")
    return python


# ---------------------------------------------------------------------------------------------- the inputs
def make_inputs(cases=CASES, seed: int = 0) -> dict[str, dict]:
    """Each case's hidden [*shape, H], weight [V, H] (scaled so the softmax is neither flat nor one-hot), labels
    and the upstream gradients g_logp / g_entropy, fp32, from one seeded generator."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for c in cases:
        out[c.name] = {
            "hidden": torch.randn(*c.shape, c.hidden, generator=g),
            "weight": torch.randn(c.vocab, c.hidden, generator=g) * 0.5,
            "labels": torch.randint(0, c.vocab, c.shape, generator=g),
            "temperature": c.temperature,
            "g_logp": torch.randn(c.shape, generator=g),
            "g_entropy": torch.randn(c.shape, generator=g) if c.entropy_grad else None,
        }
    return out


def run_side_process(run: Run, python: Path, inputs: Path, out: Path) -> dict:
    """One worker process (bench/verl_peer_worker.py) writing `out`: {"sides": ..., "versions": ..., "patched": ...}."""
    import torch

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if run.interpret:
        env["TRITON_INTERPRET"] = "1"
    cmd = [str(python), "-P", str(WORKER), "--sides", ",".join(run.sides), str(inputs), str(out)]
    if run.patch:
        cmd.insert(3, "--patch")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, env=env, cwd=str(out.parent))
    if proc.returncode != 0:
        raise RuntimeError(f"worker {run.label!r} exited {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}")
    return torch.load(out)


# -------------------------------------------------------------------------------------------- comparing
@dataclass(frozen=True)
class Diff:
    max_abs: float  # max |x - ref|
    max_rel: float  # max |x - ref| / max(|ref|, atol)
    ok: bool  # torch.allclose(x, ref, rtol, atol) and same shape


@dataclass
class Row:
    case: str  # Case.name, or the cases an error row covers
    run: str  # Run.label of the side
    side: str  # worker side name
    reference: str  # "run: side" compared against
    diffs: dict[str, Diff] = field(default_factory=dict)  # quantity -> Diff (empty for an error row)
    error: str = ""  # the side's exception, "Type: first line"
    where: str = ""  # the innermost frame, "file:line: source"
    expected: str = ""  # why this error is expected on CPU (EXPECTED_ON_CPU), "" when it is not
    mismatch: str = ""  # outputs whose shape or dtype differs from the reference's ("" when none: a row with one fails)

    @property
    def ok(self) -> bool:
        if self.error:
            return bool(self.expected)
        return not self.mismatch and all(d.ok for d in self.diffs.values())


def diff(x, ref, tol: Tolerance) -> Diff:
    import torch

    if tuple(x.shape) != tuple(ref.shape):
        return Diff(float("nan"), float("nan"), False)
    x64, ref64 = x.double(), ref.double()
    err = (x64 - ref64).abs()
    rel = err / ref64.abs().clamp_min(tol.atol)
    ok = bool(torch.allclose(x64, ref64, rtol=tol.rtol, atol=tol.atol))
    return Diff(float(err.max()), float(rel.max()), ok)


def compare(results: dict[str, dict]) -> list[Row]:
    """Rows for every (case, run, side) but the reference itself; an error repeated over all cases is one row."""
    rows: list[Row] = []
    errors: dict[tuple[str, str, str, str], list[str]] = {}
    for run in RUNS:
        for side in run.sides:
            if (run.label, side) == REFERENCE:
                continue
            ref_run, ref_side = REFERENCE_OF.get((run.label, side), REFERENCE)
            for case in CASES:
                got = results[run.label]["sides"][side][case.name]
                if "error" in got:
                    errors.setdefault((run.label, side, got["error"], got["where"]), []).append(case.name)
                    continue
                ref = results[ref_run]["sides"][ref_side][case.name]
                if "error" in ref:
                    raise RuntimeError(f"reference {ref_run}: {ref_side} failed on {case.name}: {ref['error']}")
                # the fp64 side is fp64 by design; every other output must be fp32 like verl's on fp32 inputs
                mismatches = [f"{q} shape {tuple(got[q].shape)} vs {tuple(ref[q].shape)}" for q in QUANTITIES
                              if tuple(got[q].shape) != tuple(ref[q].shape)]
                mismatches += [f"{q} {got[q].dtype} vs {ref[q].dtype}" for q in QUANTITIES
                               if got[q].dtype != ref[q].dtype and side != "fp64.autograd"]
                rows.append(Row(case.name, run.label, side, f"{ref_run}: {ref_side}",
                                {q: diff(got[q], ref[q], tol) for q, tol in QUANTITIES.items()},
                                mismatch="; ".join(mismatches)))
    for (label, side, error, where), cases in errors.items():
        case = "all" if len(cases) == len(CASES) else ", ".join(cases)
        rows.append(Row(case, label, side, "", error=error, where=where,
                        expected=EXPECTED_ON_CPU.get((label, side), "")))
    return rows


@dataclass(frozen=True)
class AccuracyRow:
    case: str  # Case.name
    run: str  # Run.label of the side
    side: str  # worker side name
    diffs: dict[str, Diff]  # quantity -> the side against fp64, at the QUANTITIES tolerances
    verl_errors: dict[str, float]  # quantity -> max abs error of verl's reference side against fp64 (for the ratio)

    @property
    def ok(self) -> bool:
        return all(d.ok for d in self.diffs.values())


def accuracy(results: dict[str, dict]) -> list[AccuracyRow]:
    """Every side that ran (verl's reference first), against the fp64 autograd of verl's formulas."""
    rows = []
    for case in CASES:
        exact = results[OURS]["sides"][FP64][case.name]
        diffs_of = lambda got: {q: diff(got[q], exact[q], tol) for q, tol in QUANTITIES.items()}  # noqa: E731
        verl_diffs = diffs_of(results[REFERENCE[0]]["sides"][REFERENCE[1]][case.name])
        verl_errors = {q: d.max_abs for q, d in verl_diffs.items()}
        rows.append(AccuracyRow(case.name, REFERENCE[0], REFERENCE[1], verl_diffs, verl_errors))
        for run in RUNS:
            for side in run.sides:
                got = results[run.label]["sides"][side][case.name]
                if (run.label, side) == REFERENCE or side == FP64 or "error" in got:
                    continue
                rows.append(AccuracyRow(case.name, run.label, side, diffs_of(got), verl_errors))
    return rows


# ----------------------------------------------------------------------------------------------- reporting
def _sci(x: float) -> str:
    return f"{x:.1e}"


def _cell(row: Row, q: str) -> str:
    if row.error:
        return "-"
    d = row.diffs[q]
    return f"{_sci(d.max_abs)} / {_sci(d.max_rel)}{'' if d.ok else ' FAIL'}"


def _verdict(row: Row) -> str:
    if row.error:
        return f"cannot run here ({row.expected})" if row.expected else "FAIL (error)"
    return "pass" if row.ok else "FAIL"


def table(rows: list[Row]) -> str:
    columns = [("case", lambda r: r.case), ("side", lambda r: f"{r.run}: `{r.side}`"),
               ("reference", lambda r: r.reference or "-")]
    columns += [(f"{q} abs / rel", (lambda q: lambda r: _cell(r, q))(q)) for q in QUANTITIES]
    columns += [("result", _verdict),
                ("error / note",
                 lambda r: (f"`{r.error}` at `{r.where}`" if r.error else r.mismatch).replace("|", "\\|"))]
    return render_table(rows, columns)


def accuracy_table(rows: list[AccuracyRow]) -> str:
    def cell(r: AccuracyRow, q: str) -> str:
        d, verl = r.diffs[q], r.verl_errors[q]
        ratio = f"{d.max_abs / verl:.2f}x" if verl else ("1.00x" if not d.max_abs else "inf")
        return f"{_sci(d.max_abs)} ({ratio}){'' if d.ok else ' FAIL'}"

    columns = [("case", lambda r: r.case), ("side", lambda r: f"{r.run}: `{r.side}`")]
    columns += [(f"{q} max abs err (x verl's)", (lambda q: lambda r: cell(r, q))(q)) for q in QUANTITIES]
    columns += [("result", lambda r: "pass" if r.ok else "FAIL")]
    return render_table(rows, columns)


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "bench/verl_peer.py",
                            "bench/verl_peer_worker.py"], capture_output=True, text=True, cwd=REPO_ROOT).stdout.strip()
    return proc.stdout.strip() + (" (+ uncommitted changes in kernels/ or bench/verl_peer*)" if dirty else "")


@dataclass
class Report:
    rows: list[Row]  # the comparison and error rows
    accuracy: list[AccuracyRow]  # every side that ran against fp64
    versions: dict[str, dict[str, str]]  # run label -> the worker's versions()
    patched: list[str]  # what patch_verl() returned in the patched run
    spec: VenvSpec  # how the verl venv was built
    device: str  # CPU model and core count
    load: tuple[float, float]  # 1-minute load average before and after the runs
    date: str  # UTC date of the run
    commit: str  # this checkout's commit

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows) and all(r.ok for r in self.accuracy)


def measure(venv: Path = DEFAULT_VENV, log=print) -> Report:
    """Build/reuse the verl venv, run every side on the same inputs, compare (see the module docstring)."""
    import torch

    spec = verl_venv_spec(venv)
    verl_python = ensure_verl_venv(spec, log=log)
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="verl-peer-") as tmp:
        workdir = Path(tmp)
        inputs = workdir / "inputs.pt"
        torch.save(make_inputs(), inputs)
        results = {}
        for i, run in enumerate(RUNS):
            log(f"running {run.label}: {', '.join(run.sides)}")
            results[run.label] = run_side_process(run, verl_python if run.venv == "verl" else Path(sys.executable),
                                                  inputs, workdir / f"sides-{i}.pt")
    load_after = load_average()
    return Report(rows=compare(results), accuracy=accuracy(results),
                  versions={label: r["versions"] for label, r in results.items()},
                  patched=results[PATCHED]["patched"], spec=spec, device=f"{cpu_model()}, {os.cpu_count()} cores",
                  load=(load_before, load_after), date=datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
                  commit=git_commit())


def markdown(rep: Report) -> str:
    tol = ", ".join(f"{q} rtol={t.rtol:g} atol={t.atol:g}" for q, t in QUANTITIES.items())
    cases = "; ".join(f"{c.name}: labels {c.shape}, H={c.hidden}, V={c.vocab}, temperature={c.temperature}, "
                      f"loss {'logp + entropy' if c.entropy_grad else 'logp only'}" for c in CASES)
    verl_v, ours_v = rep.versions[VERL], rep.versions[OURS]
    lines = [
        f"# verl {VERL_VERSION} as the judge of deepeyesv2_kernels.integrations.verl ({rep.date})",
        "",
        "Command: `python -m bench.verl_peer` (bench/verl_peer.py; the module docstring says what each side is).",
        "",
        f"- device: {rep.device} (CPU only; fp32 throughout); load average (1 min) {rep.load[0]:.2f} before, "
        f"{rep.load[1]:.2f} after",
        f"- checkout: {rep.commit}",
        f"- our venv: python {ours_v['python']}, torch {ours_v['torch']}, triton {ours_v['triton']}",
        f"- verl venv ({rep.spec.path}): python {verl_v['python']}, verl {verl_v['verl']}, torch {verl_v['torch']}, "
        f"triton {verl_v['triton']}, transformers {verl_v['transformers']}, tensordict {verl_v['tensordict']}, "
        f"ray {verl_v['ray']}",
        f"- verl venv installed: `pip install {' '.join(rep.spec.with_deps)}`, then "
        f"`pip install --no-deps {' '.join(rep.spec.no_deps)}`, then `pip install --no-deps -e <checkout>`",
        f"- patch_verl() patched: {', '.join(rep.patched)}",
        f"- cases: {cases}",
        f"- tolerances (fp32, torch.allclose): {tol}; cells are max abs / max rel diff "
        "(rel = |x - ref| / max(|ref|, atol)), FAIL where allclose fails",
        "",
        "## Each side against verl",
        "",
        table(rep.rows),
        "",
        "## Each side against the fp64 autograd of verl's formulas",
        "",
        "Same tolerances; in brackets, the side's max abs error over verl's own.",
        "",
        accuracy_table(rep.accuracy),
        "",
        f"Overall: {'pass' if rep.ok else 'FAIL'} ({sum(1 for r in rep.rows if not r.error and r.ok)} comparisons "
        f"with verl pass, {sum(1 for r in rep.rows if not r.error and not r.ok)} fail; "
        f"{sum(1 for r in rep.accuracy if r.ok)} rows against fp64 pass, "
        f"{sum(1 for r in rep.accuracy if not r.ok)} fail; "
        f"{sum(1 for r in rep.rows if r.error and r.expected)} sides cannot run on this CPU, "
        f"{sum(1 for r in rep.rows if r.error and not r.expected)} unexpected errors).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="where the verl venv is built and cached")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown result file (default bench/results/<UTC date>-verl-peer.md)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    rep = measure(args.venv, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    publish(markdown(rep), args.out, f"{rep.date}-verl-peer.md", write=not args.no_write)
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
