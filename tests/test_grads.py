"""Strategies proven on gradients and parameters, not only on losses.

Every case runs the harness's own build and step (bench/harness/loop.py: ``build``, ``make_step``: the
strategies, gradient accumulation, no_sync, autocast wiring) on real text whose loss falls, with the
optimizer swapped for one that records. After one **SGD** step (no adaptive normalisation, so a gradient
2x too large, a missing micro-batch or a wrong shard moves the parameters by as much) the full gradients
(gathered from FSDP's shards) and the full parameters equal the single-process ones; after several
**AdamW** steps the parameters still do (its state is sharded and stepped correctly).

Tolerance: relative L2 error per tensor ``||x - ref|| / ||ref||`` below ``RTOL`` = 1e-4 for SGD's gradients
and parameters; fp32 reduction order gives ~1e-7, and the smallest error the deliberate breakages make
(one micro-batch of four missing) is above 0.1, so a pass cannot hide a factor-2 or a lost shard. After
AdamW, ``RTOL_ADAMW`` = 1e-2: Adam divides by the gradient's own scale, so elements whose gradient is
reduction-order noise move by up to the learning rate either way (measured: 3e-4 on a zero-initialised
bias); a wrong or mis-sharded optimizer state moves whole tensors (relative error near 1).
"""

from __future__ import annotations

import pytest
import torch

from bench.harness.dist import DistInfo
from bench.harness.loop import plan_batch
from tests.helpers.training import GRAD_RTOL as RTOL
from tests.helpers.training import GRAD_RTOL_ADAMW as RTOL_ADAMW
from tests.helpers.training import assert_same, rel_l2, run_case, run_cfg

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def reference(corpus) -> dict:
    """Single process, 4 sequences per step as 2 micro-batches of 2: SGD (1 step) and AdamW (3 steps)."""
    return {"sgd": run_case(0, 1, {}, 2, 2, "sgd", 1, corpus), "adamw": run_case(0, 1, {}, 2, 2, "adamw", 3, corpus)}


def _sgd_and_adamw(rank: int, world_size: int, fields: dict, mb: int, ga: int, corpus: str, model: str) -> tuple:
    return (run_case(rank, world_size, fields, mb, ga, "sgd", 1, corpus, model),
            run_case(rank, world_size, fields, mb, ga, "adamw", 3, corpus, model))


# (strategy fields, micro_batch, grad_accum) per rank on 2 ranks: always 4 sequences per step.
CASES = {
    "ddp": ({"dp": "ddp"}, 2, 1),
    "ddp_grad_accum": ({"dp": "ddp"}, 1, 2),
    "fsdp": ({"dp": "fsdp"}, 2, 1),
    "fsdp_grad_accum": ({"dp": "fsdp"}, 1, 2),
    "fsdp_noreshard": ({"dp": "fsdp", "reshard_after_forward": False}, 2, 1),
    "ddp_ac_full": ({"dp": "ddp", "ac": "full"}, 2, 1),
    "fsdp_ac_selective": ({"dp": "fsdp", "ac": "selective"}, 1, 2),
    "fsdp_ac_op": ({"dp": "fsdp", "ac": "op"}, 2, 1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_and_parameters_equal_single_process(ranks, corpus, reference, name):
    fields, mb, ga = CASES[name]
    both = ranks(_sgd_and_adamw, fields, mb, ga, corpus, "tiny")  # one process group for both
    sgd, adamw = [r[0] for r in both], [r[1] for r in both]
    for rank in range(2):  # every rank holds the same full model after the step
        assert_same(sgd[rank]["grads"], reference["sgd"]["grads"], f"{name} rank {rank} SGD gradients")
        assert_same(sgd[rank]["params"], reference["sgd"]["params"], f"{name} rank {rank} params after SGD")
        assert_same(adamw[rank]["params"], reference["adamw"]["params"], f"{name} rank {rank} params after AdamW",
                    RTOL_ADAMW)


# Mesh strategies: (strategy fields, model, micro_batch, grad_accum, world size); 4 sequences per step.
MESH_CASES = {
    "tp2_sp": ({"tp": 2, "sp": True}, "tiny", 2, 2, 2),
    "tp2_llama": ({"tp": 2}, "llama-tiny", 4, 1, 2),
    "pp2_1f1b": ({"pp": 2}, "tiny:untied", 4, 1, 2),
    "fsdp_tp": ({"dp": "fsdp", "tp": 2}, "tiny", 2, 1, 4),
    "pp2_fsdp": ({"dp": "fsdp", "pp": 2}, "llama-tiny:untied", 2, 1, 4),
    "hsdp2": ({"dp": "fsdp", "dp_replicate": 2}, "tiny", 1, 1, 4),  # 2 replicas x 2 shards
}


@pytest.fixture(scope="module")
def model_references(corpus) -> dict:
    cache: dict = {}

    def get(model: str) -> dict:
        if model not in cache:
            cache[model] = {"sgd": run_case(0, 1, {}, 2, 2, "sgd", 1, corpus, model),
                            "adamw": run_case(0, 1, {}, 2, 2, "adamw", 3, corpus, model)}
        return cache[model]
    return get


@pytest.mark.parametrize("name", list(MESH_CASES))
def test_mesh_gradients_and_parameters_equal_single_process(ranks, corpus, model_references, name):
    """Tensor-parallel shards and pipeline stages, gathered: the single process's gradients and parameters.
    A pipeline rank holds its stage's parameters only; together the ranks hold every one."""
    fields, model, mb, ga, world = MESH_CASES[name]
    ref = model_references(model)
    both = ranks(_sgd_and_adamw, fields, mb, ga, corpus, model, world_size=world)  # one process group for both
    sgd, adamw = [r[0] for r in both], [r[1] for r in both]
    for rank in range(world):
        assert_same(sgd[rank]["grads"], ref["sgd"]["grads"], f"{name} rank {rank} SGD gradients", subset=True)
        assert_same(sgd[rank]["params"], ref["sgd"]["params"], f"{name} rank {rank} params after SGD", subset=True)
        assert_same(adamw[rank]["params"], ref["adamw"]["params"], f"{name} rank {rank} params after AdamW",
                    RTOL_ADAMW, subset=True)
    assert set().union(*(r["params"] for r in sgd)) == set(ref["sgd"]["params"])


@pytest.mark.parametrize("fields", [{"ac": "full"}, {"ac": "selective", "ac_every": 3}, {"ac": "op"},
                                    {"compile": True}])
def test_single_process_techniques_keep_the_gradients(corpus, reference, fields):
    """Checkpointing (every mode) and per-block compile on one process: the same gradients as plain eager."""
    got = run_case(0, 1, fields, 2, 2, "sgd", 1, corpus)
    assert_same(got["grads"], reference["sgd"]["grads"], f"{fields} SGD gradients")
    assert_same(got["params"], reference["sgd"]["params"], f"{fields} params after SGD")


def test_the_check_would_see_a_factor_of_two_and_a_missing_micro_batch(corpus, reference):
    """The tolerance is far below what the classic wiring mistakes produce."""
    ref = reference["sgd"]["grads"]
    doubled = {n: 2 * g for n, g in ref.items()}
    with pytest.raises(AssertionError, match="differs from single"):
        assert_same(doubled, ref, "doubled")
    half_batch = run_case(0, 1, {}, 2, 1, "sgd", 1, corpus)["grads"]  # one micro-batch of the two
    worst = max(rel_l2(half_batch[n], ref[n]) for n in ref)
    assert worst > 1000 * RTOL


def test_the_reference_learns(reference):
    """On this text the loss falls clearly within three steps, so a wrong update shows in the parameters."""
    losses = reference["adamw"]["losses"]
    assert losses[-1] < losses[0] - 0.05


@pytest.mark.parametrize("world_size, micro_batch, global_batch, expect", [
    (1, 2, 8, (1, 4, 8)), (2, 2, 8, (2, 2, 8)), (4, 2, 8, (4, 1, 8)), (4, 1, 8, (4, 2, 8)), (3, 2, 12, (3, 2, 12)),
])
def test_global_batch_divides_by_the_data_parallel_size(world_size, micro_batch, global_batch, expect):
    """grad_accum = global_batch / (micro_batch x dp size), for several dp sizes; (dp, grad_accum, sequences)."""
    cfg = run_cfg({"dp": "ddp" if world_size > 1 else "none"}, micro_batch, 1)
    cfg.global_batch = global_batch
    info = DistInfo(0, 0, world_size, 1, torch.device("cpu"), None)
    b = plan_batch(cfg, info)
    assert (b["dp_size"], b["grad_accum"], b["global_batch_seqs"]) == expect
    assert b["global_batch_tokens"] == global_batch * cfg.seq_len
