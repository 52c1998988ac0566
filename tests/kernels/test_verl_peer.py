"""Our verl drop-in against verl 0.9.1 itself (bench/verl_peer.py), and that bench's judge on doctored sides.

The slow test builds (first time: about a minute, pip from the registries) or reuses the cached verl venv and runs
every side; CI skips it (`-m "not slow"`). The other tests feed the judge in-process results, with fp32 formulas
standing in for verl, so they need neither verl nor its venv.
"""

from __future__ import annotations

import copy

import pytest
import torch

from deepeyesv2.commands import bench as B

peer = B.import_bench("bench.verl_peer")
worker = B.import_bench("bench.verl_peer_worker")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_verl_judges_our_drop_in():
    rep = peer.measure(log=lambda msg: None)
    text = peer.markdown(rep)
    failed = [r for r in rep.rows if not r.ok] + [r for r in rep.accuracy if not r.ok]
    assert not failed, f"{len(failed)} failing rows:\n{text}"
    assert rep.versions[peer.VERL]["verl"] == peer.VERL_VERSION
    assert rep.versions[peer.VERL]["torch"] == rep.versions[peer.OURS]["torch"], "both venvs must run the same torch"
    assert len(rep.patched) == 3, rep.patched
    compared = {(r.run, r.side) for r in rep.rows if not r.error}
    # patch_verl() reached through verl's own entry points and both of its model forwards, on every case
    for side in ("verl.FusedLinearForPPO", "verl.linear_cross_entropy", "verl.forward_with_torch_backend",
                 "verl.forward_with_triton_backend"):
        assert (peer.PATCHED, side) in compared, f"patched {side} did not run:\n{text}"
    assert {(r.run, r.side) for r in rep.rows if r.error} <= set(peer.EXPECTED_ON_CPU), text
    if not torch.cuda.is_available():
        errors = {r.side: r.error for r in rep.rows if r.error}
        assert "NVTX" in errors["verl.linear_cross_entropy"], text  # a CPU build of torch stops verl's Triton path


def _fake_results(ours_fn=None) -> dict:
    """results as measure() collects them, computed here: fp32 formulas for every verl side (verl's torch path
    computes exactly these), ours for ours / patched sides, fp64 for the exact side."""
    inputs = peer.make_inputs()

    def fp32(hidden, weight, labels, temperature):
        logits = (hidden @ weight.t()) / temperature
        return (logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1),
                torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1))

    ours = ours_fn or worker.SIDES["ours.linear_cross_entropy"]
    sides = {"verl": fp32, "ours": ours, "fp64.autograd": worker.SIDES["fp64.autograd"]}
    results = {}
    for run in peer.RUNS:
        def pick(side: str):
            if side == "fp64.autograd":
                return sides["fp64.autograd"]
            return sides["ours"] if run.patch or not side.startswith("verl.") else sides["verl"]
        results[run.label] = {"sides": {side: {name: worker.run_case(pick(side), case) for name, case in inputs.items()}
                                        for side in run.sides}}
    return results


def test_judge_passes_our_drop_in_against_verls_formulas():
    results = _fake_results()
    rows, acc = peer.compare(results), peer.accuracy(results)
    assert rows and all(r.ok for r in rows), peer.table(rows)
    assert all(r.ok for r in acc), peer.accuracy_table(acc)


@pytest.mark.parametrize("defect", ["temperature ignored", "entropy detached", "logp off by 1e-4 relative"])
def test_judge_fails_a_doctored_drop_in(defect):
    from deepeyesv2_kernels.integrations.verl import linear_cross_entropy

    def doctored(hidden, weight, labels, temperature):
        if defect == "temperature ignored":
            return linear_cross_entropy(hidden, weight, labels, 1.0)
        logp, ent = linear_cross_entropy(hidden, weight, labels, temperature)
        return (logp, ent.detach()) if defect == "entropy detached" else (logp * (1 + 1e-4), ent)

    results = _fake_results(doctored)
    failing = {r.case for r in peer.compare(results) if r.side == "ours.linear_cross_entropy" and not r.ok}
    inaccurate = {r.case for r in peer.accuracy(results) if r.side == "ours.linear_cross_entropy" and not r.ok}
    # the logp-only case gives the entropy no gradient, so a detached entropy is invisible there, as in verl
    expected = {c.name for c in peer.CASES if defect != "entropy detached" or c.entropy_grad}
    assert failing == expected and inaccurate == expected


def test_an_unexpected_error_fails_the_run():
    results = _fake_results()
    broken = copy.deepcopy(results)
    side = broken[peer.PATCHED]["sides"]["verl.forward_with_torch_backend"]
    for name in side:
        side[name] = {"error": "TypeError: boom", "where": "x.py:1: boom()"}
    rows = peer.compare(broken)
    bad = [r for r in rows if not r.ok]
    assert len(bad) == 1 and bad[0].error == "TypeError: boom" and bad[0].case == "all"
