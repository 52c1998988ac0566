"""The kernels stand alone: no deepeyesv2 / rollout imports, and a copy of the folder works under another name.

Both checks run in a fresh interpreter (subprocess) with its working directory outside the repo, so nothing
this test process already imported can hide a stray dependency.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import deepeyesv2_kernels

KERNELS_DIR = Path(deepeyesv2_kernels.__file__).parent

# Calls every public op once on tiny CPU inputs, then reports which project packages got imported.
# `PKG` is the import name of the kernels folder (installed name, or the name of a copy).
CALL_EVERY_OP = r"""
import importlib, json, sys
import torch
import {PKG} as pkg

k = pkg

torch.manual_seed(0)
T, H, V = 11, 8, 37
hidden = torch.randn(T, H, requires_grad=True)
weight = torch.randn(V, H, requires_grad=True)
targets = torch.randint(0, V, (T,))
mask = torch.ones(T, dtype=torch.bool); mask[:3] = False
cu = torch.tensor([0, 5, T], dtype=torch.int32)
old = torch.randn(T) * 0.1 - 3
adv = torch.randn(T)

logp, ent = k.fused_logprobs(hidden, weight, targets, temperature=0.7)
ref_logp, ref_ent = k.logprobs_ref(hidden, weight, targets, temperature=0.7)
chunk_logp, _ = k.chunked_logprobs(hidden, weight, targets, 0.7)
logp.sum().backward()
checks = {{
    "fused_logprobs": float((logp - ref_logp).abs().max()),
    "entropy": float((ent - ref_ent).abs().max()),
    "chunked_logprobs": float((chunk_logp - ref_logp).abs().max()),
}}
loss, _ = k.grpo_loss(ref_logp.detach().requires_grad_(), old, adv, mask, cu)
loss_ref, _ = k.grpo_loss_ref(ref_logp.detach(), old, adv, mask, cu)
checks["grpo_loss"] = float((loss - loss_ref).abs())
floss, _ = k.fused_linear_grpo_loss(hidden, weight, targets, old, adv, mask, cu)
floss_ref, _ = k.fused_linear_grpo_loss_ref(hidden, weight, targets, old, adv, mask, cu)
checks["fused_linear_grpo_loss"] = float((floss - floss_ref).abs())
rewards, groups = torch.tensor([1.0, 0.0, 2.0, 1.0]), torch.tensor([0, 0, 1, 1])
a, _ = k.group_advantages(rewards, groups)
a_ref, _ = k.group_advantages_ref(rewards, groups)
checks["group_advantages"] = float((a - a_ref).abs().max())
q, kk = torch.randn(T, 4, 16), torch.randn(T, 2, 16)
pos = torch.arange(T).expand(3, T).contiguous()
inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
qo, ko = k.apply_mrope(q, kk, pos, inv_freq, [2, 3, 3])
checks["apply_mrope_shape"] = float(qo.shape == q.shape and ko.shape == kk.shape)
assert callable(k.patch_qwen2_5_vl)

project = sorted(m for m in sys.modules
                 if m.split(".")[0] in ("deepeyesv2", "deepeyesv2_rollout", "rollout"))
print(json.dumps({{"checks": checks, "project_modules": project, "file": pkg.__file__}}))
"""


def _run(code: str, cwd: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_ops_agree(checks: dict) -> None:
    assert checks.pop("apply_mrope_shape") == 1.0, "apply_mrope changed shapes"
    for name, err in checks.items():
        assert err < 1e-4, f"{name} disagrees with its reference by {err}"


def test_installed_kernels_import_nothing_from_the_project(tmp_path):
    out = _run(CALL_EVERY_OP.format(PKG="deepeyesv2_kernels"), cwd=tmp_path)
    assert out["project_modules"] == [], f"deepeyesv2_kernels pulled in {out['project_modules']}"
    _assert_ops_agree(out["checks"])


def test_copied_folder_works_as_kernels(tmp_path):
    copy = tmp_path / "kernels"
    shutil.copytree(KERNELS_DIR, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = _run("from kernels import fused_logprobs\n" + CALL_EVERY_OP.format(PKG="kernels"), cwd=tmp_path)
    assert Path(out["file"]).resolve().parent == copy.resolve(), f"imported {out['file']}, not the copy"
    assert out["project_modules"] == [], f"the copy pulled in {out['project_modules']}"
    _assert_ops_agree(out["checks"])


# Every public name must resolve to the op, whatever was imported before. Today it does not: importing a submodule
# binds the package attribute of the same name to the MODULE (grpo_loss.py imports grpo_loss_ref.py, so after
# `k.grpo_loss`, `k.grpo_loss_ref` is a module and PEP 562's __getattr__ is never asked). Affects the exports named
# like their module: logprobs_ref, grpo_loss, grpo_loss_ref. Fix belongs in kernels/__init__.py.
RESOLVE_AFTER_SUBMODULE_IMPORTS = r"""
import importlib, json, pkgutil, types
import deepeyesv2_kernels as k
for info in pkgutil.iter_modules(k.__path__):
    importlib.import_module("deepeyesv2_kernels." + info.name)
print(json.dumps(sorted(n for n in k.__all__ if isinstance(getattr(k, n), types.ModuleType))))
"""


def test_public_names_are_functions_after_submodule_imports(tmp_path):
    proc = subprocess.run([sys.executable, "-c", RESOLVE_AFTER_SUBMODULE_IMPORTS], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shadowed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert shadowed == [], f"deepeyesv2_kernels.<name> is a module, not the op, for {shadowed}"
