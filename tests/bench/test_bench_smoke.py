"""`deepeyesv2 bench` plumbing without running the benchmarks: rows -> ratios -> markdown report, failure rows
from a crashing / timed-out subprocess, and that every bench module imports and exposes its entry point."""

from __future__ import annotations

import math

import pytest

from deepeyesv2.commands import bench as B


def test_parse_value_known_units():
    assert B.parse_value(12) == 12.0
    assert B.parse_value("12 ms") == pytest.approx(0.012)
    assert B.parse_value("1.5 s") == 1.5
    assert B.parse_value("300 MiB") == 300 * 2**20
    assert B.parse_value("1.25 GiB") == 1.25 * 2**30
    assert B.parse_value("62.5%") == pytest.approx(0.625)
    assert B.parse_value("1,234") == 1234.0
    for bad in ("failed", "n/a", None, float("nan"), "ok", True):
        assert B.parse_value(bad) is None, bad


def test_normalize_recomputes_ratio_as_ours_over_peer_and_folds_info_rows():
    rows = [
        # bench/rollout.py reports peer / ours; the report always says ours / peer
        {"benchmark": "tokens prefilled", "ours": 500, "peer": 2000, "ratio": 4.0, "device": "cpu"},
        {"benchmark": "prefill saved by prefix cache", "ours": "75.0%", "peer": "0%", "ratio": None, "device": "cpu"},
        {"benchmark": "fwd+bwd tokens/s", "ours": 300, "peer": 100, "ratio": 3.0},
        {"benchmark": "step time", "ours": "120 ms", "peer": "1.2 s", "ratio": 0.5, "note": "x"},
        {"benchmark": "GRPO step (ours vs TRL + Liger)", "ours": "ok", "peer": "n/a", "ratio": None, "better": "lower"},
        {"benchmark": "odd", "ours": "a", "peer": "b", "ratio": float("nan")},
    ]
    out = B.normalize_rows(rows, default_device="dev")
    assert [r["benchmark"] for r in out] == ["tokens prefilled", "fwd+bwd tokens/s", "step time",
                                             "GRPO step (ours vs TRL + Liger)", "odd"]
    assert out[0]["ratio"] == 0.25 and out[0]["better"] == "lower"
    assert "prefill saved by prefix cache: 75.0% vs 0%" in out[0]["note"]
    assert out[1]["ratio"] == 3.0 and out[1]["better"] == "higher" and out[1]["device"] == "dev"
    assert out[2]["ratio"] == pytest.approx(0.1) and out[2]["note"] == "x"
    assert out[3]["ratio"] is None and out[3]["better"] == "lower"
    assert out[4]["ratio"] is None and out[4]["better"] == "?"
    with pytest.raises(ValueError, match="benchmark"):
        B.normalize_rows([{"ours": 1}])


def test_report_table_from_fake_rows():
    rows = B.normalize_rows([{"benchmark": "a time", "ours": "1 s", "peer": "2 s", "device": "cpu", "note": "n|1"},
                             {"benchmark": "b tokens/s", "ours": 10, "peer": 5, "device": "cpu"}])
    rows.append(B.failed_row("e2e_grpo", "exit 1: RuntimeError: boom", "cpu"))
    for r, g in zip(rows, ("kernels", "kernels", "e2e_grpo")):
        r["group"] = g
    text = B.report(rows, date="2026-01-02", device="cpu-2c", command="deepeyesv2 bench --quick", quick=True,
                    timings={"kernels": 3.2, "e2e_grpo": 1.0}, vers={"torch": "9.9", "trl": "1.0"}, load=(1.25, 3.5))
    lines = text.splitlines()
    table = [ln for ln in lines if ln.startswith("|")]
    assert table[0] == "| group | benchmark | ours | peer | ours/peer (min-max) | better | load | device | note |"
    assert len(table) == 2 + 3 and all(ln.count("|") == 10 for ln in table)  # "n|1" was escaped
    # rows not measured interleaved say so instead of passing for a paired median
    assert table[2].split("|")[5].strip() == "0.500 (single run)" and table[3].split("|")[5].strip() == "2.000 (single run)"
    assert "| e2e_grpo | e2e_grpo | failed |" in table[4] and "boom" in table[4]
    assert lines[0] == "# deepeyesv2 bench -- 2026-01-02 -- cpu-2c"
    assert "`deepeyesv2 bench --quick`" in text and "torch 9.9" in text and "kernels 3 s" in text
    assert "load average 1.2 before the first benchmark, 3.5 after the last" in text
    assert "noisy" in text and "1.5" in text  # the bound is stated where the table is


def test_main_writes_report(tmp_path, monkeypatch, capsys):
    fake = [{"group": "packing", **B.normalize_rows([{"benchmark": "t time", "ours": 1, "peer": 4}])[0]}]
    seen = {}

    def fake_run(specs, quick, timeout, integrations_full=False, progress=True):
        seen.update(names=[s.name for s in specs], quick=quick, timeout=timeout)
        return fake, {"packing": 0.5}

    monkeypatch.setattr(B, "run_benchmarks", fake_run)
    out = tmp_path / "r.md"
    assert B.main(["--quick", "--only", "packing,e2e_grpo", "--out", str(out)]) == 0
    assert seen == {"names": ["packing", "e2e_grpo"], "quick": True, "timeout": 900.0}
    text = out.read_text()
    assert "| packing | t time | 1 | 4 | 0.250 (single run) | lower | - |" in text
    assert "1-minute load average" in text
    assert "--only packing,e2e_grpo" in text and text in capsys.readouterr().out
    assert B.main(["--only", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_device_slug_and_selection():
    assert B.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert [b.name for b in B.select(None, cuda=False)] == [b.name for b in B.BENCHMARKS if not b.needs_cuda]
    assert "kernels-gpu" in [b.name for b in B.select(None, cuda=True)]


def test_failing_and_slow_benchmarks_become_failed_rows():
    rows, timings = B.run_benchmarks([B.BY_NAME["packing"]], quick=True, timeout=0.01, progress=False)
    assert rows[0]["ours"] == "failed" and "timed out" in rows[0]["note"] and rows[0]["group"] == "packing"
    spec = B.BY_NAME["scaling"]
    got, _, err = B.run_one(spec, quick=True, timeout=300, kwargs={"no_such_argument": 1})
    assert got == [] and "TypeError" in err and "no_such_argument" in err


@pytest.mark.parametrize("spec", [b for b in B.BENCHMARKS], ids=lambda b: b.name)
def test_bench_modules_import(spec):
    mod = B.import_bench(spec.module)
    assert callable(getattr(mod, spec.function)), f"{spec.module}.{spec.function}"


def test_scaling_plot_and_points(tmp_path):
    scaling = B.import_bench("bench.scaling")
    grid = scaling.Grid(H=8, seq_lens=(16, 32), V_for_T=64, vocabs=(32, 64), T_for_V=16)
    pts = scaling.points(grid)
    assert pts == [("T", 16, 64), ("T", 32, 64), ("V", 16, 32), ("V", 16, 64)]
    results = [{"method": m, "axis": a, "T": T, "V": V, "seconds": 0.001 * T, "extra_bytes": 1000 * V}
               for m in scaling.METHODS for a, T, V in pts]
    results[-1] = {**results[-1], "error": "OutOfMemoryError: x"}
    png = scaling.plot(results, grid, str(tmp_path / "s.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_e2e_grpo_shared_task():
    e2e = B.import_bench("bench.e2e_grpo")
    prompts = e2e.task_prompts(e2e.QUICK)
    assert len(prompts) == e2e.QUICK.prompts and all(p.images[0].size == (112, 112) for p in prompts)
    assert [e2e.text_reward("x" * n) for n in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 0.0]
    assert not math.isnan(e2e.text_reward("  padded  "))


def test_e2e_grpo_backends_on_cpu_and_gpu(monkeypatch):
    """auto picks SGLang / vLLM only on CUDA with the package installed; explicit choices are kept."""
    import importlib.util

    e2e = B.import_bench("bench.e2e_grpo")
    assert e2e.resolve_backends("auto", "auto", cuda=False) == {"cuda": False, "engine": "embedded", "vllm": False}
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("sglang", "vllm") else real(n, *a))
    assert e2e.resolve_backends("auto", "auto", cuda=True) == {"cuda": True, "engine": "embedded", "vllm": False}
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n in ("sglang", "vllm") else real(n, *a))
    assert e2e.resolve_backends("auto", "auto", cuda=True) == {"cuda": True, "engine": "sglang", "vllm": True}
    assert e2e.resolve_backends("auto", "auto", cuda=False)["engine"] == "embedded"
    assert e2e.resolve_backends("sglang", "off", cuda=False) == {"cuda": False, "engine": "sglang", "vllm": False}
    with pytest.raises(ValueError, match="--engine"):
        e2e.resolve_backends("vllm", "auto")
    with pytest.raises(ValueError, match="--trl-vllm"):
        e2e.resolve_backends("auto", "yes")


def test_e2e_grpo_trl_config_matches_ours_on_both_devices():
    """The TRL peer's GRPOConfig: every key exists in the installed TRL, the same loss as ours, and on a GPU
    bf16 with vLLM colocated at the same memory fraction SGLang gets."""
    import dataclasses

    from trl import GRPOConfig

    e2e = B.import_bench("bench.e2e_grpo")
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    cpu = e2e.trl_config_kwargs(e2e.QUICK, liger=False, cuda=False, output_dir="/tmp/x")
    gpu = e2e.trl_config_kwargs(dataclasses.replace(e2e.QUICK, vllm=True), liger=True, cuda=True, output_dir="/tmp/x")
    for kw in (cpu, gpu):
        assert set(kw) <= fields, set(kw) - fields
        assert (kw["loss_type"], kw["epsilon"], kw["epsilon_high"], kw["beta"]) == ("dapo", 0.2, 0.28, 0.0)
        assert kw["per_device_train_batch_size"] == e2e.QUICK.prompts * e2e.QUICK.group
    assert cpu["use_cpu"] and not cpu["bf16"] and "use_vllm" not in cpu
    assert not gpu["use_cpu"] and gpu["bf16"] and gpu["use_liger_kernel"]
    assert gpu["use_vllm"] and gpu["vllm_mode"] == "colocate" and gpu["vllm_gpu_memory_utilization"] == e2e.ENGINE_MEM_FRACTION
    args = GRPOConfig(**cpu)  # the CPU configuration is accepted as built
    assert args.loss_type == "dapo" and args.num_generations == e2e.QUICK.group


def test_e2e_grpo_sglang_without_a_gpu_is_a_clear_error():
    e2e = B.import_bench("bench.e2e_grpo")
    import dataclasses

    with pytest.raises(RuntimeError, match="sglang|CUDA"):
        e2e._ours_trainer(dataclasses.replace(e2e.MICRO, engine="sglang"))
