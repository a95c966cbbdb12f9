"""The counters no neighbour can move (bench/measure/counters.py), through the harness's own ``train``, against
sources the code does not share: the parameter shapes of a model the test builds itself, AdamW's documented state
(two moments and a step counter per tensor), the model's FLOP formula (models/flops.py, itself checked against
FlopCounterMode on a bare forward), and a function with exactly one graph break written here.
"""

from __future__ import annotations

import math

import pytest
import torch

from bench.measure.counters import compile_counts
from models import build_model
from tests.helpers.training import losses_of, model_cfg, run_cfg

pytestmark = pytest.mark.dist

KEYS = ("flops_counted_per_step", "param_bytes", "optimizer_state_bytes", "graphs_compiled", "graph_breaks",
        "flops_per_token", "recompute_flops_per_token", "global_batch_tokens")


def _counters(rank: int, world: int, fields: dict, micro_batch: int) -> dict:
    cfg = run_cfg(fields, micro_batch, 1, steps=2)
    cfg.measure_counters = True
    observed: dict = {}
    losses_of(cfg, rank, world, observed=observed)
    return {k: observed.get(k) for k in KEYS}


def _shapes() -> list[torch.Size]:
    """tiny's parameters, once each (tied weights are one tensor), from a model the test builds."""
    return [p.shape for p in build_model(model_cfg("tiny"), "cpu").parameters()]


def _matmul_weights() -> tuple[int, int]:
    """(every matmul weight, the blocks' alone) of tiny, from a model the test builds: its nn.Linear weights and
    the head, which multiplies by the (tied) token embedding."""
    model = build_model(model_cfg("tiny"), "cpu")
    blocks = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return blocks + model.tok_emb.weight.numel(), blocks


def test_one_process_counts_its_parameters_state_and_flops():
    """fp32 tiny, micro-batch 4 x 64 tokens: parameters 4 bytes each; AdamW's state two fp32 moments per parameter
    and one fp32 step counter per tensor; the counted FLOPs of a step 2 x 3 x (matmul weights) per token, forward
    and backward (on a CPU FlopCounterMode has no formula for the CPU flash-attention kernel, so attention counts
    0: the row's formula column, 6 N + 12 L d T, is that much larger); with full checkpointing the blocks' forward
    again on top, as far as backward needs it; nothing compiled."""
    shapes = _shapes()
    n = sum(math.prod(s) for s in shapes)
    n_mm, n_blocks = _matmul_weights()
    got = _counters(0, 1, {}, 4)
    tokens = got["global_batch_tokens"]
    assert tokens == 4 * 64
    assert got["param_bytes"] == 4 * n
    assert got["optimizer_state_bytes"] == 2 * 4 * n + 4 * len(shapes)
    assert got["flops_counted_per_step"] == 6 * n_mm * tokens
    assert got["flops_per_token"] * tokens - got["flops_counted_per_step"] == 12 * 4 * 128 * 64 * tokens  # L d T
    assert got["graphs_compiled"] == got["graph_breaks"] == 0
    # full checkpointing re-runs each block's forward in backward, up to what backward needs: not the MLP's down
    # projection (d x h weights per block), whose output only the next block reads (PyTorch's early stop)
    ac = _counters(0, 1, {"ac": "full"}, 4)
    assert ac["flops_counted_per_step"] == (6 * n_mm + 2 * (n_blocks - 4 * 128 * 512)) * tokens


def test_ranks_sum_to_the_job(ranks):
    """2 ranks, micro-batch 2 each (the same 4 x 64 tokens per step): the FLOPs summed over ranks are one process's
    for the same global batch, under DDP and FSDP alike; DDP's parameter and state bytes are two replicas';
    FSDP's are the shards: each tensor's first dimension padded to a multiple of 2, as FSDP2 shards, with a step
    counter per tensor on each rank."""
    single = _counters(0, 1, {}, 4)
    shapes = _shapes()
    padded = sum(math.ceil(s[0] / 2) * 2 * math.prod(s[1:]) for s in shapes)
    for dp in ("ddp", "fsdp"):
        per_rank = ranks(_counters, {"dp": dp}, 2)
        row = per_rank[0]  # every rank returns the combined row
        assert row["flops_counted_per_step"] == single["flops_counted_per_step"], dp
        if dp == "ddp":
            assert row["param_bytes"] == 2 * single["param_bytes"]
            assert row["optimizer_state_bytes"] == 2 * single["optimizer_state_bytes"]
        else:
            assert row["param_bytes"] == 4 * padded
            assert row["optimizer_state_bytes"] == 2 * 4 * padded + 2 * 4 * len(shapes)


def test_compile_counts_see_one_graph_break():
    """A function compiled with exactly one ``graph_break`` in it: two more graphs, one more break."""
    def f(x):
        x = x.sin() + 1
        torch._dynamo.graph_break()
        return x.cos() * 2

    before = compile_counts()
    torch.compile(f, backend="eager")(torch.randn(8))
    assert compile_counts(since=before) == {"graphs_compiled": 2, "graph_breaks": 1}


def test_a_run_counts_only_what_it_compiled():
    """A process that compiled before (as a test worker or the tuner has) starts the run's counts from zero: a
    plain run after a compiled function reports 0 graphs and 0 breaks."""
    torch.compile(lambda x: x.exp() * 3, backend="eager")(torch.randn(4))
    assert compile_counts()["graphs_compiled"] > 0
    got = _counters(0, 1, {}, 4)
    assert got["graphs_compiled"] == got["graph_breaks"] == 0


@pytest.mark.unit
def test_a_step_that_fails_under_the_counter_leaves_the_columns_empty_with_a_warning():
    """The failure path, forced: a step that raises under the counting mode yields no column and a warning naming
    the columns, never a number (the FLOP count and the collectives' observation share this path)."""
    from bench.harness.loop import measure_comm
    from bench.measure.counters import count_step_flops

    def broken(step):
        raise RuntimeError("boom")

    with pytest.warns(UserWarning, match="flops_counted_per_step left empty.*boom"):
        assert count_step_flops(broken, 0) == {}
    with pytest.warns(UserWarning, match="comm_bytes_per_step left empty.*boom"):
        assert measure_comm(broken, 0) == {}
    assert count_step_flops(lambda step: torch.ones(4, 4) @ torch.ones(4, 4), 0) == {"flops_counted_per_step": 128}


def _step_counters(rank: int, world: int, change: str) -> dict:
    """One rank's counters of a hand-made data-parallel step -- a 16 x 16 linear layer, its gradient all-reduced,
    a compiled activation called on an 8-row batch -- measured by the harness's own instruments (``measure_comm``,
    ``count_step_flops``, ``compile_counts``), with one constructed ``change``: an extra all-reduce of 100 fp32
    values, an extra 8 x 16 @ 16 x 16 matmul on a parameter of its own, or a recompile (the compiled function
    called on a 9-row batch too)."""
    import torch.distributed as dist

    from bench.harness.loop import measure_comm
    from bench.measure.counters import count_step_flops

    torch.manual_seed(0)
    w, w2 = torch.randn(16, 16, requires_grad=True), torch.randn(16, 16, requires_grad=True)
    act = torch.compile(lambda t: t.tanh() * 2, backend="eager", dynamic=False)

    def step(i: int) -> torch.Tensor:
        x = torch.randn(8, 16)
        loss = act(x @ w).sum()
        if change == "flop":
            loss = loss + (x @ w2).sum()
        if change == "recompile":
            loss = loss + act(torch.randn(9, 16)).sum()
        loss.backward()
        dist.all_reduce(w.grad)
        if change == "allreduce":
            dist.all_reduce(torch.ones(100))
        return loss

    torch._dynamo.reset()
    before = compile_counts()
    step(0)
    got = {**compile_counts(since=before), **measure_comm(step, 1), **count_step_flops(step, 2)}
    return {k: got[k] for k in ("comm_bytes_per_step", "flops_counted_per_step", "graphs_compiled", "graph_breaks")}


def test_constructed_changes_move_exactly_their_counter_and_fail_the_gate(ranks):
    """2 gloo ranks. Unchanged, the step counts the gradient's all-reduce (16 x 16 fp32, 1024 bytes), the forward
    and backward matmul FLOPs (forward 2 x 8 x 16 x 16, backward the same again: the weight's gradient, and nothing
    for the input, which needs none) and one compiled graph. Each constructed change moves its counter by its
    hand-worked amount and no other: an extra all-reduce +400 bytes, an extra matmul +2 x 4096 FLOPs (forward and
    the new parameter's gradient), a recompile +1 graph. Fed to the A/B gate's judge (bench/gate/ab.py) with equal
    timing, each fails with its counter named, and the unchanged step against itself passes."""
    from bench.gate.ab import COUNTERS, Pair, Run, judge, load_thresholds

    base = ranks(_step_counters, "")[0]
    mm = 2 * 8 * 16 * 16
    assert base == {"comm_bytes_per_step": 16 * 16 * 4, "flops_counted_per_step": 2 * mm, "graphs_compiled": 1,
                    "graph_breaks": 0}
    moved = {"allreduce": ("comm_bytes_per_step", 400), "flop": ("flops_counted_per_step", 2 * mm),
             "recompile": ("graphs_compiled", 1)}
    th = load_thresholds(None)

    def verdict(cand: dict):
        full = {k: 0 for k in COUNTERS}
        pair = Pair(0, "AB", Run("base", "ok", 0.1, 1e9, 1.0, counters={**full, **base}),
                    Run("cand", "ok", 0.1, 1e9, 1.0, counters={**full, **cand}), step_ratios=[1.0] * 120)
        return judge("e", [pair], th, timing=False)

    assert verdict(base).verdict == "PASS"
    for change, (counter, delta) in moved.items():
        cand = ranks(_step_counters, change)[0]
        assert cand == {**base, counter: base[counter] + delta}, change
        v = verdict(cand)
        detail = next(c["detail"] for c in v.checks if c["metric"] == "counters")
        assert v.verdict == "FAIL" and f"{counter} {base[counter]} -> {base[counter] + delta}" in detail, change
