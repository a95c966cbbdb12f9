"""The planner's search (bench/plan/search.py): it pads the vocabulary like Megatron, unties a pipeline's head, chooses
the micro-batch and accumulation that meet a target global batch, and shows each family's best.

Expectations are worked out here from the definitions (128 x tp, the head's 6 d V training FLOPs per token, the
target's arithmetic), and the choice is checked against the cost model it chose from: the next larger micro-batch
does not fit, or is not faster.
"""

from __future__ import annotations

import dataclasses
import re

import pytest

from bench.plan.__main__ import PlanArgs, plan, render
from bench.plan.costmodel import predict_memory
from bench.plan.search import MAX_MICRO_BATCH, auto_pad, choose_shape, micro_batches, vocab_padding
from bench.plan.steptime import predict_step
from models.config import get_config
from models.flops import train_flops_per_token
from strategies.config import StrategyConfig

pytestmark = pytest.mark.unit

GIB = 2**30


def test_megatron_padding_and_its_cost():
    assert [auto_pad(t) for t in (1, 2, 8)] == [128, 256, 1024]
    cfg = get_config("gpt2-xl", pad_vocab_to=128)
    assert cfg.padded_vocab_size == 50304  # 393 x 128, nanoGPT's 50304
    pad = vocab_padding(cfg, 1024)
    flops = 6 * 1600 * 47  # the head's forward 2 d V, backward twice that, for the 47 rows added
    assert pad == {"rows": 47, "bytes": 4 * 47 * 1600,
                   "flops_pct": round(100 * flops / train_flops_per_token(get_config("gpt2-xl"), 1024), 3)}


def test_micro_batch_candidates():
    assert micro_batches(StrategyConfig(), None, 0)[-1] == MAX_MICRO_BATCH
    assert micro_batches(StrategyConfig(), 24, 0) == [1, 2, 4, 8]  # powers of two dividing 24
    assert micro_batches(StrategyConfig(pp=4), 24, 0) == [4, 8]  # multiples of the 4 pipeline micro-batches
    assert micro_batches(StrategyConfig(pp=2), None, 6) == [6]  # given
    assert micro_batches(StrategyConfig(), 24, 6) == [6] and micro_batches(StrategyConfig(), 24, 5) == []  # given


def test_gpt2_xl_on_64_gpus_asked_with_no_flags():
    """The question the planner exists for: dp-only, pipeline and HSDP plans, each with its padding stated (and the
    pipeline's untied head), and why no tensor-parallel plan exists (25 heads take tp 5 or 25, 64 GPUs neither)."""
    rows = plan(PlanArgs(model="gpt2-xl", world_size=64, device_memory_gib=80))
    fams = {r["family"] for r in rows if r["fits"]}
    assert {"dp only", "with pp", "hsdp"} <= fams
    for r in rows:
        assert any(c.startswith("pad_vocab_to=128 (50257 -> 50304: +47 rows") for c in r["model_changes"])
        assert "model.pad_vocab_to=128" in r["command"]
        assert (r["family"] == "with pp") == ("model.tie_embeddings=false" in r["command"])
    hsdp = next(r for r in rows if r["family"] == "hsdp")
    assert hsdp["mesh"].startswith("dp_replicate8xdp_shard") and "strategy.dp_replicate=8" in hsdp["command"]
    text = render(rows, 80)
    assert "model.n_head=25 takes tp 5, 25; none divides world_size=64" in text
    assert "tie_embeddings=false (a pipeline's head" in text


def test_gpt2_large_gets_tensor_parallel_plans_padded_per_tp():
    rows = plan(PlanArgs(model="gpt2-large", world_size=64, device_memory_gib=80))
    by = {r["strategy"]: r for r in rows}
    assert by["fsdp+tp4"]["vocab_size"] == 50688 and "model.pad_vocab_to=512" in by["fsdp+tp4"]["command"]
    assert by["fsdp+tp2"]["vocab_size"] == 50432
    pinned = {r["strategy"]: r for r in plan(PlanArgs(model="gpt2-large", world_size=64, pad_vocab_to=1))}
    assert "fsdp+tp2" not in pinned  # 50257 rows take no tp
    assert all(c.startswith("tie_embeddings=false") for r in pinned.values() for c in r["model_changes"])


def test_a_target_global_batch_is_met_by_the_fastest_shape_that_fits():
    args = PlanArgs(model="gpt2-xl", world_size=64, device_memory_gib=80, global_batch=512, device="H100",
                    link_gbps=360)
    rows = plan(args)
    assert rows and all(r["global_batch"] == 512 for r in rows)
    for r in rows:  # the data-parallel ranks read off the row's mesh, times the shape chosen: the target
        dims = {m.group(1): int(m.group(2)) for m in map(re.compile(r"([a-z_]+)(\d+)$").match, r["mesh"].split("x"))}
        dp = dims.get("dp", 1) * dims.get("dp_replicate", 1) * dims.get("dp_shard", 1)
        assert r["micro_batch"] * r["grad_accum"] * dp == 512, r["strategy"]
    fsdp = next(r for r in rows if r["strategy"] == "fsdp")
    cfg, s = get_config("gpt2-xl", pad_vocab_to=128), StrategyConfig(dp="fsdp")
    mb, per_rank = fsdp["micro_batch"], 512 // 64
    assert fsdp["grad_accum"] == per_rank // mb and fsdp["fits"]
    if mb < per_rank:  # the next candidate does not fit, or is not faster
        bigger = predict_memory(cfg, s, 64, 2 * mb, 1024)["total"]
        faster = predict_step(cfg, s, 64, 2 * mb, 1024, per_rank // (2 * mb), args.rates(s))["tokens_per_sec"]
        assert bigger > 80 * GIB or faster <= fsdp["pred_tokens_per_sec"]
    text = render(rows, 80)
    assert "best of each family:" in text and "why the first win:" in text
    first, second = [r for r in rows if r["fits"]][:2]
    ratio = first["pred_tokens_per_sec"] / second["pred_tokens_per_sec"]
    assert f"{first['strategy']} is {ratio:.2f}x as fast as {second['strategy']}" in text


def test_choose_shape_rules():
    """On a constructed memory and speed: the largest fitting micro-batch unless a smaller is faster; nothing fits:
    the smallest, marked; a target that does not divide: the reason."""
    s = StrategyConfig(dp="ddp")

    def memory(micro_batch):
        return {"total": 10 * micro_batch}

    def step(micro_batch, grad_accum):
        return {"tokens_per_sec": {1: 1.0, 2: 3.0, 4: 2.0}[micro_batch]}

    got = choose_shape(s, 2, 8, 0, 1, 40, memory, step)
    assert (got.micro_batch, got.grad_accum, got.fits) == (2, 2, True)  # 4 fits (40) but is slower
    assert choose_shape(s, 2, 8, 0, 1, 40, memory, None).micro_batch == 4  # memory only: the largest that fits
    none = choose_shape(s, 2, 8, 0, 1, 5, memory, step)
    assert (none.micro_batch, none.fits) == (1, False)
    assert "do not divide over dp=2" in choose_shape(s, 2, 7, 0, 1, 40, memory, step)
    pp = dataclasses.replace(StrategyConfig(pp=4))
    assert "no micro-batch (a multiple of the pipeline's 4" in choose_shape(pp, 4, 2, 0, 1, 40, memory, step)
    # a pinned micro-batch that does not divide the 4 sequences per rank: the reason, not a shape
    assert "no micro-batch (whole) divides the 4 sequences" in choose_shape(s, 2, 8, 3, 1, 40, memory, step)


def test_planner_inputs_for_the_search_are_checked():
    from models.cli import UsageError

    for kw, msg in (({"global_batch": 8, "global_batch_tokens": 8192}, "not both"),
                    ({"global_batch": 8, "grad_accum": 2}, "derives the accumulation"),
                    ({"global_batch": -1}, "must be >= 0"), ({"pad_vocab_to": -1}, "must be >= 0")):
        with pytest.raises(UsageError, match=msg):
            PlanArgs(model="tiny", world_size=2, **kw)
    with pytest.raises(ValueError, match="not a multiple of seq_len=256"):
        plan(PlanArgs(model="tiny", world_size=2, global_batch_tokens=1000))
