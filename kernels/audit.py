"""Compile audit: every Triton kernel of this package, built for real NVIDIA GPUs on a machine without one.

    python -m deepeyesv2_kernels.audit                 # table for sm_80 and sm_90 (+ sm_100 if ptxas accepts it)
    python -m deepeyesv2_kernels.audit --json a.json   # also the rows as JSON (the CI test reads them)
    python -m deepeyesv2_kernels.audit --costs         # only the static roofline bounds at the benchmark shapes

How: each public op is called on small CPU tensors inside `capture_launches()`, so the launch code picks its CUDA
tile configs and records `kernel[grid](*args, **kwargs)` instead of running it. Every recorded launch (every
autotune config of an autotuned kernel) is then specialised exactly as Triton's JIT would (its own binder) and
compiled with `triton.compile(..., target=GPUTarget("cuda", arch, 32))`: PTX, cubin, SASS, no driver needed.
`cuobjdump` gives registers and stack (spills), the SASS gives LDL/STL spill traffic and the tensor-core
instructions (HGMMA on sm_90, HMMA on sm_80), and the compiled kernel's shared memory against stages x tile bytes
shows whether the K loop is software-pipelined (>= 2 stages resident).

Needs triton (its wheel ships ptxas/cuobjdump) and must run without TRITON_INTERPRET=1: the interpreter replaces
the kernels by Python functions that cannot be compiled.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from typing import Callable, Iterator

import torch

from . import _triton_utils
from ._triton_utils import Launch, capture_launches

ARCHS = (80, 90, 100)
# Shared memory per block (opt-in maximum), bytes.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}
# sm_86 / sm_89 (RTX 30xx/40xx, A10, L4) take sm_80's fixed configs but have 99 KB per block.
SMEM_LIMIT_SM8X = 99 * 1024
# Kernels built around tl.dot: they must use tensor cores and pipeline their K loop.
GEMM_KERNELS = ("_logprobs_fwd_kernel", "_logprobs_dlogits_kernel")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way the public API can launch kernels: `run()` calls the op (forward + backward) under capture."""

    op: str
    label: str
    run: Callable[[], None]
    quick: bool = False  # in the --quick set: the heaviest flags of each dtype class (most live registers)


@dataclasses.dataclass
class Row:
    kernel: str
    variants: list[str]  # op variants (public-API choices) that launch this exact compiled kernel
    constexprs: dict
    config: str  # tile / warps / stages
    arch: int
    default: bool  # launched at a fixed config (False: one autotune candidate among several)
    registers: int = 0
    spill_bytes: int = 0  # stack frame: registers spilled to local memory
    ldl: int = 0
    stl: int = 0
    shared: int = 0  # bytes of shared memory the kernel allocates
    tensor_core: int = 0  # HGMMA (sm_90) / HMMA (sm_80) instructions in the SASS
    stage_bytes: int = 0  # one K step's operand tiles, bytes (GEMM kernels)
    num_stages: int = 0
    error: str = ""

    @property
    def stages_resident(self) -> float:
        return self.shared / self.stage_bytes if self.stage_bytes else 0.0

    @property
    def pipelined(self) -> bool | None:
        """K loop software-pipelined: at least two stages of operand tiles live in shared memory."""
        if not self.stage_bytes:
            return None
        return self.stages_resident >= 2

    @property
    def smem_fits(self) -> bool:
        return self.shared <= SMEM_LIMIT[self.arch]


# ---------------------------------------------------------------------------------------------- the variants


def _logprob_inputs(dtype: torch.dtype, bias: bool, T: int = 300, H: int = 256, V: int = 2048):
    # Shapes only fix the integer specialisations (divisible by 16 or not); T is ragged as in real batches.
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.02).to(dtype).requires_grad_()
    b = torch.zeros(V, dtype=dtype, requires_grad=True) if bias else None
    targets = torch.randint(0, V, (T,), generator=g)
    return hidden, weight, b, targets


_DTYPES = {
    "bf16": (torch.bfloat16, "highest"),
    "fp16": (torch.float16, "highest"),
    "fp32": (torch.float32, "highest"),  # true fp32 products
    "fp32-tf32": (torch.float32, "high"),  # torch.set_float32_matmul_precision("high"): tf32 tensor cores
}


def _with_precision(precision: str, fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(precision)
        try:
            fn()
        finally:
            torch.set_float32_matmul_precision(before)

    return run


def _variants() -> Iterator[Variant]:
    from .advantages import group_advantages
    from .grpo_loss import grpo_loss
    from .linear_grpo import fused_linear_grpo_loss
    from .logprobs import fused_logprobs
    from .mrope import apply_mrope

    for dname, (dtype, precision) in _DTYPES.items():
        for bias in (False, True):
            for entropy in ("off", "value", "grad"):

                def run_logprobs(dtype=dtype, bias=bias, entropy=entropy) -> None:
                    h, w, b, y = _logprob_inputs(dtype, bias)
                    lp, ent = fused_logprobs(h, w, y, bias=b, compute_entropy=entropy != "off",
                                             entropy_grad=entropy == "grad", backend="triton")
                    (lp.sum() + (ent.sum() if entropy == "grad" else 0)).backward()

                yield Variant("fused_logprobs", f"{dname} bias={int(bias)} entropy={entropy}",
                              _with_precision(precision, run_logprobs),
                              quick=bias and entropy == "grad" and dname != "fp16")
            for ent_coef in (0.0, 0.01):

                def run_fused_loss(dtype=dtype, bias=bias, ent_coef=ent_coef) -> None:
                    h, w, b, y = _logprob_inputs(dtype, bias)
                    T = y.shape[0]
                    loss, _ = fused_linear_grpo_loss(
                        h, w, y, torch.zeros(T), torch.ones(T), torch.ones(T, dtype=torch.bool),
                        torch.tensor([0, T // 2, T], dtype=torch.int32), bias=b, entropy_coef=ent_coef,
                        backend="triton",
                    )
                    loss.backward()

                yield Variant("fused_linear_grpo_loss", f"{dname} bias={int(bias)} entropy_coef={ent_coef}",
                              _with_precision(precision, run_fused_loss),
                              quick=bias and ent_coef != 0.0 and dname != "fp16")

    for ref, kl_coef, est in ((False, 0.0, "k3"), (True, 0.0, "k3"), (True, 0.1, "k1"), (True, 0.1, "k2"),
                              (True, 0.1, "k3")):
        for dual in (None, 3.0):
            for ent in ("off", "value", "grad"):

                def run_grpo(ref=ref, kl_coef=kl_coef, est=est, dual=dual, ent=ent) -> None:
                    T = 1000
                    lp = torch.zeros(T, requires_grad=True)
                    entropy = torch.zeros(T, requires_grad=ent == "grad") if ent != "off" else None
                    loss, _ = grpo_loss(
                        lp, torch.zeros(T), torch.ones(T), torch.ones(T, dtype=torch.bool),
                        torch.tensor([0, 300, T], dtype=torch.int32), ref_logprobs=torch.zeros(T) if ref else None,
                        kl_coef=kl_coef, kl_estimator=est, dual_clip=dual, entropy=entropy,
                        entropy_coef=0.01 if ent != "off" else 0.0, backend="triton",
                    )
                    loss.backward()

                yield Variant("grpo_loss", f"ref={int(ref)} kl_coef={kl_coef} {est} dual={dual} entropy={ent}",
                              run_grpo, quick=(ref, kl_coef, est, dual, ent) in ((True, 0.1, "k3", 3.0, "grad"),
                                                                               (False, 0.0, "k3", None, "off")))

    for norm in ("std", "none"):
        for tokens in (False, True):
            for mask in (False, True) if tokens else (False,):

                def run_adv(norm=norm, tokens=tokens, mask=mask) -> None:
                    n, T = 16, 1000
                    cu = torch.linspace(0, T, n + 1).to(torch.int32) if tokens else None
                    group_advantages(torch.rand(n), torch.arange(n) // 8, cu_seqlens=cu,
                                     loss_mask=torch.ones(T, dtype=torch.bool) if mask else None, norm=norm,
                                     backend="triton")

                yield Variant("group_advantages", f"norm={norm} tokens={int(tokens)} mask={int(mask)}", run_adv,
                              quick=norm == "std" and tokens and mask)

    # Head layouts of Qwen2.5-VL 3B (16 q / 2 kv heads) and 7B (28 / 4), head dim 128.
    for dname, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        for hq, hk in ((16, 2), (28, 4)):

            def run_mrope(dtype=dtype, hq=hq, hk=hk) -> None:
                T, D = 300, 128
                q = torch.randn(T, hq, D).to(dtype).requires_grad_()
                k = torch.randn(T, hk, D).to(dtype).requires_grad_()
                pos = torch.arange(T).expand(3, T).contiguous()
                inv_freq = 1.0 / (1e6 ** (torch.arange(0, D, 2).float() / D))
                qo, ko = apply_mrope(q, k, pos, inv_freq, mrope_section=[16, 24, 24], backend="triton")
                (qo.float().sum() + ko.float().sum()).backward()

            yield Variant("apply_mrope", f"{dname} heads={hq}/{hk}", run_mrope, quick=hq == 28 and dname != "fp16")


# ---------------------------------------------------------------------------------------------- compile + inspect


def _bin(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _expand(launch: Launch) -> list[tuple[object, dict, bool]]:
    """(JITFunction, kwargs, is_fixed_config) for one recorded launch; an Autotuner yields each of its configs."""
    from triton.runtime.autotuner import Autotuner

    if isinstance(launch.kernel, Autotuner):
        return [(launch.kernel.fn, {**launch.kwargs, **cfg.all_kwargs()}, False) for cfg in launch.kernel.configs]
    return [(launch.kernel, dict(launch.kwargs), True)]


def _spec(fn, args: tuple, kwargs: dict, arch: int):
    """(ASTSource, options, target) exactly as Triton's JIT specialises this call for `arch`."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options, target, signature


def _constexprs(fn, kwargs: dict) -> dict:
    names = {p.name for p in fn.params if p.is_constexpr}
    return {k: v for k, v in kwargs.items() if k in names}


def _stage_bytes(name: str, cx: dict, signature: dict) -> int:
    """Bytes of one K step's operand tiles ([BLOCK_T, BLOCK_H] + [BLOCK_V, BLOCK_H]) of a GEMM kernel."""
    if name not in GEMM_KERNELS or cx.get("FROM_LOGITS"):
        return 0
    elem = {"*bf16": 2, "*fp16": 2, "*fp32": 4}[signature["p_hidden"]]
    if cx.get("DOT_UPCAST"):
        elem = 4
    return (cx["BLOCK_T"] + cx["BLOCK_V"]) * cx["BLOCK_H"] * elem


def _inspect_cache_dir() -> str:
    # Beside Triton's own kernel cache: a rerun finds both the compiled kernels and what cuobjdump said of them
    # (cuobjdump is most of a cached rerun's time: ~0.3 s a call).
    base = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return os.path.join(base, "deepeyesv2-audit")


def _inspect(cubin: bytes) -> dict:
    """Registers, spill bytes, LDL/STL and tensor-core instruction counts of a cubin (cached by its sha256)."""
    cache = os.path.join(_inspect_cache_dir(), hashlib.sha256(cubin).hexdigest() + ".json")
    if os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", "-sass", f.name], capture_output=True,
                             text=True, check=True).stdout
    reg = re.search(r"REG:(\d+)", out)  # resource usage and SASS of the one kernel, in one call
    stack = re.search(r"STACK:(\d+)", out)
    res = dict(
        registers=int(reg.group(1)) if reg else 0,
        spill_bytes=int(stack.group(1)) if stack else 0,
        ldl=len(re.findall(r"\bLDL(?:\.\w+)*\b", out)),
        stl=len(re.findall(r"\bSTL(?:\.\w+)*\b", out)),
        tensor_core=len(re.findall(r"\b(?:HGMMA|HMMA|UTCHMMA|UTCQMMA|UTCMMA)\b", out)),
    )
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = f"{cache}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(res, f)
    os.replace(tmp, cache)  # atomic: parallel workers may write the same entry
    return res


# Work items for forked compile workers: (fn, args, kwargs, arch); set before the pool forks, read by index.
_JOBS: list = []


def _compile_job(i: int) -> dict:
    import triton

    fn, args, kwargs, arch = _JOBS[i]
    try:
        src, options, target, _ = _spec(fn, args, kwargs, arch)
        compiled = triton.compile(src, target=target, options=options.__dict__)
        return dict(shared=int(compiled.metadata.shared), **_inspect(compiled.asm["cubin"]))
    except Exception as e:  # one failed build is a row with its error, not the end of the audit
        return dict(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200])


def supported_archs() -> tuple[int, ...]:
    """The archs this triton wheel's ptxas builds for (sm_100 needs ptxas-blackwell)."""
    return tuple(a for a in ARCHS if a < 100 or os.path.exists(_bin("ptxas-blackwell")))


def audit(archs: tuple[int, ...] | None = None, ops: tuple[str, ...] | None = None, workers: int | None = None,
          progress: bool = True, quick: bool = False) -> list[Row]:
    """Compile every launch of every variant for `archs`; one Row per distinct compiled kernel and arch.

    quick: only the heaviest flag set of each dtype class (bias, entropy gradient, KL, dual clip...), still at
    every config it can be launched with -- the CI test's set."""
    # Triton 3.9 warns when this is unset; 1 is its current default, i.e. what a GPU run compiles with.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if _triton_utils.interpreting():
        raise RuntimeError("the compile audit needs TRITON_INTERPRET unset (interpreted kernels cannot be compiled)")
    archs = archs or supported_archs()
    unique: dict[tuple, dict] = {}
    for arch in archs:
        for v in _variants():
            if (ops and v.op not in ops) or (quick and not v.quick):
                continue
            with capture_launches(arch) as launches:  # the tiles the launch code picks on this arch
                v.run()
            for launch in launches:
                for fn, kwargs, fixed in _expand(launch):
                    src, options, _, signature = _spec(fn, launch.args, kwargs, arch)
                    key = (src.hash(), arch, repr(sorted(options.__dict__.items())))
                    entry = unique.setdefault(key, dict(fn=fn, args=launch.args, kwargs=kwargs, arch=arch,
                                                        fixed=fixed, signature=signature, variants=[]))
                    label = f"{v.op}: {v.label}"
                    if label not in entry["variants"]:
                        entry["variants"].append(label)
    entries = list(unique.values())
    _JOBS[:] = [(e["fn"], e["args"], e["kwargs"], e["arch"]) for e in entries]
    workers = workers or max(1, min(len(entries), os.cpu_count() or 1))
    results: list[dict] = [{}] * len(entries)
    ctx = multiprocessing.get_context("fork")
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with the package's dependencies
        tqdm = None
    with ctx.Pool(workers) as pool:
        it = pool.imap(_compile_job, range(len(entries)))
        if progress and tqdm is not None:
            it = tqdm(it, total=len(entries), desc="compiling", file=sys.stderr, leave=False, disable=None)
        for i, res in enumerate(it):
            results[i] = res
    rows = []
    for e, res in zip(entries, results):
        name = e["fn"].__name__
        kw = e["kwargs"]
        cx = _constexprs(e["fn"], kw)
        blocks = {k: v for k, v in cx.items() if k.startswith("BLOCK")}
        config = " ".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in blocks.items())
        config += f" w{kw.get('num_warps', 4)} s{kw.get('num_stages', 3)}"
        flags = {k: v for k, v in cx.items() if not k.startswith("BLOCK")}
        rows.append(Row(kernel=name, variants=e["variants"], constexprs=flags, config=config.strip(), arch=e["arch"],
                        default=e["fixed"], stage_bytes=_stage_bytes(name, cx, e["signature"]),
                        num_stages=kw.get("num_stages", 3), **res))
    rows.sort(key=lambda r: (r.kernel, r.arch, not r.default, r.config, repr(r.constexprs)))
    return rows


def _dtype_of(row: Row) -> str:
    """The dtype class of the first op variant ("fused_logprobs: bf16 bias=1 ..." -> "bf16")."""
    label = row.variants[0].partition(": ")[2] if row.variants else ""
    return label.split(" ")[0]


def format_table(rows: list[Row]) -> str:
    head = ("| kernel | variant | config | arch | regs | spill B | LDL/STL | smem KiB | TC instr | stages in smem "
            "| pipelined |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        if r.error:
            lines.append(f"| {r.kernel} | {_short_variant(r)} | {r.config} | sm_{r.arch} | error: {r.error} |||||||")
            continue
        piped = "-" if r.pipelined is None else ("yes" if r.pipelined else "**no**")
        stages = f"{r.stages_resident:.1f} of {r.num_stages}" if r.stage_bytes else "-"
        spill = f"**{r.spill_bytes}**" if r.spill_bytes else "0"
        lines.append(
            f"| {r.kernel} | {_short_variant(r)} | {r.config}{'' if r.default else ' (autotune)'} | sm_{r.arch} "
            f"| {r.registers} | {spill} | {r.ldl}/{r.stl} | {r.shared / 1024:.1f} | {r.tensor_core} | {stages} "
            f"| {piped} |"
        )
    return "\n".join(lines)


def _short_variant(r: Row) -> str:
    flags = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in r.constexprs.items()
                     if k not in ("N_STATS",))
    return f"{_dtype_of(r)} {flags}".strip() if r.kernel in GEMM_KERNELS or r.kernel == "_mrope_fwd_kernel" else flags


def problems(rows: list[Row]) -> list[str]:
    """What the audit rejects: build errors, spills, shared memory over the limit, GEMM kernels without tensor
    cores or without a pipelined K loop (fixed configs), and autotune candidates that spill."""
    out = []
    for r in rows:
        where = f"{r.kernel} [{_short_variant(r)}] {r.config} sm_{r.arch}"
        if r.error:
            out.append(f"{where}: does not compile: {r.error}")
            continue
        if r.spill_bytes or r.ldl or r.stl:
            out.append(f"{where}: spills {r.spill_bytes} B ({r.ldl} LDL / {r.stl} STL)")
        if not r.smem_fits:
            out.append(f"{where}: {r.shared} B shared memory > {SMEM_LIMIT[r.arch]}")
        elif r.arch == 80 and r.default and r.shared > SMEM_LIMIT_SM8X:
            out.append(f"{where}: {r.shared} B shared memory > {SMEM_LIMIT_SM8X} of sm_86/sm_89")
        if r.stage_bytes and r.arch in (80, 90):
            # true-fp32 products ("highest" precision) run on the FMA units by definition
            if r.tensor_core == 0 and r.constexprs.get("DOT_PRECISION") != "ieee":
                out.append(f"{where}: no tensor-core instructions")
            if r.default and not r.pipelined:
                out.append(f"{where}: K loop not pipelined ({r.shared} B shared = {r.stages_resident:.1f} stages)")
    return out


# ---------------------------------------------------------------------------------------------- static costs

H100_BF16_FLOPS = 989e12  # dense bf16 tensor-core peak, FLOP/s
H100_HBM_BYTES = 3.35e12  # HBM3 bandwidth, B/s
# Anchors measured on an H100 (torch.compile of the naive path; our target), ms.
ANCHORS = {
    ("logprob+entropy fwd+bwd", 4096): "torch.compile 25.0, Liger SM90 28.5",
    ("logprob+entropy fwd+bwd", 16384): "torch.compile 100.0, Liger SM90 115.3, target <= 100",
    ("fused GRPO loss fwd+bwd", 16384): "torch.compile 85.1, Liger 1085, target <= 85",
}


def cost_table(H: int = 3584, V: int = 152_064, tokens: tuple[int, ...] = (4096, 16384)) -> str:
    """FLOPs and compulsory HBM bytes per launch at the benchmark shapes, and the time they bound at H100 peak.

    A lower bound, not a measurement: each launch is costed at max(FLOPs / peak, bytes / bandwidth), with bytes
    counting only what must cross HBM (operands once, outputs once; L2 reuse assumed perfect).
    """
    from .logprobs import FUSED_CHUNK_BYTES, GPU_CHUNK_BYTES

    b16 = 2
    lines = ["| op | T | launch | GFLOP | HBM MiB | bound ms | measured anchors, H100 ms |",
             "|---|---|---|---|---|---|---|"]

    def row(op, T, launch, flops, nbytes, total):
        ms = max(flops / H100_BF16_FLOPS, nbytes / H100_HBM_BYTES) * 1e3
        total.append(ms)
        lines.append(f"| {op} | {T} | {launch} | {flops / 1e9:.0f} | {nbytes / 2**20:.0f} | {ms:.2f} | |")

    for T in tokens:
        gemm = 2 * T * V * H
        # log-prob + entropy: forward kernel, then per backward chunk the dlogits kernel and two cuBLAS GEMMs.
        chunk = max(128, (GPU_CHUNK_BYTES // (b16 * V)) // 128 * 128)
        n_chunks = math.ceil(T / chunk)
        total: list[float] = []
        op = "logprob+entropy fwd+bwd"
        row(op, T, "fwd kernel (logits GEMM + online softmax)", gemm, (T * H + V * H) * b16 + 4 * T * 4 * 19, total)
        row(op, T, "dlogits kernel (recompute GEMM + epilogue)", gemm, (T * H + n_chunks * V * H + T * V) * b16, total)
        row(op, T, "dH = dlogits @ W (cuBLAS)", gemm, (T * V + n_chunks * V * H + T * H) * b16, total)
        row(op, T, "dW += dlogits^T @ h (cuBLAS)", gemm, (T * V + T * H + (2 * n_chunks - 1) * V * H) * b16, total)
        lines.append(f"| {op} | {T} | **sum (bound)** | {4 * gemm / 1e9:.0f} | | **{sum(total):.1f}** "
                     f"| {ANCHORS.get((op, T), '')} |")
        # fused GRPO loss: the forward kernel stores fp32 logits, dlogits reads them back (no recompute).
        chunk = max(128, (FUSED_CHUNK_BYTES // ((4 + b16) * V)) // 128 * 128)
        n_chunks = math.ceil(T / chunk)
        total = []
        op = "fused GRPO loss fwd+bwd"
        row(op, T, "fwd kernel, fp32 logits stored", gemm, (T * H + n_chunks * V * H) * b16 + T * V * 4, total)
        row(op, T, "dlogits from stored logits", 0, T * V * (4 + b16), total)
        row(op, T, "dH = dlogits @ W (cuBLAS)", gemm, (T * V + n_chunks * V * H + T * H) * b16, total)
        row(op, T, "dW += dlogits^T @ h (cuBLAS)", gemm, (T * V + T * H + (2 * n_chunks - 1) * V * H) * b16, total)
        lines.append(f"| {op} | {T} | **sum (bound)** | {3 * gemm / 1e9:.0f} | | **{sum(total):.1f}** "
                     f"| {ANCHORS.get((op, T), '')} |")
    lines.append("")
    lines.append(f"Bound = max(FLOPs / {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s, bytes / {H100_HBM_BYTES / 1e12:.2f} TB/s) "
                 f"per launch (H100 SXM dense bf16 peak; H={H}, V={V}, bf16): a floor no kernel can beat, "
                 "not a measurement. Anchors: measured on an H100 (torch 2.11, triton 3.6).")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI


def _write_md(path: str, argv: list[str] | None, rows: list[Row], report: str) -> None:
    import datetime

    import triton

    cmd = " ".join(["python -m deepeyesv2_kernels.audit", *(argv if argv is not None else sys.argv[1:])])
    archs = ", ".join(f"sm_{x}" for x in sorted({r.arch for r in rows}))
    with open(path, "w") as f:
        f.write(
            f"# Compile audit, {datetime.date.today()}\n\n`{cmd}` with triton {triton.__version__} (its bundled "
            f"ptxas / cuobjdump) on a CPU-only machine: every Triton kernel compiled for {archs}. Registers, stack "
            "(spill bytes) from `cuobjdump --dump-resource-usage`; shared memory of the compiled kernel; LDL/STL and "
            "tensor-core instructions (HGMMA / HMMA) counted in the SASS; 'stages in smem' = shared memory / one K "
            "step's operand tiles. Compiler output, not a GPU measurement.\n\n" + report + "\n"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deepeyesv2_kernels.audit", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default=None, help="comma-separated SM versions (default: 80,90 and 100 if supported)")
    p.add_argument("--op", action="append", default=None,
                   help="only variants of this public op (repeatable): fused_logprobs, fused_linear_grpo_loss, "
                        "grpo_loss, group_advantages, apply_mrope")
    p.add_argument("--quick", action="store_true",
                   help="only the heaviest flag set of each dtype class (every config still compiled)")
    p.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    p.add_argument("--md", default=None, help="also write the report as markdown to this path (bench/results/)")
    p.add_argument("--costs", action="store_true", help="print only the static cost table")
    p.add_argument("--workers", type=int, default=None, help="parallel compile processes (default: CPU count)")
    a = p.parse_args(argv)
    if a.costs:
        print(cost_table())
        return 0
    archs = tuple(int(x) for x in a.arch.split(",")) if a.arch else None
    rows = audit(archs, tuple(a.op) if a.op else None, a.workers, quick=a.quick)
    bad = problems(rows)
    if bad:
        verdict = f"{len(bad)} problem(s):\n" + "\n".join(f"  {line}" for line in bad)
    else:
        verdict = (f"clean: {len(rows)} compiled kernels, no spills, shared memory within limits, tensor cores and a "
                   "pipelined K loop in every GEMM kernel")
    report = f"{format_table(rows)}\n\n{cost_table()}\n\n{verdict}"
    print(report)
    if a.md:
        _write_md(a.md, argv, rows, report)
    if a.json:
        with open(a.json, "w") as f:
            json.dump([dict(dataclasses.asdict(r), pipelined=r.pipelined, stages_resident=r.stages_resident)
                       for r in rows], f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
