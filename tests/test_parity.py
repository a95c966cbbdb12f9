"""Correctness is part of the benchmark: every strategy trains the same model the same way.

Same seed, same global batch (4 sequences of tiny, fp32, 10 steps): the loss trajectory of
each strategy equals the single-process reference within RTOL (float reduction order is the
only difference). Real gloo processes; this is what catches e.g. FSDP2 on gloo summing
gradients where it should average them (pytorch/pytorch#162338).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.training import BF16_RTOL, RTOL, losses_of, run_cfg

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def reference(corpus) -> list[float]:
    return losses_of(run_cfg({}, micro_batch=2, grad_accum=2, data=corpus))


# (strategy fields, micro_batch, grad_accum) per rank: always 4 sequences per step in total.
DP_CASES = {
    "ddp": ({"dp": "ddp"}, 2, 1),
    "ddp_grad_accum": ({"dp": "ddp"}, 1, 2),
    "fsdp": ({"dp": "fsdp"}, 2, 1),
    "fsdp_grad_accum": ({"dp": "fsdp"}, 1, 2),
    "fsdp_noreshard": ({"dp": "fsdp", "reshard_after_forward": False}, 2, 1),
    "fsdp_ac_full": ({"dp": "fsdp", "ac": "full"}, 2, 1),
    "ddp_ac_selective": ({"dp": "ddp", "ac": "selective", "ac_every": 2}, 2, 1),
    "fsdp_ac_op": ({"dp": "fsdp", "ac": "op"}, 2, 1),
}


def _dp_worker(rank: int, world_size: int, cases: dict, data: str) -> dict:
    torch.manual_seed(1234 + rank)  # different global RNG per rank must not matter
    return {name: losses_of(run_cfg(*case, data=data), rank, world_size) for name, case in cases.items()}


def test_dp_strategies_match_single(ranks, reference, corpus):
    per_rank = ranks(_dp_worker, DP_CASES, corpus)
    for name in DP_CASES:
        assert per_rank[0][name] == per_rank[1][name], f"{name}: ranks disagree on the global loss"
        torch.testing.assert_close(torch.tensor(per_rank[0][name]), torch.tensor(reference), rtol=RTOL, atol=0,
                                   msg=lambda m, n=name: f"{n} diverges from single: {m}")
    # The loss moves (so parity is not two flat lines): 10 AdamW steps on a repetitive text.
    # (Tolerance: RTOL = 1e-5 relative, fp32; bf16: BF16_RTOL, below.)
    assert reference[-1] < 0.8 * reference[0]


@pytest.mark.parametrize("strategy", [{"ac": "full"}, {"ac": "selective", "ac_every": 3}, {"ac": "op"}])
def test_single_process_ac_matches_single(strategy, reference, corpus):
    got = losses_of(run_cfg(strategy, 2, 2, data=corpus))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(reference), rtol=RTOL, atol=0)


def test_llama_variant_ddp_matches_single(ranks):
    ref = losses_of(run_cfg({}, 2, 2, model="llama-tiny"))
    out = ranks(_dp_worker_llama)
    torch.testing.assert_close(torch.tensor(out[0]), torch.tensor(ref), rtol=RTOL, atol=0)


def _dp_worker_llama(rank: int, world_size: int) -> list[float]:
    return losses_of(run_cfg({"dp": "fsdp", "ac": "full"}, 2, 1, model="llama-tiny"), rank, world_size)


def _compile_worker(rank: int, world_size: int, data: str) -> dict:
    cases = {"ddp_ac_compile": ({"dp": "ddp", "ac": "full", "compile": True}, 2, 1),
             "fsdp_compile": ({"dp": "fsdp", "compile": True}, 2, 1)}
    return {name: losses_of(run_cfg(*case, data=data), rank, world_size) for name, case in cases.items()}


def test_compiled_strategies_match_single(ranks, reference, corpus):
    out = ranks(_compile_worker, corpus)[0]
    out["single_compile_model"] = losses_of(run_cfg({"compile": True, "compile_mode": "model"}, 2, 2,
                                                    data=corpus))
    for name, losses in out.items():
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=RTOL, atol=0,
                                   msg=lambda m, n=name: f"{n} diverges from single: {m}")




def _bf16_worker(rank: int, world_size: int, data: str) -> list[float]:
    return losses_of(run_cfg({"dp": "fsdp", "amp": "bf16"}, 1, 1, model="tiny", data=data, steps=5, seq_len=16),
                     rank, world_size)


def test_bf16_stays_within_the_looser_bound(ranks, corpus):
    ref = losses_of(run_cfg({}, 1, 2, data=corpus, steps=5, seq_len=16))
    autocast = losses_of(run_cfg({"amp": "bf16"}, 1, 2, data=corpus, steps=5, seq_len=16))
    fsdp_mp = ranks(_bf16_worker, corpus)[0]
    for got in (autocast, fsdp_mp):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=BF16_RTOL, atol=0)
        assert got != ref  # bf16 really ran
