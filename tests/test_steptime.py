"""The step-time model (bench/plan/steptime.py) and the planner's ranking, against independently computed
numbers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.measure.parts import Parts
from bench.plan.__main__ import PlanArgs, plan
from bench.plan.costmodel import cost_context, predict_comm
from bench.plan.steptime import (
    DDP_BUCKET_BYTES,
    Rates,
    can_overlap,
    elementwise_per_token_block,
    predict_step,
)
from models import get_config, train_flops_per_token
from strategies import StrategyConfig
from strategies.pp import bubble_fraction

pytestmark = pytest.mark.unit

RATES = Rates(matmul_flops=50e9, mem_bw=20e9, link_bw=1e9)


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


def test_the_step_is_the_sum_of_its_terms_where_they_differ():
    """Each term checked alone cannot see a sum that takes the wrong one: where prefetch hides most of FSDP's
    gathers (exposed < all communication) and where a pipeline splits the model over two ranks, the step is
    compute + memory + exposed communication + bubble, with compute from the model's FLOP count here."""
    cfg = get_config("mini")
    t = predict_step(cfg, StrategyConfig(dp="fsdp"), 2, 4, 256, 1, RATES, overlap=True)
    assert 0 < t["exposed_comm_s"] < t["comm_s"] / 2  # the case where adding all communication would show
    compute = train_flops_per_token(cfg, 256) * 4 * 256 / 50e9
    assert t["compute_s"] == pytest.approx(compute)
    assert t["step_s"] == pytest.approx(compute + t["memory_s"] + t["exposed_comm_s"])
    untied = get_config("mini", tie_embeddings=False)
    p = predict_step(untied, StrategyConfig(pp=2, pp_microbatches=4), 2, 4, 256, 1, RATES)
    assert p["compute_s"] == pytest.approx(train_flops_per_token(untied, 256) * 4 * 256 / 2 / 50e9)  # half each
    assert p["bubble_s"] > 0 and p["exposed_comm_s"] == p["comm_s"] > 0
    assert p["step_s"] == pytest.approx(p["compute_s"] + p["memory_s"] + p["comm_s"] + p["bubble_s"])
    assert p["tokens_per_sec"] == pytest.approx(4 * 256 / p["step_s"])


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
