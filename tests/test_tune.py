"""The tuner (python -m bench.tune) and its error budget (bench/tune/budget.py): its candidates, its order of
runs, its verdicts, and the committed sweeps' figures in docs/planner.md."""

from __future__ import annotations

import dataclasses
import os

import pytest

from bench.measure.parts import Parts
from bench.plan.__main__ import combinations
from bench.plan.steptime import (
    Rates,
    can_overlap,
    predict_step,
)
from bench.tune.__main__ import errors, report, strategy_overrides
from models import get_config
from strategies import StrategyConfig

pytestmark = pytest.mark.unit

RATES = Rates(matmul_flops=50e9, mem_bw=20e9, link_bw=1e9)


def test_tuner_overrides_rebuild_every_planned_strategy():
    for s in combinations(4, get_config("mini", tie_embeddings=False), 4, 256):
        fields = dict(o.removeprefix("strategy.").split("=", 1) for o in strategy_overrides(s))
        typed = {k: type(getattr(s, k))(v == "true" if isinstance(getattr(s, k), bool) else v)
                 for k, v in fields.items()}
        assert StrategyConfig(**typed) == s


def test_tuner_candidates_and_ranking_use_each_compute_dtypes_parts():
    """The tuner runs only what the step model describes -- never compile (its fusions are not modelled), and on
    a CPU fp32 only -- and predicts each strategy from the parts of its own compute dtype: with bf16 parts twice
    as fast as tf32 ones, every bf16 strategy is predicted faster than the same strategy in tf32, by the
    parts' arithmetic."""
    from bench.tune.__main__ import TuneArgs, candidates, model_args, parts_key, ranked

    args = TuneArgs(model="mini", world_size=2, micro_batch=2, seq_len=64)
    gpu, note = candidates(args, "cuda", 80.0)
    assert gpu and not any(s.compile for s in gpu) and {s.amp for s in gpu} == {"fp32", "bf16"}
    assert note.startswith(f"{len(gpu)} candidates; left out: ") and " with compile (not modelled)" in note
    cpu, note = candidates(args, "cpu", 80.0)
    assert cpu and {(s.amp, s.compile) for s in cpu} == {("fp32", False)} and "16-bit on a CPU" in note
    assert candidates(args, "cpu", 1e-3)[0] == []  # nothing fits
    assert not any(s.tp > 1 or s.pp > 1 for s in cpu)  # mini's 50,257 classes do not split, its head is tied
    mesh = dataclasses.replace(args, model_overrides=["pad_vocab_to=64", "tie_embeddings=false"])
    assert model_args(mesh) == ["model=mini", "model.pad_vocab_to=64", "model.tie_embeddings=false"]
    cpu_mesh = candidates(mesh, "cpu", 80.0)[0]
    assert {(s.tp, s.sp, s.pp) for s in cpu_mesh} >= {(2, False, 1), (2, True, 1), (1, False, 2)}
    tf32 = Parts(0.02, 0.015, 0.03, 0.02, 1e-9, 2e-9, 0.04, 0.03)
    bf16 = Parts(*(v / 2 for v in dataclasses.astuple(tf32)[:8]))  # the timings (not tp, sp)
    rates = Rates(1e12, 1e12, 1e11)
    by = {(dt, mb, 1, False): p for dt, p in (("tf32", tf32), ("bf16", bf16)) for mb in (1, 2)}  # pp: mb 1
    rows = {r["strategy"]: r for r in ranked(args, rates, "cuda", gpu, by)}
    assert {parts_key(s, "cuda", 2) for s in gpu} <= set(by) and parts_key(gpu[0], "cpu", 2)[0] == "fp32"
    assert [r["pred_tokens_per_sec"] for r in rows.values()] == sorted(
        (r["pred_tokens_per_sec"] for r in rows.values()), reverse=True)
    cfg = get_config("mini")
    for s in gpu:
        own = {"bf16": bf16, "fp32": tf32}[s.amp]  # fp32 on a GPU runs tf32 matmuls (tf32=true by default)
        want = predict_step(cfg, s, 2, 2, 64, 1, dataclasses.replace(rates, parts=own))["tokens_per_sec"]
        assert rows[s.canonical_name]["pred_tokens_per_sec"] == pytest.approx(want)
    assert rows["ddp+bf16"]["pred_tokens_per_sec"] > rows["ddp"]["pred_tokens_per_sec"]
    # tensor-parallel candidates are predicted from parts timed split (tp, sp), the others from whole ones
    from bench.tune.__main__ import tuned_model
    split = Parts(0.015, 0.008, 0.03, 0.01, None, 3e-9, tp=2, block_comm_s=0.002, rest_comm_s=0.001)
    by = {("fp32", mb, 1, False): tf32 for mb in (1, 2)}
    by.update({("fp32", 2, 2, sp): dataclasses.replace(split, sp=sp) for sp in (False, True)})
    rows = ranked(mesh, rates, "cpu", cpu_mesh, by)
    assert {parts_key(r["config"], "cpu", 2) for r in rows} == set(by)
    for r in rows:
        s = r["config"]
        own = by[parts_key(s, "cpu", 2)]
        assert own.tp == s.tp and own.sp == s.sp
        want = predict_step(tuned_model(mesh), s, 2, 2, 64, 1, dataclasses.replace(rates, parts=own),
                            can_overlap("cpu", 2, 1, len(os.sched_getaffinity(0))))
        assert r["pred_tokens_per_sec"] == pytest.approx(want["tokens_per_sec"])


def test_tuner_errors_and_report():
    row = {"strategy": "ddp", "pred_step_time_s": 0.9, "step_time_median_s": 1.0, "matmul_time_s": 0.5,
           "compute_time_s": 0.8, "exposed_comm_s": 0.1, "tokens_per_sec": 100.0, "pred_tokens_per_sec": 110.0,
           "pred_step_breakdown": {"compute_s": 0.6, "memory_s": 0.15, "exposed_comm_s": 0.15},
           "step_time_p10_s": 0.99, "step_time_p90_s": 1.01, "global_batch_tokens": 100, "steal_pct": 2.5}
    e = errors(row)
    assert e == pytest.approx({"step": -0.1, "compute": 0.2, "memory": -0.5, "exposed_comm": 0.5})
    other = {**row, "strategy": "fsdp", "tokens_per_sec": 120.0, "pred_tokens_per_sec": 90.0,
             "pred_step_time_s": 1.3, "global_batch_tokens": 120}  # 120 tokens a step: 118.8-121.2 tokens/s
    text = report([row, other])
    assert "| ddp" in text and "-10.0%" in text and "+30.0%" in text and "990-1010" in text and "2.5%" in text
    assert "median |step error|: 20.0%" in text and text.endswith(": differs\n")  # the median of 10 % and 30 %
    assert report([row]).endswith(": agrees\n")
    tied = {**other, "step_time_p90_s": 1.25}  # at its p90 96 tokens/s: below ddp's best, 101
    assert report([row, tied]).endswith(": agrees up to ties\n")
    pipe = {**row, "pred_step_breakdown": {**row["pred_step_breakdown"], "bubble_s": 0.05}}
    assert errors(pipe)["exposed_comm"] == pytest.approx(1.0)  # a pipeline rank waits out its bubble in a receive


def test_repeats_run_in_alternating_rounds_and_pool_their_steps(tmp_path):
    """``repeats=3`` runs A B C, C B A, A B C; ``combine_repeats`` pools one sweep's runs of a strategy: the
    step statistics of all their timed steps together (numpy's percentiles of the concatenated logs, as
    bench/measure/metrics.py defines them), throughput from the pooled steps, the prediction and components
    as the runs' medians, the worst steal; another sweep's run (another tag) and a lone run stay as they are;
    without the per-step logs, the median of medians and the widest p10-p90."""
    import json

    import numpy as np

    from bench.tune.__main__ import run_order
    from bench.tune.budget import combine_repeats

    assert run_order(["a", "b", "c"], 3) == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert run_order(["a", "b"], 1) == ["a", "b"]
    steps = {"r1": [1.0, 1.2, 1.1], "r2": [1.6, 1.5, 1.4, 1.7], "r3": [2.0]}
    (tmp_path / "steps").mkdir()
    for run_id, times in steps.items():
        lines = [{"step": 0, "phase": "warmup", "loss": 1.0, "step_time_s": None}]
        lines += [{"step": i + 1, "phase": "timed", "loss": 1.0, "step_time_s": v} for i, v in enumerate(times)]
        (tmp_path / "steps" / f"{run_id}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))

    def run(run_id, tag, pred, steal):
        t = steps[run_id]
        return {"run_id": run_id, "tag": tag, "strategy": "ddp", "global_batch_tokens": 1000, "world_size": 2,
                "step_time_median_s": float(np.median(t)), "step_time_p10_s": min(t), "step_time_p90_s": max(t),
                "tokens_per_sec": 1000 / float(np.mean(t)), "pred_step_time_s": pred,
                "pred_tokens_per_sec": 1000 / pred,
                "pred_step_breakdown": {"compute_s": pred / 2}, "matmul_time_s": pred / 4, "compute_time_s": 0.5,
                "exposed_comm_s": 0.1, "comm_time_s": 0.2, "steal_pct": steal}

    lone = {**run("r3", "t1", 2.0, 0.0), "strategy": "fsdp"}
    rows = [run("r1", "t1", 1.0, 0.5), lone, run("r2", "t1", 1.2, 9.0), run("r3", "t2", 2.0, 0.0)]
    pooled, alone, other = combine_repeats(rows, tmp_path)
    both = steps["r1"] + steps["r2"]
    assert pooled["repeats"] == 2 and pooled["run_ids"] == ["r1", "r2"]
    assert pooled["step_time_median_s"] == pytest.approx(np.percentile(both, 50))
    assert (pooled["step_time_p10_s"], pooled["step_time_p90_s"]) == pytest.approx(
        (np.percentile(both, 10), np.percentile(both, 90)))
    assert pooled["tokens_per_sec"] == pytest.approx(7 * 1000 / sum(both))
    assert pooled["pred_step_time_s"] == pytest.approx(1.1) and pooled["pred_step_breakdown"]["compute_s"] == 0.55
    assert pooled["matmul_time_s"] == pytest.approx(0.275) and pooled["steal_pct"] == 9.0
    assert alone is lone and other == rows[3]
    no_logs = combine_repeats(rows[:3], tmp_path / "elsewhere")[0]
    assert no_logs["step_time_median_s"] == pytest.approx((1.1 + 1.55) / 2)
    assert (no_logs["step_time_p10_s"], no_logs["step_time_p90_s"]) == (1.0, 1.7)


def test_order_verdict_agrees_only_up_to_ties_the_measurement_cannot_order():
    """Three runs predicted a, b, c: measured c, b, a with every p10-p90 range apart differs; measured b, a, c
    with a's and b's ranges overlapping agrees up to that tie; a left-out run measured clearly faster than one
    of the three differs, however close the named ones are; one tied with the third is a tie. Runs that take
    different tokens per step are ordered by throughput, not step time."""
    from bench.tune.budget import order_verdict

    def run(name, pred_tps, median, spread=0.02, tokens=1):
        return {"strategy": name, "pred_tokens_per_sec": pred_tps, "tokens_per_sec": tokens / median,
                "global_batch_tokens": tokens, "step_time_median_s": median, "step_time_p10_s": median - spread,
                "step_time_p90_s": median + spread}

    assert order_verdict([run("a", 3, 1.0), run("b", 2, 1.1), run("c", 1, 1.2)]) == "agrees"
    assert order_verdict([run("a", 3, 1.2), run("b", 2, 1.1), run("c", 1, 1.0)]) == \
        "differs (predicted a, b, c; measured c, b, a)"
    tie = order_verdict([run("a", 3, 1.01), run("b", 2, 1.0), run("c", 1, 1.2)])
    assert tie == "agrees up to ties (predicted a, b, c; measured b, a, c; 1 reversed pair, each within the other's " \
        "p10-p90 step range)"
    four = [run("a", 4, 1.01), run("b", 3, 1.0), run("c", 2, 1.2), run("d", 1, 1.1)]
    assert order_verdict(four).startswith("differs")  # d (1.1 +- 0.02) beats c (1.2 +- 0.02): not a tie
    four[3] = run("d", 1, 1.19)  # d within c's range: left out on a tie
    assert "measured b, a, d; 2 reversed pairs" in order_verdict(four)
    assert "measured b, a, d, c; 2 reversed pairs" in order_verdict(four, k=4)
    assert order_verdict([run("a", 3, 1.0), run("b", 2, 1.1), run("c", 1, 1.2), run("d", 0, 1.21)]) == "agrees"
    # twice the tokens in 1.9 s is faster than one step's tokens in 1.0 s, whatever the step times say
    assert order_verdict([run("a", 2, 1.9, tokens=2), run("b", 1, 1.0)], k=2) == "agrees"
    assert order_verdict([run("a", 2, 2.2, tokens=2), run("b", 1, 1.0)], k=2).startswith("differs")


def test_the_tuner_probes_again_while_a_probe_saw_other_work(monkeypatch):
    """``quiet_probes``: rates and parts measured again (after the pause) while any source says "not cached"
    (a contended matmul peak, a bandwidth or parts probe beside other work) -- not for the deliberately
    "contended collectives" of a host without a spare core -- at most ``probe_tries`` times; what was still
    contended at the last try is returned to be reported."""
    from bench.measure.parts import Parts
    from bench.tune import __main__ as tune

    monkeypatch.setattr(tune, "PROBE_PAUSE_S", 0.0)
    calls = {"rates": 0, "parts": 0}
    noisy_until = {"n": 2}

    def rates(world, device_type):
        calls["rates"] += 1
        busy = calls["rates"] <= noisy_until["n"]
        return RATES, {"peak_source": "probe:measured matmul fp32" + (" (contended: not cached)" if busy else ""),
                       "mem_source": "probe:measured add", "link_source": "probe:measured all_reduce",
                       "link_by_kind_source": "probe:measured contended collectives"}

    def parts(args, seq, *key):
        calls["parts"] += 1
        return Parts(0.1, 0.05, 1.0, 0.5), "probe:measured parts"

    monkeypatch.setattr(tune, "measure_rates", rates)
    monkeypatch.setattr(tune, "measure_parts", parts)
    args = tune.TuneArgs(model="mini", probe_tries=3)
    got, _, p, noisy = tune.quiet_probes(args, 256, "cpu", [("fp32", 4, 1, False), ("fp32", 4, 2, False)])
    assert (calls, noisy, got) == ({"rates": 3, "parts": 6}, [], RATES) and len(p) == 2  # clean at the 3rd try
    calls.update(rates=0, parts=0)
    noisy_until["n"] = 9
    *_, noisy = tune.quiet_probes(args, 256, "cpu", [("fp32", 4, 1, False)])
    assert calls == {"rates": 3, "parts": 3}
    assert noisy == ["matmul peak: probe:measured matmul fp32 (contended: not cached)"]


def test_the_documented_error_budget_is_the_committed_rows():
    """docs/planner.md's error-budget table is recomputed from the committed rows: results/tune-cpu, tune-cpu-all,
    tune-cpu-tp, tune-cpu-tp-r2, -ab and -ab2 (python -m bench.tune's rows, each with its own prediction, a
    sweep's repeats pooled; the latest tp sweep superseding the first sweep's tp rows in the line for today's
    model) and results/gpu (predicted from datasheet rates, and with leave-one-out calibrated efficiencies)."""
    from bench.tune.budget import SETS, budget_table, load_set
    from tests.helpers import ROOT

    tune, tune_all, tune_tp1, tune_tp, ab, ab2, today, gpu, calibrated = (load_set(*where) for where in SETS.values())
    for rows, n in ((tune, 6), (tune_all, 40), (tune_tp1, 16), (tune_tp, 16), (ab, 16), (ab2, 16), (today, 40)):
        assert len(rows) == n and all(r["pred_step_time_s"] > 0 and r["matmul_time_s"] > 0 for r in rows)
    for rows in (tune_all, today):
        assert {r["config"]["strategy"]["pp"] for r in rows} == {1, 2}
        assert {(r["config"]["strategy"]["tp"], r["config"]["strategy"]["sp"]) for r in rows} == {
            (1, False), (2, False), (2, True)}
    # the re-run tensor-parallel rows predicted from parts timed split, and superseding the first sweep's
    assert all(r["pred_parts"]["tp"] == 2 and r["pred_parts"]["block_comm_s"] > 0 for r in tune_tp1 + tune_tp)
    # the second re-run: DDP beside tp2 on one data-parallel rank is charged no all-reduce time
    from strategies.ac import checkpointed_block_ids

    ddp = [r for r in tune_tp if r["config"]["strategy"]["dp"] == "ddp"]
    again = {r["run_id"]: len(checkpointed_block_ids(6, r["config"]["strategy"]["ac"], 2)) / 2 for r in ddp}
    assert len(ddp) == 4 and all(r["pred_step_breakdown"]["comm_s"] == pytest.approx(
        r["pred_parts"]["block_comm_s"] * (6 + again[r["run_id"]]) + r["pred_parts"]["rest_comm_s"]) for r in ddp)
    assert sorted(again.values()) == [0, 0, 3, 3]  # ac(full): every block's forward (and collectives) again
    assert [r["run_ids"] for r in today if r["config"]["strategy"]["tp"] == 2] == [r["run_ids"] for r in ab2]
    assert all(r["repeats"] == 2 and len(r["run_ids"]) == 2 for r in ab + ab2)  # each strategy's two runs pooled
    assert {r["strategy"] for r in today} == {r["strategy"] for r in tune_all}
    assert len(gpu) == 10 and all(r["pred_rates_source"].startswith("datasheet:H100 SXM5 ") for r in gpu)
    assert len(calibrated) == 10 and all(r["pred_rates_source"].endswith("x leave-one-out efficiencies")
                                         for r in calibrated)
    assert budget_table() in (ROOT / "docs" / "planner.md").read_text()


def test_every_shape_option_reaches_the_tuners_prediction():
    """``grad_accum`` (bench/shape.py, shared by every tool) is not accepted and then ignored: the tuner predicts
    with it (the runs get it too), and the parts probe, which times one micro-batch, refuses it."""
    from bench.tune.__main__ import TuneArgs, ranked
    from bench.tune.parts import PartsArgs
    from models.cli import UsageError

    s = StrategyConfig(dp="ddp")
    one, four = (ranked(TuneArgs(model="tiny", world_size=2, grad_accum=ga), RATES, "cpu", [s])[0] for ga in (1, 4))
    want = predict_step(get_config("tiny"), s, 2, 4, 256, 4, RATES, can_overlap("cpu", 2, 1,
                                                                                 len(os.sched_getaffinity(0))))
    assert four["pred_step_s"] == pytest.approx(want["step_s"]) and four["pred_step_s"] > 3 * one["pred_step_s"]
    with pytest.raises(UsageError, match="grad_accum=2"):
        PartsArgs(grad_accum=2)
