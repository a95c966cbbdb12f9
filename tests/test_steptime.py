"""The step-time model (bench/plan/steptime.py), the planner's ranking, the bandwidth probes and the tuner's
arithmetic, against independently computed numbers."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from bench.measure.parts import Parts, workloads
from bench.plan.__main__ import PlanArgs, combinations, plan
from bench.plan.costmodel import cost_context, predict_comm
from bench.plan.steptime import (
    DDP_BUCKET_BYTES,
    Rates,
    can_overlap,
    elementwise_per_token_block,
    predict_step,
)
from bench.tune.__main__ import errors, report, strategy_overrides
from models import get_config, train_flops_per_token
from strategies import StrategyConfig
from strategies.pp import bubble_fraction

RATES = Rates(matmul_flops=50e9, mem_bw=20e9, link_bw=1e9)


def test_single_process_step_from_its_parts():
    cfg = get_config("mini")
    t = predict_step(cfg, StrategyConfig(), 1, 4, 256, 1, RATES)
    tokens = 4 * 256
    assert t["compute_s"] == pytest.approx(train_flops_per_token(cfg, 256) * tokens / 50e9)
    d, h, V, L, P = 256, 1024, 50257, 6, cfg_params(cfg)
    act = tokens * ((9 * d + 2 * h) * 3 * L * 4 + 6 * V * 4)  # fp32; fused head (loss_chunk) 6 V
    assert t["memory_s"] == pytest.approx((act + 28 * P) / 20e9)
    assert t["comm_s"] == t["exposed_comm_s"] == t["bubble_s"] == 0
    assert t["step_s"] == pytest.approx(t["compute_s"] + t["memory_s"])
    assert t["tokens_per_sec"] == pytest.approx(tokens / t["step_s"])


def cfg_params(cfg) -> int:
    return cost_context(cfg, StrategyConfig(), 1, 1, 256).P


def test_overlap_rules_per_strategy():
    cfg = get_config("mini")
    for fields, world in (({"dp": "ddp"}, 2), ({"dp": "fsdp"}, 2), ({"tp": 2}, 2)):
        s = StrategyConfig(**fields)
        alone = predict_step(cfg, s, world, 4, 256, 1, RATES, overlap=False)
        hidden = predict_step(cfg, s, world, 4, 256, 1, RATES, overlap=True)
        comm = predict_comm(cfg, s, world, 1, micro_batch=4, seq_len=256)
        factor = {"all_reduce": 1.0, "all_gather": 0.5, "reduce_scatter": 0.5}  # n = 2: 2(n-1)/n, (n-1)/n
        assert alone["comm_s"] == pytest.approx(sum(v * factor[k] for k, v in comm.items() if k != "total") / 1e9)
        assert alone["exposed_comm_s"] == alone["comm_s"]  # nothing overlaps without a spare core
        work = hidden["compute_s"] + hidden["memory_s"]
        if fields.get("dp") == "ddp":  # backward hides all but the last bucket
            last = min(DDP_BUCKET_BYTES, 4 * cfg_params(cfg)) / 1e9
            assert hidden["exposed_comm_s"] == pytest.approx(max(alone["comm_s"] - 2 / 3 * work, last))
        elif fields.get("dp") == "fsdp":  # prefetch hides all but one unit
            assert hidden["exposed_comm_s"] == pytest.approx(max(alone["comm_s"] - work, alone["comm_s"] / 7))
        else:  # tensor parallelism: on the critical path
            assert hidden["exposed_comm_s"] == alone["comm_s"]
            assert hidden["compute_s"] == pytest.approx(train_flops_per_token(cfg, 256) * 1024 / 2 / 50e9)
    s = StrategyConfig(pp=2, pp_microbatches=4)
    t = predict_step(get_config("mini", tie_embeddings=False), s, 2, 4, 256, 1, RATES)
    # the fill and drain are rank 0's chunks (3 blocks, no head): 3 blocks' forward + backward / 4 micro-batches
    d, h, T, n = 256, 1024, 256, 4 * 256
    block_flops = 3 * (2 * d * 3 * d + 2 * T * d + 2 * T * d + 2 * d * d + 2 * d * h * 2)
    block_bytes = 3 * (9 * d + 2 * h) * 4  # two LayerNorms, two residual adds, GELU; backward twice the forward
    assert t["bubble_s"] == pytest.approx(3 * n * (block_flops / 50e9 + block_bytes / 20e9) / 4)
    with pytest.raises(ValueError, match="needs link_bw"):
        predict_step(cfg, StrategyConfig(dp="ddp"), 2, 4, 256, 1, Rates(50e9, 20e9))
    assert can_overlap("cuda", 8, 1, 2) and not can_overlap("cpu", 2, 1, 2) and can_overlap("cpu", 2, 1, 4)


def test_elementwise_counts_per_implementation():
    assert elementwise_per_token_block(get_config("mini")) == 9 * 256 + 2 * 1024
    assert elementwise_per_token_block(get_config("mini", source="hf")) == 9 * 256 + 16 * 1024
    llama = get_config("llama-mini")
    assert elementwise_per_token_block(llama) == 34 * 256 + 5 * llama.hidden_dim


def test_the_planner_ranks_what_fits_fastest_first():
    rows = plan(PlanArgs(model="gpt2-xl", world_size=8, device="H100", link_gbps=360, micro_batch=4))
    fits = [r for r in rows if r["fits"]]
    assert fits and rows[:len(fits)] == fits  # what fits first
    speeds = [r["pred_tokens_per_sec"] for r in fits]
    assert speeds == sorted(speeds, reverse=True)
    by = {r["strategy"]: r for r in rows}
    # each strategy's own dtype: bf16 at the H100's bf16 peak, ddp's fp32 matmuls at the peak of their dtype
    from bench.hardware import lookup_device

    peaks = lookup_device("NVIDIA H100 80GB HBM3")[1]
    fp32_kind = StrategyConfig(dp="ddp").compute_dtype_name("cuda")  # tf32 when strategy.tf32 (the default)
    assert by["ddp+bf16"]["pred_step_breakdown"]["compute_s"] * peaks["bf16"] == pytest.approx(
        by["ddp"]["pred_step_breakdown"]["compute_s"] * peaks[fp32_kind])
    memory_only = plan(PlanArgs(model="gpt2-xl", world_size=8))
    assert "pred_step_s" not in memory_only[0]
    for kw, msg in (({"device": "H100"}, "needs link_gbps="), ({"device": "TPUv5"}, "not in bench/hardware.py"),
                    ({"peak_tflops": 100.0}, "needs both peak_tflops= and mem_gbps=")):
        with pytest.raises(Exception, match=msg):
            plan(PlanArgs(model="gpt2-xl", world_size=8, **kw))


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


def test_bandwidth_probes_measure_and_cache(monkeypatch, tmp_path, ranks):
    import torch

    from bench.measure.bandwidth import memory_bandwidth

    monkeypatch.setenv("N00BGPT_CACHE_DIR", str(tmp_path))
    bw, source = memory_bandwidth(torch.device("cpu"), numel=2**22, repeats=3)
    assert 1e8 < bw < 1e12 and source.startswith("probe:measured")
    if "not cached" not in source:
        assert memory_bandwidth(torch.device("cpu")) == (bw, "probe:cached add")
    a, b = ranks(_link_worker, str(tmp_path))
    assert a[0] == b[0] > 0 and a[1] == b[1]  # both ranks agree (the slowest rank's time counts)


def _collectives_worker(rank: int, world_size: int, cache: str):
    import os

    import torch

    from bench.measure.bandwidth import collective_bandwidths

    os.environ["N00BGPT_CACHE_DIR"] = cache
    cpu, quiet = torch.device("cpu"), {"neighbours_limit": 1.0}  # about caching: whatever else shares the CI host
    out = {c: collective_bandwidths(cpu, contended=c, nbytes=2**20, repeats=3, **quiet) for c in (False, True)}
    again = collective_bandwidths(cpu, contended=True)
    fresh = collective_bandwidths(cpu, contended=True, nbytes=2**20, repeats=3, fresh=True, **quiet)
    return out, again, fresh, collective_bandwidths(cpu, contended=True)


def test_each_collective_is_probed_alone_and_beside_busy_compute(ranks, tmp_path):
    """bench/measure/bandwidth.py ``collective_bandwidths``: every kind the strategies issue, the same on both
    ranks (the slowest rank's time), cached per ``contended``; ``fresh`` probes again and replaces the cached
    value. (How much busy compute slows them is a measured
    fact of a host, README's figures, not a bound a test on a shared CI host can hold: one run measured the
    idle all-reduce at 0.19 GB/s and the contended one at 0.69.)"""
    a, b = ranks(_collectives_worker, str(tmp_path))
    assert a == b
    (idle, idle_src), (busy, busy_src) = a[0][False], a[0][True]
    assert set(idle) == set(busy) == {"all_reduce", "all_gather", "reduce_scatter"}
    assert all(v > 1e6 for v in [*idle.values(), *busy.values()])
    assert idle_src == "probe:measured collectives" and busy_src == "probe:measured contended collectives"
    assert a[1] == (busy, "probe:cached contended collectives")
    fresh, fresh_src = a[2]  # fresh=True (python -m bench.tune): probed now, whatever is cached, and cached
    assert fresh_src == "probe:measured contended collectives" and a[3] == (fresh, "probe:cached contended collectives")


def test_neighbour_share_subtracts_every_probing_rank_per_host():
    """``neighbour_share``: per host, (busy - its ranks' CPU) / total, the two ranks of one host reading the same
    counters; the busiest host counts; unreadable hosts are skipped."""
    from bench.measure.contention import neighbour_share

    # host a: 2 cores x 2 s = 4 s, 3.0 s busy, ranks 1.2 + 1.0 s -> 0.8 / 4; host b: 1.5 busy of 2, rank 0.5 -> 0.5
    assert neighbour_share([("a", 3.0, 4.0, 1.2), ("a", 3.02, 4.0, 1.0), ("b", 1.5, 2.0, 0.5)]) == pytest.approx(0.5)
    assert neighbour_share([("a", 3.0, 4.0, 1.2), ("a", 3.0, 4.0, 1.0)]) == pytest.approx(0.2)
    assert neighbour_share([("a", 1.0, 4.0, 1.5)]) == 0.0  # accounting jitter never goes below nothing
    assert neighbour_share([("a", None, None, 1.0)]) is None


def _spin(seconds: float) -> None:
    import time

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _neighbour_worker(rank: int, world_size: int, cache: str, limit: float):
    import os

    import torch

    from bench.measure.bandwidth import collective_bandwidths, memory_bandwidth

    os.environ["N00BGPT_CACHE_DIR"] = cache
    kinds = collective_bandwidths(torch.device("cpu"), nbytes=2**20, repeats=9, neighbours_limit=limit)
    mem = memory_bandwidth(torch.device("cpu"), numel=2**22, repeats=9, neighbours_limit=limit) if rank == 0 else None
    again = collective_bandwidths(torch.device("cpu"))  # what a later run on the host reads: not the busy probe
    return kinds[1], mem and mem[1], again[1]


def test_a_probe_beside_a_busy_neighbour_is_not_cached(ranks, tmp_path):
    """A process outside the probe keeps a core busy while the bandwidths are probed: the share the probes
    measure includes it (a core is 1 / cores of the host, half of that allowed for the accounting), so
    neither the collectives nor the memory probe is cached and their sources say how busy the host was; the
    next probe on the host measures again."""
    import multiprocessing
    import os
    import re

    cores = os.cpu_count() or 1
    neighbour = multiprocessing.get_context("spawn").Process(target=_spin, args=(60.0,), daemon=True)
    neighbour.start()
    try:
        a, _ = ranks(_neighbour_worker, str(tmp_path), 0.5 / cores)
    finally:
        neighbour.terminate()
        neighbour.join()
    for source in a[:2]:
        share = re.search(r"\(.*neighbours (\d+)% of the host: not cached\)", source)
        assert share and int(share.group(1)) / 100 >= 0.5 / cores, source
    assert a[2].startswith("probe:measured collectives")  # nothing was cached: measured again


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


def test_parts_timed_beside_a_busy_neighbour_are_not_cached(monkeypatch, tmp_path):
    """The parts probe measures the host's share taken by other work as it times the parts: with a process
    spinning on a core beside it (1 / cores of the host; the limit set to half of that), the parts serve this
    run only -- the source says how busy the host was -- and the next call measures them again."""
    import multiprocessing
    import re

    from bench.measure.parts import get_parts
    from tests.helpers.training import model_cfg

    monkeypatch.setenv("N00BGPT_CACHE_DIR", str(tmp_path))
    cores = os.cpu_count() or 1
    monkeypatch.setenv("N00BGPT_NEIGHBOURS_MAX", str(0.5 / cores))
    cfg = dataclasses.replace(model_cfg("tiny"), loss_chunk=0)
    neighbour = multiprocessing.get_context("spawn").Process(target=_spin, args=(60.0,), daemon=True)
    neighbour.start()
    try:
        first, src1 = get_parts(cfg, 2, 32, torch.device("cpu"), 1)
        _, src2 = get_parts(cfg, 2, 32, torch.device("cpu"), 1)
    finally:
        neighbour.terminate()
        neighbour.join()
    share = re.fullmatch(r"probe:measured parts \(neighbours (\d+)% of the host: not cached\)", src1)
    assert share and int(share.group(1)) / 100 >= 0.5 / cores, src1
    assert src2.startswith("probe:measured parts") and first.block_s > 0


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


def test_each_collective_uses_its_own_bandwidth():
    cfg = get_config("mini")
    by_kind = {"all_reduce": 1e9, "all_gather": 0.5e9, "reduce_scatter": 0.25e9}
    s = StrategyConfig(dp="fsdp")
    t = predict_step(cfg, s, 2, 4, 256, 1, Rates(50e9, 20e9, 1e9, link_bw_by_kind=by_kind), overlap=False)
    comm = predict_comm(cfg, s, 2, 1, micro_batch=4, seq_len=256)
    assert t["comm_s"] == pytest.approx(comm["all_gather"] * 0.5 / 0.5e9 + comm["reduce_scatter"] * 0.5 / 0.25e9)


def test_each_technique_rings_over_its_own_group():
    """A collective's ring factor counts the ranks of the technique that issues it: on 8 ranks as dp2 x tp4, DDP's
    all-reduce runs over 2 ranks (2 (n - 1) / n = 1) and tp's over 4 (1.5), never both over the world; DDP beside
    tp on one data-parallel rank all-reduces over itself and crosses no link."""
    from bench.plan.terms import TERMS

    DP, TP = (next(t for t in TERMS if t.name == name) for name in ("dp", "tp"))
    cfg = get_config("mini")
    rates = Rates(50e9, 20e9, 1e9)
    s = StrategyConfig(dp="ddp", tp=4)
    ctx = cost_context(cfg, s, 8, 4, 256)
    dp_bytes, tp_bytes = DP.comm(ctx)["all_reduce"], TP.comm(ctx)["all_reduce"]
    assert (DP.group(ctx), TP.group(ctx)) == (2, 4) and dp_bytes > 0 and tp_bytes > 0
    t = predict_step(cfg, s, 8, 4, 256, 1, rates, overlap=False)
    assert t["comm_s"] == pytest.approx(dp_bytes * 1.0 / 1e9 + tp_bytes * 1.5 / 1e9)
    alone = predict_step(cfg, StrategyConfig(tp=2), 2, 4, 256, 1, rates, overlap=False)
    beside = predict_step(cfg, StrategyConfig(dp="ddp", tp=2), 2, 4, 256, 1, rates, overlap=False)
    assert predict_comm(cfg, StrategyConfig(dp="ddp", tp=2), 2, 1, micro_batch=4, seq_len=256)["all_reduce"] > \
        predict_comm(cfg, StrategyConfig(tp=2), 2, 1, micro_batch=4, seq_len=256)["all_reduce"]  # issued, counted
    assert beside["comm_s"] == pytest.approx(alone["comm_s"])  # ... but over one rank: no time


def _link_worker(rank: int, world_size: int, cache: str):
    import os

    import torch

    from bench.measure.bandwidth import link_bandwidth

    os.environ["N00BGPT_CACHE_DIR"] = cache
    return link_bandwidth(torch.device("cpu"), nbytes=2**20, repeats=3)


def test_readme_error_budget_is_the_committed_rows():
    """docs/planner.md's error-budget table is recomputed from the committed rows: results/tune-cpu, tune-cpu-all,
    tune-cpu-tp, tune-cpu-tp-r2, -ab and -ab2 (python -m bench.tune's rows, each with its own prediction, a
    sweep's repeats pooled; the latest tp sweep superseding the first sweep's tp rows in the line for today's
    model) and results/gpu (predicted from datasheet rates)."""
    from bench.tune.budget import SETS, budget_table, load_set
    from tests.helpers import ROOT

    tune, tune_all, tune_tp1, tune_tp, ab, ab2, today, gpu = (load_set(*where) for where in SETS.values())
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
    assert budget_table() in (ROOT / "docs" / "planner.md").read_text()


def test_datasheet_prediction_of_a_gpu_row_takes_its_compute_dtypes_peak():
    """A committed H100 row is predicted from the datasheet peak of the dtype its matmuls ran in: the fp32 run
    with TF32 allowed at 494.7 TFLOP/s, the bf16 run at 989.4 -- for the same model and shape, compute exactly
    half; compute is the model's FLOPs counted by FlopCounterMode (on meta tensors) over that peak; rows from
    before the chunked loss predict the plain head they ran."""
    import json

    from torch.utils.flop_counter import FlopCounterMode

    from bench.tune.budget import datasheet_prediction
    from models import build_model
    from tests.helpers import ROOT

    rows = {json.loads(line)["config"]["tag"]: json.loads(line)
            for line in (ROOT / "results" / "gpu" / "runs.jsonl").read_text().splitlines()}
    tf32, bf16 = rows["gpu_suite:small-tf32"], rows["gpu_suite:small-bf16"]
    p32, p16 = datasheet_prediction(tf32), datasheet_prediction(bf16)
    assert (p32["pred_rates_source"], p16["pred_rates_source"]) == ("datasheet:H100 SXM5 tf32",
                                                                     "datasheet:H100 SXM5 bf16")
    assert p32["pred_step_breakdown"]["compute_s"] == pytest.approx(2 * p16["pred_step_breakdown"]["compute_s"])
    model = build_model(get_config("gpt2-small", pad_vocab_to=64, loss_chunk=0), "meta")
    B, T = bf16["micro_batch"], bf16["seq_len"]
    idx = torch.zeros(B, T, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(idx, idx).backward()
    assert p16["pred_step_breakdown"]["compute_s"] == pytest.approx(counter.get_total_flops() / 989.4e12, rel=1e-3)
    assert p16["pred_step_time_s"] == pytest.approx(sum(p16["pred_step_breakdown"][k] for k in (
        "compute_s", "memory_s", "exposed_comm_s", "bubble_s")))
    assert p16["pred_tokens_per_sec"] == pytest.approx(B * T / p16["pred_step_time_s"])


# ---------------------------------------------------------------------------------- the model's own parts

PARTS = Parts(block_s=0.10, block_matmul_s=0.08, rest_s=1.0, rest_matmul_s=0.8, adamw_fused_s_per_param=1e-9,
              adamw_foreach_s_per_param=1e-8)


def test_step_from_the_models_own_parts():
    """With timed parts (bench/measure/parts.py) compute and memory-bound are the parts composed per strategy:
    every block once (a checkpointed one's forward, a third, again), the rest once, AdamW per parameter of the
    optimizer kind the strategy uses, the per-parameter copies at the memory bandwidth."""
    cfg = get_config("mini")
    r = Rates(50e9, 20e9, 1e9, PARTS)
    P, L = cfg_params(cfg), 6
    t = predict_step(cfg, StrategyConfig(), 1, 4, 256, 2, r)  # two micro-steps
    assert t["compute_s"] == pytest.approx(2 * (L * 0.08 + 0.8))
    assert t["memory_s"] == pytest.approx(2 * (L * 0.02 + 0.2) + P * 1e-9 + 12 * P / 20e9)
    t = predict_step(cfg, StrategyConfig(dp="fsdp", ac="full"), 2, 4, 256, 1, r)
    assert t["compute_s"] == pytest.approx(L * 0.08 * (1 + 1 / 3) + 0.8)
    assert t["memory_s"] == pytest.approx(L * 0.02 * (1 + 1 / 3) + 0.2 + P / 2 * 1e-8 + 16 * P * 2 / 20e9)
    t = predict_step(cfg, StrategyConfig(dp="ddp", ac="op"), 2, 4, 256, 1, r)  # op: only the other ops again
    assert t["compute_s"] == pytest.approx(L * 0.08 + 0.8)
    assert t["memory_s"] == pytest.approx(L * 0.02 * (1 + 1 / 3) + 0.2 + P * 1e-9 + 16 * P / 20e9)
    t = predict_step(cfg, StrategyConfig(tp=2), 2, 4, 256, 1, r)
    assert t["compute_s"] == pytest.approx((L * 0.08 + 0.8) / 2)
    untied = get_config("mini", tie_embeddings=False)
    # under pp the parts are a pipeline micro-batch's (micro_batch / m = 2 sequences), run m = 2 times
    from strategies.pp import pipeline_micro_batch

    assert pipeline_micro_batch(StrategyConfig(pp=2), 4) == 2 and pipeline_micro_batch(StrategyConfig(dp="ddp"), 4) == 4
    t = predict_step(untied, StrategyConfig(pp=2), 2, 4, 256, 1, r)  # the busiest stage: 3 blocks and the head
    assert t["compute_s"] == pytest.approx(2 * (3 * 0.08 + 0.8))
    assert t["bubble_s"] == pytest.approx(3 * 0.10)  # rank 0's 3 blocks for one pipeline micro-batch
    plain = dataclasses.replace(PARTS, rest_plain_s=1.5, rest_plain_matmul_s=0.9)  # the head tp and pp run
    t = predict_step(untied, StrategyConfig(pp=2), 2, 4, 256, 1, dataclasses.replace(r, parts=plain))
    assert t["compute_s"] == pytest.approx(2 * (3 * 0.08 + 0.9))
    assert t["memory_s"] == pytest.approx(2 * (3 * 0.02 + 0.6) + cfg_params(untied) / 2 * 1e-9, rel=0.05)
    t = predict_step(cfg, StrategyConfig(tp=2), 2, 4, 256, 1, dataclasses.replace(r, parts=plain))
    assert t["compute_s"] == pytest.approx((L * 0.08 + 0.9) / 2)
    t = predict_step(cfg, StrategyConfig(dp="ddp"), 2, 4, 256, 1, dataclasses.replace(r, parts=plain))
    assert t["compute_s"] == pytest.approx(L * 0.08 + 0.8)  # the fused loss: the model's own rest


def test_step_from_tensor_parallel_parts():
    """Parts timed as tensor parallelism splits them (``Parts.tp``) are not split again; their waits in
    collectives are tp's communication (exposed), replacing tp's bytes / bandwidth, while the other techniques'
    bytes still count; their time outside matmuls and collectives is memory-bound."""
    cfg, L = get_config("mini"), 6
    split = Parts(block_s=0.07, block_matmul_s=0.04, rest_s=1.2, rest_matmul_s=0.5, adamw_foreach_s_per_param=2e-9,
                  tp=2, block_comm_s=0.01, rest_comm_s=0.1)
    r = Rates(50e9, 20e9, 1e9, split)
    s = StrategyConfig(tp=2)
    t = predict_step(cfg, s, 2, 4, 256, 1, r)
    P = cost_context(cfg, s, 2, 4, 256).P  # this rank's (split) parameters
    assert t["compute_s"] == pytest.approx(L * 0.04 + 0.5)
    assert t["memory_s"] == pytest.approx(L * (0.07 - 0.04 - 0.01) + (1.2 - 0.5 - 0.1) + P * 2e-9)
    assert t["comm_s"] == t["exposed_comm_s"] == pytest.approx(L * 0.01 + 0.1)
    t = predict_step(cfg, StrategyConfig(tp=2, ac="full"), 2, 4, 256, 1, r)  # forward again: its collectives too
    assert t["compute_s"] == pytest.approx(L * 0.04 * (1 + 1 / 3) + 0.5)
    assert t["comm_s"] == pytest.approx(L * 0.01 * (1 + 1 / 2) + 0.1)
    ddp = StrategyConfig(dp="ddp", tp=2)  # 4 ranks: dp2 x tp2; DDP's all-reduce still from its bytes
    from bench.plan.terms import tp_comm
    whole = predict_comm(cfg, ddp, 4, 1, micro_batch=4, seq_len=256)
    rest = predict_comm(cfg, ddp, 4, 1, micro_batch=4, seq_len=256, without=("tp",))
    assert rest["all_reduce"] == whole["all_reduce"] - tp_comm(cost_context(cfg, ddp, 4, 4, 256))["all_reduce"] > 0
    t = predict_step(cfg, ddp, 4, 4, 256, 1, r)
    assert t["comm_s"] == pytest.approx(L * 0.01 + 0.1 + rest["all_reduce"] * 1.0 / 1e9)  # 2 (n - 1) / n, n = 2
    with pytest.raises(ValueError, match="tp=2 ranks cannot predict a tp=4 step"):
        predict_step(cfg, StrategyConfig(tp=4), 4, 4, 256, 1, r)


def _tp_parts_worker(rank: int, world_size: int, presets: list[str]) -> dict:
    """Per preset and sp: one tp rank's local FLOPs of each timed part and of its matmul probe (DTensor's ops
    declined, so the local ops they run are counted; none on the fake tensors of its sharding propagation),
    and the unsplit probes' FLOPs (FlopCounterMode); then CommClock on a constructed wait."""
    import time
    from functools import partial

    from torch.distributed._functional_collectives import AsyncCollectiveTensor
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    from bench.measure.comm import CommClock
    from bench.measure.parts import Sharding
    from strategies.mesh import build_mesh
    from strategies.tp import apply_tp, maybe_loss_parallel
    from tests.helpers.training import model_cfg

    class LocalFlops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            from torch._subclasses.fake_tensor import FakeTensor
            if any(issubclass(t, (DTensor, AsyncCollectiveTensor)) for t in types):
                return NotImplemented
            out = func(*args, **(kwargs or {}))
            count = flop_registry.get(func._overloadpacket)
            if count is not None and not any(issubclass(t, FakeTensor) for t in types):
                self.flops += count(*args, **(kwargs or {}), out_val=out)
            return out

    def local(fn) -> int:
        with LocalFlops() as m:
            fn()
        return m.flops

    def whole(fn) -> int:
        with FlopCounterMode(display=False) as m:
            fn()
        return m.get_total_flops()

    out = {}
    for preset in presets:
        for sp in (False, True):
            s = StrategyConfig(tp=2, sp=sp)
            mesh = build_mesh(s, "cpu")
            shard = Sharding(2, sp, partial(apply_tp, tp_mesh=mesh["tp"], sp=sp), lambda s=s: maybe_loss_parallel(s))
            w = workloads(model_cfg(preset), 2, 32, torch.device("cpu"), shard=shard)
            one = workloads(model_cfg(preset), 2, 32, torch.device("cpu"))
            out[preset, sp] = {name: local(w[name]) for name in ("block", "block_matmul", "rest", "rest_matmul")}
            out[preset, sp].update(whole_block=whole(one["block_matmul"]),
                                   whole_rest=whole(one.get("rest_plain_matmul", one["rest_matmul"])))
    mesh = build_mesh(StrategyConfig(tp=2), "cpu")
    dt = distribute_tensor(torch.ones(4, 1000), mesh["tp"], [Shard(0)])
    torch.distributed.barrier()
    start = time.perf_counter()
    with CommClock() as clock:
        time.sleep(0.1 if rank == 0 else 0.6)  # not communication: never counted
        dt.redistribute(placements=[Replicate()]).to_local().sum()  # an all-gather; rank 0 waits ~0.5 s in it
    out["clock"] = clock.seconds, time.perf_counter() - start
    return out


def test_tensor_parallel_parts_are_one_ranks_split(ranks):
    """Under tp=2 every timed part (the model's block and rest, parallelised as the run does it) does exactly
    its matmul probe's FLOPs on each rank, and those are half the unsplit ones: the probes are one rank's
    shapes; CommClock counts the wait inside a collective and not the compute (a sleep) before it."""
    presets = ["tiny", "llama-tiny"]
    try:
        import transformers  # noqa: F401
        presets.append("tiny:hf")
    except ImportError:
        pass
    for rank, got in enumerate(ranks(_tp_parts_worker, presets)):
        for preset in presets:
            for sp in (False, True):
                f = got[preset, sp]
                assert f["block"] == f["block_matmul"] > 0 and 2 * f["block_matmul"] == f["whole_block"], (preset, sp)
                assert f["rest"] == f["rest_matmul"] > 0 and 2 * f["rest_matmul"] == f["whole_rest"], (preset, sp)
        seconds, elapsed = got["clock"]
        if rank == 0:  # waited for rank 1's 0.6 s sleep, not for its own 0.1 s
            assert 0.35 < seconds < elapsed - 0.08, got["clock"]
        else:  # rank 1 arrived last: the all-gather completes at once
            assert seconds < 0.2 < 0.6 < elapsed, got["clock"]


def test_pipeline_bubble_is_the_other_ranks_chunks():
    """Equal ranks give the textbook share b / (1 - b) of the busy time; a heavy last stage makes the fill and
    drain the lighter ranks' chunks; interleaved ranks hold every p-th chunk."""
    from bench.plan.steptime import pipeline_bubble

    cfg = get_config("mini", n_layer=8, tie_embeddings=False)
    for s in (StrategyConfig(pp=4, pp_microbatches=8), StrategyConfig(pp=2, pp_schedule="gpipe", pp_microbatches=4),
              StrategyConfig(pp=2, pp_schedule="interleaved1f1b", pp_virtual=2, pp_microbatches=4)):
        b = bubble_fraction(s)
        busy = cfg.n_layer / s.pp * 1.0  # each rank's blocks at 1 s each, no head
        assert pipeline_bubble(cfg, s, 1.0, 0.0, 0.0) == pytest.approx(busy * b / (1 - b))
    s = StrategyConfig(pp=4, pp_microbatches=8)
    assert pipeline_bubble(cfg, s, 1.0, 0.5, 10.0) == pytest.approx(3 * 2 * 1.5 / 8)  # 3 light ranks, 2 blocks each
    v2 = StrategyConfig(pp=2, pp_schedule="interleaved1f1b", pp_virtual=2, pp_microbatches=2)
    odd = get_config("mini", n_layer=6, tie_embeddings=False)  # chunks of 2, 2, 1, 1 blocks: rank 0 holds 2 + 1
    assert pipeline_bubble(odd, v2, 1.0, 0.0, 0.0) == pytest.approx(3 / (2 * 2))  # ranks equal (3 blocks each)
    assert pipeline_bubble(odd, v2, 1.0, 0.0, 5.0) == pytest.approx(3 / 4)  # rank 1 + head busiest: rank 0's 3


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny", "tiny:hf"])
def test_the_matmul_probes_do_exactly_the_parts_matmuls(preset):
    """FlopCounterMode: the GEMMs (+ SDPA) the probe times alone are the FLOPs of the block's and of the rest's
    forward + backward, so compute vs memory-bound splits what the model runs."""
    from torch.utils.flop_counter import FlopCounterMode

    from tests.helpers.training import model_cfg

    if preset.endswith(":hf"):
        pytest.importorskip("transformers")
    w = workloads(model_cfg(preset), 2, 32, torch.device("cpu"))

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    assert flops(w["block_matmul"]) == flops(w["block"]) > 0
    assert flops(w["rest_matmul"]) == flops(w["rest"]) > 0
    if preset.endswith(":hf"):  # HF's head is the plain one: nothing more to time
        assert "rest_plain" not in w
    else:  # the plain head too (tp, pp, compile run it), the same FLOPs in one piece
        assert flops(w["rest_plain_matmul"]) == flops(w["rest_plain"]) == flops(w["rest"])


def test_the_parts_of_a_plain_head_model_are_cached_without_the_plain_variant(monkeypatch, tmp_path):
    """A model whose own loss is the plain one has no separate plain parts; its six parts cache and read back."""
    from bench.measure.parts import get_parts
    from tests.helpers.training import model_cfg

    monkeypatch.setenv("N00BGPT_CACHE_DIR", str(tmp_path))
    cfg = dataclasses.replace(model_cfg("tiny"), loss_chunk=0)
    first, src1 = get_parts(cfg, 2, 32, torch.device("cpu"), 1)
    again, src2 = get_parts(cfg, 2, 32, torch.device("cpu"), 1)
    assert (src1, src2) == ("probe:measured parts", "probe:cached parts") and again == first
    assert first.rest_plain_s is None and first.rest_s > first.rest_matmul_s > 0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_parts_run_their_matmuls_in_the_runs_compute_dtype(dtype):
    """Every matmul of every timed part (the model's block and rest under autocast as the harness runs them, and
    the matmul probes) takes inputs of the run's compute dtype, and the FLOPs still match part for part."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    from tests.helpers.training import model_cfg

    mm_ops = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}

    class Dtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in mm_ops:
                self.seen.update(a.dtype for a in args if isinstance(a, torch.Tensor))
            return func(*args, **(kwargs or {}))

    w = workloads(model_cfg("tiny"), 2, 32, torch.device("cpu"), dtype)
    want = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    with w["precision"]:
        for part in ("block", "block_matmul", "rest", "rest_matmul"):
            with Dtypes() as mode:
                w[part]()
            assert mode.seen == {want}, (part, mode.seen)
        with FlopCounterMode(display=False) as a:
            w["block"]()
        with FlopCounterMode(display=False) as b:
            w["block_matmul"]()
        assert a.get_total_flops() == b.get_total_flops() > 0
    with pytest.raises(ValueError, match="dtype='int8'.*fp32, tf32, bf16, fp16"):
        workloads(model_cfg("tiny"), 2, 32, torch.device("cpu"), "int8")


def _parts_worker(rank: int, world_size: int, cache: str) -> list[dict]:
    from bench.harness.dist import DistInfo
    from bench.harness.loop import plan_batch, train
    from bench.run import predictions
    from tests.helpers.training import run_cfg

    os.environ["N00BGPT_CACHE_DIR"] = cache
    rows = []
    for strategy in ({"dp": "ddp"}, {"dp": "ddp"}, {"tp": 2}):
        cfg = run_cfg(strategy, 2, 1, steps=2, seq_len=32)
        cfg.probe_parts = True
        info = DistInfo(rank, rank, world_size, 1, torch.device("cpu"), "gloo")
        out = train(cfg, info)
        rows.append({**out.metrics, **predictions(cfg, info, plan_batch(cfg, info), out)})
    return rows


def test_probe_parts_rows_predict_from_one_cached_measurement(ranks, tmp_path):
    """A run with probe_parts measures the parts on both ranks (the slowest rank's kept) and caches them; the
    next run of the same shape reads them; each row's prediction is the model on its rates and those parts."""
    from tests.helpers.training import run_cfg

    first, second, tp = ranks(_parts_worker, str(tmp_path))[0]
    assert first["pred_parts"]["source"] == "probe:measured parts"
    assert second["pred_parts"] == {**first["pred_parts"], "source": "probe:cached parts"}
    parts = Parts(**{k: v for k, v in first["pred_parts"].items() if k != "source"})
    assert parts.block_s > 0 and parts.rest_s > parts.rest_matmul_s > 0 and parts.adamw_foreach_s_per_param > 0
    assert parts.tp == 1 and parts.block_comm_s == 0
    # a tensor-parallel run times its own split parts (not the cached whole ones), with their collectives' waits
    split = Parts(**{k: v for k, v in tp["pred_parts"].items() if k != "source"})
    assert tp["pred_parts"]["source"] == "probe:measured parts" and split.tp == 2 and not split.sp
    # (each a median of its own timings -- the clock's run is separate -- so only their sign is certain under load)
    assert split.block_comm_s > 0 and split.rest_comm_s > 0
    assert split.adamw_fused_s_per_param is None and split.rest_plain_s is None
    for row, strategy, p in ((first, {"dp": "ddp"}, parts), (second, {"dp": "ddp"}, parts), (tp, {"tp": 2}, split)):
        cfg = run_cfg(strategy, 2, 1, steps=2, seq_len=32)
        pred = predict_step(cfg.model, cfg.strategy, 2, 2, 32, 1, Rates(row["peak_flops"], row["mem_bw_bytes_per_s"],
                            row["link_bw_bytes_per_s"], p, row["link_bw_by_kind"]),
                            can_overlap("cpu", 2, 1, len(os.sched_getaffinity(0))))
        assert row["pred_step_time_s"] == pytest.approx(pred["step_s"])
        assert row["pred_step_breakdown"]["memory_s"] == pytest.approx(pred["memory_s"])
    assert tp["pred_step_breakdown"]["comm_s"] == pytest.approx(4 * split.block_comm_s + split.rest_comm_s)  # 4 blocks


def test_the_tuners_parts_probe_caches_the_split_parts_runs_read(tmp_path, monkeypatch):
    """``torchrun -m bench.tune.parts ... tp=2 sp=true`` (what python -m bench.tune runs per parts key) times the
    parts split on 2 gloo ranks and caches them under the key a tp2+sp run of that shape reads."""
    import json
    import subprocess
    import sys

    from bench.measure.parts import Sharding, _key
    from bench.measure.probe import cache_get
    from tests.helpers import ROOT

    monkeypatch.setenv("N00BGPT_CACHE_DIR", str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "bench.tune.parts", "model=tiny", "micro_batch=2", "seq_len=32", "tp=2", "sp=true"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["source"] == "probe:measured parts" and (got["tp"], got["sp"]) == (2, True)
    assert got["block_comm_s"] > 0 and got["rest_comm_s"] > 0 and got["adamw_fused_s_per_param"] is None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the key names the probing ranks' threads (OMP_NUM_THREADS=1, as torchrun's ranks)
    try:
        key = _key(get_config("tiny"), 2, 32, torch.device("cpu"), 2, "fp32", Sharding(2, True, None))
    finally:
        torch.set_num_threads(threads)
    for field in ("block_s", "block_matmul_s", "rest_s", "block_comm_s", "rest_comm_s", "adamw_foreach_s_per_param"):
        assert cache_get(f"{key}|{field}") == pytest.approx(got[field]), field
