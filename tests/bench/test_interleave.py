"""Interleaved measurement (bench/_common.py): the order of the runs, the median and spread of per-pair ratios,
"noisy" above the bound, and that every bench script takes its ratios from alternating runs. Fake callables and
fake workers only: nothing here measures time."""

from __future__ import annotations

import itertools
import math

import pytest

from deepeyesv2.commands import bench as B

C = B.import_bench("bench._common")


def recording_sides(names, log, fail_at=None):
    """Sides that append their name to `log` and return "<name><call index>"; side `fail_at[0]` returns
    {"error": ...} on its call number `fail_at[1]`."""
    def make(name):
        counter = itertools.count()

        def call():
            i = next(counter)
            log.append(name)
            if fail_at and fail_at == (name, i):
                return {"error": f"{name} broke"}
            return f"{name}{i}"
        return call
    return {n: make(n) for n in names}


def fake_load(*values):
    it = iter(values)
    return lambda: next(it)


def test_interleave_runs_a_b_a_b_after_one_warmup_each():
    log: list[str] = []
    run = C.interleave(recording_sides("ab", log), rounds=3, warmup=1, load=fake_load(0.5, 4.0))
    assert log == ["a", "b", "a", "b", "a", "b", "a", "b"]
    assert run.calls == tuple(log)
    assert run.results == {"a": ["a1", "a2", "a3"], "b": ["b1", "b2", "b3"]}  # the warm-ups a0 / b0 are dropped
    assert (run.load_before, run.load_after) == (0.5, 4.0) and run.load == [0.5, 4.0]


def test_interleave_round_robin_over_more_sides_and_without_warmup():
    log: list[str] = []
    run = C.interleave(recording_sides(["naive", "ours", "liger"], log), rounds=2, warmup=0, load=fake_load(1, 1))
    assert log == ["naive", "ours", "liger", "naive", "ours", "liger"]
    assert run.results["ours"] == ["ours0", "ours1"]


def test_interleave_does_not_call_a_failed_side_again():
    log: list[str] = []
    run = C.interleave(recording_sides("ab", log, fail_at=("b", 1)), rounds=3, warmup=1,
                       failed=lambda r: isinstance(r, dict), load=fake_load(1, 1))
    assert log == ["a", "b", "a", "b", "a", "a"]
    assert run.results["b"] == [{"error": "b broke"}] and C.first_failure(run.results["b"]) == {"error": "b broke"}
    assert run.results["a"] == ["a1", "a2", "a3"] and C.first_failure(run.results["a"]) is None
    log.clear()  # a failure in the warm-up is kept: the caller must see why the side has no results
    run = C.interleave(recording_sides("ab", log, fail_at=("a", 0)), rounds=2, failed=lambda r: isinstance(r, dict),
                       load=fake_load(1, 1))
    assert log == ["a", "b", "b", "b"] and run.results["a"] == [{"error": "a broke"}]


def test_interleave_rejects_bad_counts():
    with pytest.raises(ValueError, match="rounds"):
        C.interleave({"a": lambda: 1}, rounds=0)
    with pytest.raises(ValueError, match="warmup"):
        C.interleave({"a": lambda: 1}, rounds=1, warmup=-1)


def test_pair_stats_median_and_spread_on_known_numbers():
    st = C.pair_stats([0.9, 1.0, 1.1, 1.2], [1.0, 1.0, 1.0, 1.0])
    assert st.ratios == pytest.approx((0.9, 1.0, 1.1, 1.2))
    assert (st.median, st.lo, st.hi) == pytest.approx((1.05, 0.9, 1.2))
    assert st.spread == pytest.approx(1.2 / 0.9) and not st.noisy and st.bound == C.NOISY_SPREAD == 1.5
    # the median of the pair ratios, not the ratio of the medians (2 / 2.1 here)
    st = C.pair_stats([1.0, 2.0, 3.0], [1.0, 2.1, 2.9])
    assert st.median == pytest.approx(1.0) and st.lo == pytest.approx(2.0 / 2.1) and st.hi == pytest.approx(3 / 2.9)
    noisy = C.pair_stats([1.0, 2.0, 3.0], [2.0, 2.0, 2.0])
    assert noisy.ratios == (0.5, 1.0, 1.5) and noisy.median == 1.0 and noisy.spread == 3.0 and noisy.noisy
    assert not C.pair_stats([1.0, 1.5], [1.0, 1.0]).noisy  # exactly at the bound: kept ("exceeds" is noisy)
    assert C.pair_stats([1.0, 1.51], [1.0, 1.0]).noisy
    assert C.pair_stats([2.0, 2.0], [0.0, 0.5], floor=1.0).ratios == (2.0, 2.0)  # bytes: a zero peer is 1 byte
    zero = C.pair_stats([2.0, 2.0], [0.0, 1.0])
    assert zero.ratios[0] == math.inf and zero.noisy
    with pytest.raises(ValueError, match="as many"):
        C.pair_stats([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="as many"):
        C.pair_stats([], [])


def _run(load=(1.0, 2.0)):
    return C.Interleaved(results={}, calls=(), load_before=load[0], load_after=load[1])


def test_rows_print_ratio_with_spread_or_noisy_and_the_load():
    ok = C.paired_row("step time", [1.0, 2.0, 3.0], [1.0, 2.1, 2.9], C.fmt_seconds, "cpu", _run((1.04, 7.9)))
    assert ok["ours"] == "2000 ms" and ok["peer"] == "2100 ms" and ok["pairs"] == 3 and ok["noisy"] is False
    assert C.ratio_cell(ok) == "1.000 (0.952-1.034)" and C.load_cell(ok) == "1.0->7.9"
    noisy = C.bytes_row("peak mem", [1e6, 2e6, 3e6], [2e6, 2e6, 2e6], "cpu", _run())
    assert noisy["noisy"] is True and C.ratio_cell(noisy) == "noisy (0.5-1.5)"
    exact = C.exact_row("tokens prefilled", 500, 2000, "cpu")
    assert C.ratio_cell(exact) == "0.250 (exact)" and C.load_cell(exact) == "-"
    assert C.ratio_cell(C.failed_row("x", {"error": "boom"}, {}, "cpu")) == "n/a"
    table = C.ratio_table([ok, noisy, exact])
    assert "| step time | 2000 ms | 2100 ms | 1.000 (0.952-1.034) | 1.0->7.9 | cpu |" in table
    assert "| peak mem | 2 MiB | 2 MiB | noisy (0.5-1.5) | 1.0->2.0 | cpu |" in table


def test_report_keeps_the_paired_median_spread_and_load():
    ok = C.paired_row("step time", [1.0, 2.0, 3.0], [1.0, 2.1, 2.9], C.fmt_seconds, "cpu", _run((1.0, 2.0)))
    noisy = C.paired_row("tokens/s", [1.0, 2.0, 3.0], [2.0, 2.0, 2.0], round, "cpu", _run((3.0, 9.0)))
    rows = B.normalize_rows([ok, noisy, C.exact_row("tokens prefilled", 500, 2000, "cpu")])
    # not recomputed from the displayed medians (2000 ms / 2100 ms = 0.952): the median of the pairs stays
    assert rows[0]["ratio"] == pytest.approx(1.0) and rows[0]["ratio_min"] == pytest.approx(2 / 2.1)
    assert rows[1]["noisy"] is True and rows[2]["exact"] is True and rows[2]["ratio"] == 0.25
    table = B.markdown_table(rows)
    assert "| step time | 2000 ms | 2100 ms | 1.000 (0.952-1.034) | lower | 1.0->2.0 | cpu |" in table
    assert "| tokens/s | 2 | 2 | noisy (0.5-1.5) | higher | 3.0->9.0 | cpu |" in table
    assert "| tokens prefilled | 500 | 2000 | 0.250 (exact) | lower | - | cpu |" in table


# ------------------------------------------------------------------------------ every script alternates
class FakeWorkers:
    """Stands in for bench._common.run_worker: records (module, worker) per call and answers from `answer`."""

    def __init__(self, answer):
        self.calls: list[tuple[str, str]] = []
        self.answer = answer

    def __call__(self, module, worker, payload=None, **kwargs):
        self.calls.append((module, worker))
        return self.answer(worker, payload, len([c for c in self.calls if c[1] == worker]) - 1)


def test_kernels_alternate_one_process_per_method_and_round(monkeypatch):
    K = B.import_bench("bench.kernels")
    secs = {"naive": 1.0, "liger-ce": 2.0, "ours": 0.5, "liger-grpo": 1.0, "ours-grpo": 0.5}

    def answer(method, payload, i):
        if method == "liger-ce":
            return {"error": "no liger"}
        return {"seconds": secs[method] * (1 + 0.1 * i), "extra_bytes": 1000.0 if method.startswith("ours") else 4000.0}

    fake = FakeWorkers(answer)
    monkeypatch.setattr(K, "run_worker", fake)
    rows = K.cpu_rows(quick=True, verbose=False, rounds=2)
    workers = [w for _, w in fake.calls]
    assert workers == ["naive", "liger-ce", "ours", "liger-grpo", "ours-grpo", "naive", "ours", "liger-grpo", "ours-grpo"]
    by = {r["benchmark"]: r for r in rows}
    t = by["logprob+entropy fwd+bwd time (ours vs naive)"]
    assert t["ratio"] == pytest.approx(0.5) and t["pairs"] == 2 and not t["noisy"] and len(t["load"]) == 2
    assert by["logprob+entropy fwd+bwd peak extra mem (ours vs naive)"]["ratio"] == pytest.approx(0.25)
    assert by["logprob+entropy fwd+bwd vs liger-ce"]["peer"] == "no liger"


def test_integrations_memory_e2e_and_scaling_alternate_fresh_processes(monkeypatch, tmp_path):
    I = B.import_bench("bench.integrations")
    fake = FakeWorkers(lambda v, p, i: {"step_seconds": 1.0 if v == "ours" else 2.0, "peak_growth_bytes": 100.0,
                                        "threads": 2})
    monkeypatch.setattr(I, "run_worker", fake)
    rows = I.rows(quick=True, verbose=False, rounds=3)
    assert [w for _, w in fake.calls] == ["trl", "ours"] * 3
    assert rows[0]["ratio"] == 0.5 and rows[0]["pairs"] == 3 and rows[1]["ratio"] == 1.0

    M = B.import_bench("bench.memory")
    fake = FakeWorkers(lambda kind, p, i: {"peak_growth_bytes": 50.0 if kind == "ours" else 200.0})
    monkeypatch.setattr(M, "run_worker", fake)
    rows = M.rows(quick=True, verbose=False, rounds=2)
    assert [w for _, w in fake.calls] == ["ours", "trl"] * 2 * len(M.PAIRS)
    assert [r["ratio"] for r in rows] == [0.25] * len(M.PAIRS)

    E = B.import_bench("bench.e2e_grpo")
    keys = ("seconds", "cpu_seconds", "gen_seconds", "generated_tok_s", "trained_tok_s", "peak_rss_growth_bytes",
            "prompt_tokens", "min_seconds")

    def e2e_answer(v, p, i):
        if v == "trl-liger":
            return {"error": "ImportError: no Liger for Qwen2.5-VL"}
        return {**{k: (1.0 if v == "ours" else 2.0) * (1 + i) for k in keys}, "device": "CPU x2 threads, fp32"}

    fake = FakeWorkers(e2e_answer)
    monkeypatch.setattr(E, "run_worker", fake)
    rows = E.rows(quick=True, verbose=False, engine="embedded", trl_vllm="off", rounds=2)
    assert [w for _, w in fake.calls] == ["ours", "trl", "trl-liger", "ours", "trl"]  # a failed side is not rerun
    timed = [r for r in rows if "ratio_min" in r]
    assert len(timed) == len(E.METRICS) and all(r["ratio"] == 0.5 and not r["noisy"] for r in timed)
    assert rows[-1]["ratio"] is None and "ImportError" in rows[-1]["note"]

    S = B.import_bench("bench.scaling")

    def sweep(method, grid, i):
        return [{"method": method, "axis": a, "T": T, "V": V, "seconds": (1.0 if method == "ours" else 3.0) * (1 + i),
                 "extra_bytes": 10.0 if method == "ours" else 100.0}
                for a, T, V in S.points(S.Grid(**{k: tuple(v) if isinstance(v, list) else v for k, v in grid.items()}))]

    fake = FakeWorkers(sweep)
    monkeypatch.setattr(S, "run_worker", fake)
    rows = S.rows(quick=True, png=str(tmp_path / "s.png"), verbose=False, rounds=2)
    assert [w for _, w in fake.calls] == ["ours", "naive", "ours", "naive"]
    assert [r["ratio"] for r in rows] == pytest.approx([1 / 3, 0.1, 1 / 3, 0.1]) and all(r["pairs"] == 2 for r in rows)
    assert (tmp_path / "s.png").is_file()
