"""`--help` that teaches: every config field has a one-line description, `--help` shows it with the field's allowed
values (every enum's names, from `config.constraints()`), each stage lists only the sections it reads, `plan --help`
shows `--config` and the keys the planner reads, and an attention backend this machine cannot run is refused in one
line before any model is built."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deepeyesv2.commands.cli import main
from deepeyesv2.commands.plan import PLAN_KEYS
from deepeyesv2.config import Config, config_parser, constraints, field_help

ENUMS = ("train.autocast", "rl.loss_agg", "rl.adv_norm", "rl.kl_estimator", "rollout.engine", "rl.reward",
         "model.dtype", "model.attn_backend")


def _flat(text: str) -> str:
    return " ".join(text.split())


def _help(argv: list[str], capsys) -> str:
    try:
        rc = main(argv)
    except SystemExit as e:  # jsonargparse exits after printing help
        rc = e.code
    out = capsys.readouterr()
    assert rc in (0, None), out.err[-500:]
    return out.out


@pytest.fixture(autouse=True)
def _wide(monkeypatch):
    # argparse wraps help at the terminal width, breaking 'seq-mean-token-mean' at its hyphens
    monkeypatch.setenv("COLUMNS", "1000")


def test_every_field_has_a_one_line_help():
    helps = field_help()
    assert set(helps) == set(constraints()), "field_help and constraints() must cover the same fields"
    for key, text in helps.items():
        assert text.strip() and "\n" not in text, f"{key}: give it a one-line help (config.setting(default, help))"


def test_enum_fields_list_their_values():
    checks = constraints()
    enums = {k for k, c in checks.items() if c.choices}
    assert set(ENUMS) <= enums, set(ENUMS) - enums
    options = _flat(config_parser().format_help()).split(" options: ", 1)[1]  # past the usage line
    for key, help_text in field_help().items():
        entry = options.split(f"--{key} ", 1)[1].split("(type:", 1)[0]  # its help and allowed values
        assert _flat(help_text) in entry and f"Allowed: {checks[key].allowed}" in entry, (key, entry)
        for value in checks[key].choices:
            assert repr(value) in entry, f"--help of {key} does not list {value!r}"


def test_rl_help_lists_every_field_and_sft_only_its_sections(capsys):
    rl = _help(["rl", "--help"], capsys)
    for key in field_help():
        assert f"--{key} " in rl, key
    sft = _help(["sft", "--help"], capsys)
    for key in field_help():
        shown = f"--{key} " in sft
        reads = key.split(".")[0] in ("model", "data", "optim", "train") or key in ("rollout.protocol", "rollout.system_prompt")
        assert shown == reads, key
    assert "Allowed: one of 'auto', 'bf16', 'off'" in _flat(sft)


def test_sft_still_accepts_rl_keys_from_a_shared_yaml():
    parser = config_parser(shown=("model", "data", "optim", "train"))
    assert parser.parse_args(["--rl.group_size", "3"]).rl.group_size == 3
    assert {f.name for f in dataclasses.fields(Config)} >= {"rl", "rollout"}


def test_plan_help_shows_config_and_its_keys(capsys):
    out = _help(["plan", "--help"], capsys)
    assert "--config CONFIG" in out and "--gpu-mem" in out
    for key in PLAN_KEYS:
        assert f"--{key} " in out, key
    assert "--rl.clip_high" not in out  # not read by the planner


def test_plan_rejects_a_budget_without_a_unit(capsys):
    assert main(["plan", "--config", "examples/rl_tiny.yaml", "--gpu-mem", "24"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no unit" in err[0] and "24GiB" in err[0], err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
@pytest.mark.parametrize("cmd", ["sft", "rl"])
def test_flash_attention_on_cpu_says_it_needs_cuda(cmd, capsys):
    assert main([cmd, "--config", f"examples/{cmd}_tiny.yaml", "--model.attn_backend", "flash"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.attn_backend='flash' needs a CUDA device" in err[0], err
    assert "kernels" not in err[0]
