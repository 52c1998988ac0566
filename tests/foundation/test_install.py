"""Our folders install under collision-free names beside Hugging Face's `kernels`, and the CLI works."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(code: str, cwd: str) -> dict:
    # A fresh interpreter outside the repo: what an installed user sees, with no repo folder on sys.path.
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_no_shadowing_and_transformers_probe(tmp_path):
    res = _run(
        """
import importlib.util, json, sys
import deepeyesv2_kernels, deepeyesv2_rollout, deepeyesv2
from transformers.utils import import_utils as iu
spec = importlib.util.find_spec("kernels")
hf = None
if spec is not None:
    import kernels
    hf = {"file": kernels.__file__, "get_kernel": hasattr(kernels, "get_kernel")}
print(json.dumps({"ours": deepeyesv2_kernels.__file__, "rollout": deepeyesv2_rollout.__file__,
                  "hf": hf, "probe": bool(iu.is_kernels_available()), "rollout_spec": str(importlib.util.find_spec("rollout"))}))
""",
        str(tmp_path),
    )
    assert res["ours"].endswith(os.path.join("kernels", "__init__.py"))
    assert Path(res["ours"]).resolve().parent == (REPO / "kernels").resolve()
    if res["hf"] is not None:
        # Hugging Face's package is importable under its own name, untouched by ours.
        assert res["hf"]["get_kernel"], res
        assert Path(res["hf"]["file"]).resolve().parent != (REPO / "kernels").resolve()
    else:
        # Nothing named `kernels` exists, so transformers' probe must say no (ours is not mistaken for it).
        assert res["probe"] is False
    assert "/work" not in res["rollout_spec"] or res["rollout_spec"] == "None"


def test_kernels_import_nothing_from_trainer(tmp_path):
    res = _run(
        """
import json, sys
import deepeyesv2_kernels as k
k.fused_logprobs, k.grpo_loss, k.group_advantages, k.apply_mrope
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("deepeyesv2", "deepeyesv2_rollout", "transformers"))
print(json.dumps({"bad": bad}))
""",
        str(tmp_path),
    )
    assert res["bad"] == []


def test_cli_info(tmp_path):
    out = subprocess.run([sys.executable, "-m", "deepeyesv2", "info"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "attention.sdpa" in text and "attention.flash" in text and "needs a CUDA device" in text
    line = [ln for ln in text.splitlines() if ln.startswith("forward")][0]
    assert "3 samples" in line and "2 images" in line and "NLL" in line
