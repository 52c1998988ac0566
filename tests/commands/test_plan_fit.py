"""`deepeyesv2 plan` for a real architecture from the tiny example config: real-model defaults (stated, and a
command-line key wins over them), the computed changes that make a step fit (each one fits, none holds a change it
does not need, and rerunning plan with a line's flags says it fits), and the budget's unit."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from deepeyesv2.commands.cli import main
from deepeyesv2.commands.plan import GiB, PlanSetup, changes_that_fit, load_arch, plan

README_PLAN = ["plan", "--config", "examples/rl_tiny.yaml", "--model", "qwen2.5-vl-7b", "--gpu-mem", "24GiB"]


def _plan(capsys, *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def _apply(p: PlanSetup, changes) -> PlanSetup:
    return replace(p, **{k: v for c in changes for k, v in c.setup.items()})


def test_real_architecture_gets_real_model_defaults(capsys):
    out = _plan(capsys, *README_PLAN)
    assert "assumed for the real architecture qwen2.5-vl-7b" in out
    assert "model.dtype=bfloat16 (config: float32)" in out and "bfloat16 on cuda" in out
    # 2 prompts x G=4 x 1024 tokens of the example config, instead of its 200000-token budget
    assert "rollout.cache_tokens=8192 (config: 200000)" in out
    peak = float(re.search(r"predicted peak: ([0-9.]+) GiB", out).group(1))
    assert peak < 100, "bf16 full fine-tune of 7B at 4k-token rows: ~85 GiB, not the fp32 164 GiB"

    kept = _plan(capsys, *README_PLAN, "--model.dtype", "float32")
    assert "model.dtype=bfloat16" not in kept and "float32 on cuda" in kept
    # a preset or no --model: the config is planned as written, nothing assumed
    assert "assumed" not in _plan(capsys, "plan", "--config", "examples/rl_tiny.yaml", "--gpu-mem", "24GiB")


def test_every_printed_way_fits_when_rerun(capsys):
    out = _plan(capsys, *README_PLAN)
    assert "does NOT fit" in out
    ways = re.findall(r"^  \d\. (.+?)   -> ", out, re.MULTILINE)
    assert 1 <= len(ways) <= 3, out
    for flags in ways:
        rerun = _plan(capsys, *README_PLAN, *flags.split())
        assert "budget 24.00 GiB: fits" in rerun, (flags, rerun)


@pytest.mark.parametrize("model, budget_gib", [("qwen2.5-vl-3b", 24), ("qwen2.5-vl-7b", 48), ("qwen2.5-vl-7b", 80)])
def test_changes_fit_and_are_minimal(model, budget_gib):
    a, budget = load_arch(model), budget_gib * GiB
    p = PlanSetup(dtype="float32", cache_tokens=200_000, row_tokens=8192, kl="device-copy")
    assert plan(a, p)["peak"] > budget
    found = changes_that_fit(a, p, budget)
    assert found
    for changes, peak in found:
        assert plan(a, _apply(p, changes))["peak"] == peak <= budget
        for drop in range(len(changes)):  # without any one of its changes the step does not fit
            assert plan(a, _apply(p, changes[:drop] + changes[drop + 1:]))["peak"] > budget, changes
    sizes = [len(c) for c, _ in found]
    assert sizes == sorted(sizes)


def test_fits_or_nothing_fits(capsys):
    assert "budget 80.00 GiB: fits" in _plan(capsys, "plan", "--config", "examples/rl_tiny.yaml", "--gpu-mem", "80GiB")
    out = _plan(capsys, *README_PLAN[:-1], "1GiB")
    assert "no set of up to 3 changes fits" in out


@pytest.mark.parametrize("text", ["24", "24.5", " 80 "])
def test_budget_without_unit_is_refused(text, capsys):
    assert main(README_PLAN[:-1] + [text]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no unit" in err[0]
