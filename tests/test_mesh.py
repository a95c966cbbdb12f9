"""Model parallelism on a device mesh (strategies/mesh.py, tp.py, pp.py), on real gloo ranks.

- Parity: tensor parallel (plain and sequence parallel, gpt2 and llama), FSDP x TP (2 x 2), pipeline
  parallel under every schedule, PP x FSDP and PP x TP, HSDP (2 replicas x 2 shards; beside TP and PP): the
  loss trajectory equals the single-process one within 1e-5 (fp32, same global batch of 4 sequences, 10
  steps), on text whose loss falls; the same for Hugging Face's GPT-2 and Llama (``model.source=hf``) under
  TP+SP, TP, PP, FSDP x TP and PP x TP+SP, against the family's single-process losses (with the ``[hf]``
  extra; CI has it).
- Communication, in the same runs: every rank's observed bytes per collective kind (bench/measure/comm.py,
  which sees DTensor's own collectives and point-to-point sends) equal the cost model's prediction for
  that rank exactly.
- Validation: every impossible combination stops before training with one line naming the value.
- The split: stages hold consecutive blocks under their global names and start from the whole model's weights.
"""

from __future__ import annotations

import pytest
import torch

from bench.harness.config import ConfigError
from bench.harness.dist import DistInfo
from bench.harness.loop import build, make_step, measure_comm, plan_batch
from bench.plan.costmodel import param_groups, predict_comm
from models import build_model
from strategies import StrategyConfig, StrategyError, apply_strategies
from strategies.mesh import dp_degree, layout_columns
from strategies.pp import bubble_fraction, in_flight_chunks, split_stage, stage_blocks, stage_ids
from tests.helpers import HF_MISSING, HF_SKIP_ALLOWED
from tests.helpers.training import RTOL, losses_of, model_cfg, run_cfg

pytestmark = pytest.mark.dist

HAVE_HF = not (HF_MISSING and HF_SKIP_ALLOWED)  # without the extra, only N00BGPT_ALLOW_NO_HF=1 leaves HF cases out

# name -> (strategy fields, model, micro_batch, grad_accum): 4 sequences per step on every mesh
TWO_RANKS = {
    "tp2": ({"tp": 2}, "tiny", 4, 1),
    "tp2_llama": ({"tp": 2}, "llama-tiny", 2, 2),
    "tp2_sp": ({"tp": 2, "sp": True}, "tiny", 2, 2),
    "tp2_sp_llama_untied": ({"tp": 2, "sp": True}, "llama-tiny:untied", 4, 1),
    "pp2_gpipe": ({"pp": 2, "pp_schedule": "gpipe"}, "tiny:untied", 4, 1),
    "pp2_1f1b": ({"pp": 2, "pp_schedule": "1f1b", "pp_microbatches": 4}, "llama-tiny:untied", 4, 1),
    "pp2_interleaved": ({"pp": 2, "pp_schedule": "interleaved1f1b"}, "llama-tiny:untied", 2, 2),
    # a one-rank data-parallel dimension: FSDP issues nothing on it, DDP still all-reduces
    "fsdp_pp2_dp1": ({"dp": "fsdp", "pp": 2}, "tiny:untied", 4, 1),
    "ddp_tp2_dp1": ({"dp": "ddp", "tp": 2}, "llama-tiny", 4, 1),
}
FOUR_RANKS = {
    "fsdp_tp": ({"dp": "fsdp", "tp": 2}, "llama-tiny", 2, 1),
    "fsdp_tp_sp": ({"dp": "fsdp", "tp": 2, "sp": True}, "tiny", 1, 2),
    "pp2_fsdp": ({"dp": "fsdp", "pp": 2}, "tiny:untied", 2, 1),
    "pp2_tp2_sp": ({"pp": 2, "tp": 2, "sp": True}, "llama-tiny:untied", 4, 1),
    "pp2_fsdp_gpipe": ({"dp": "fsdp", "pp": 2, "pp_schedule": "gpipe"}, "llama-tiny:untied", 2, 1),
    # HSDP: shards within groups of 2, replicas across 2 (the gradient shard all-reduced across them); and with a
    # shard group of one rank beside tensor and pipeline parallelism (only the replicas' all-reduce)
    "hsdp2": ({"dp": "fsdp", "dp_replicate": 2}, "tiny", 1, 1),
    "hsdp2_tp2": ({"dp": "fsdp", "dp_replicate": 2, "tp": 2}, "llama-tiny", 2, 1),
    "pp2_hsdp2": ({"dp": "fsdp", "dp_replicate": 2, "pp": 2}, "tiny:untied", 2, 1),
}
# Hugging Face's models under the same meshes (models/parts.py finds their modules; GPT-2's Conv1D and fused
# c_attn, Llama's separate q/k/v, HF's stage loop): checked against the *family's* single-process losses
if HAVE_HF:
    TWO_RANKS.update({
        "tp2_sp_hf": ({"tp": 2, "sp": True}, "tiny:hf", 2, 2),
        "tp2_llama_hf": ({"tp": 2}, "llama-tiny:hf", 2, 2),
        "pp2_1f1b_hf": ({"pp": 2, "pp_schedule": "1f1b"}, "tiny:untied:hf", 4, 1),
    })
    FOUR_RANKS.update({
        "fsdp_tp_hf": ({"dp": "fsdp", "tp": 2}, "tiny:hf", 2, 1),
        "pp2_tp2_sp_hf": ({"pp": 2, "tp": 2, "sp": True}, "llama-tiny:untied:hf", 4, 1),
    })


def _parity_worker(rank: int, world: int, cases: dict, text: str) -> dict:
    """Each case through the harness's train(): its losses, and the row's observed communication (measured
    after the timed steps, as in every row) beside the cost model's prediction."""
    out = {}
    for name, (fields, model, mb, ga) in cases.items():
        cfg = run_cfg(fields, mb, ga, model=model, data=text)
        cfg.measure_comm = True
        row: dict = {}
        losses = losses_of(cfg, rank, world, observed=row)
        # the row holds rank 0's breakdown and the busiest rank's total (reports/record.py's rules)
        rank0 = predict_comm(cfg.model, cfg.strategy, world, ga, micro_batch=mb, seq_len=cfg.seq_len, pp_rank=0)
        busiest = predict_comm(cfg.model, cfg.strategy, world, ga, micro_batch=mb, seq_len=cfg.seq_len)
        out[name] = (losses, (row.get("comm_breakdown"), row.get("comm_bytes_per_step")),
                     ({k: v for k, v in rank0.items() if k != "total"}, busiest["total"]))
    return out


@pytest.fixture(scope="module")
def references(corpus) -> dict:
    models = {_family(m) for cases in (TWO_RANKS, FOUR_RANKS) for _, m, _, _ in cases.values()}
    return {m: losses_of(run_cfg({}, 2, 2, model=m, data=corpus)) for m in models}


def _family(model: str) -> str:
    """The family's model a case is compared with: itself, or for an HF model the same preset natively."""
    return model.replace(":hf", "")


@pytest.mark.parametrize("world, cases", [(2, TWO_RANKS), (4, FOUR_RANKS)], ids=["2ranks", "4ranks"])
def test_mesh_strategies_match_single(ranks, corpus, references, world, cases):
    """Losses equal single's on every rank; the observed bytes per collective kind equal the prediction."""
    per_rank = ranks(_parity_worker, cases, corpus, world_size=world)
    for name, (_, model, _, _) in cases.items():
        ref = torch.tensor(references[_family(model)])
        assert ref[-1] < ref[0] - 0.5, "the reference must learn, or parity proves little"
        for rank in range(world):
            losses, measured, predicted = per_rank[rank][name]
            torch.testing.assert_close(torch.tensor(losses), ref, rtol=RTOL, atol=0,
                                       msg=lambda m, n=name, r=rank: f"{n} rank {r} diverges from single: {m}")
            assert measured[0] and measured == predicted, f"{name} rank {rank}: measured {measured} != {predicted}"


def _comm_worker(rank: int, world: int, cases: dict) -> dict:
    out = {}
    for name, (fields, model, mb, ga) in cases.items():
        cfg = run_cfg(fields, mb, ga, model=model, steps=1)
        info = DistInfo(rank, rank, world, 1, torch.device("cpu"), "gloo")
        b = build(cfg, info, plan_batch(cfg, info))
        step = make_step(cfg, info, b)
        step(0)  # the pipeline's first step exchanges shapes, DDP's second rebuilds its buckets (a one-time
        step(1)  # broadcast of the bucket order): measure the third, as the harness measures after the timed steps
        out[name] = (measure_comm(step, 2).get("comm_breakdown"), None)
    return out


def test_the_comm_observer_sees_every_kind_the_mesh_uses(ranks):
    """Guard against a blind observer: SP's all-gathers and reduce-scatters, the vocabulary-parallel loss's
    small all-reduces and the pipeline's sends/receives are all there, with the sizes the test works out."""
    got = ranks(_comm_worker, {"tp2_sp": TWO_RANKS["tp2_sp"]})[0]["tp2_sp"][0]
    n, d, L = 2 * 64, 128, 4  # micro_batch x seq_len tokens, tiny's width and blocks
    assert got["all_gather"] == 2 * (4 * L + 2) * n * d * 4  # grad_accum 2, fp32
    assert got["reduce_scatter"] == 2 * (4 * L + 1) * n * d * 4
    loss = 3 * n * 4
    norms = (2 * L + 1) * 2 * d * 4  # LayerNorm weight and bias, once per step
    assert got["all_reduce"] == 2 * (n * d * 4 + loss) + norms


@pytest.mark.parametrize("fields, world, model, error", [
    ({"tp": 3}, 3, "tiny", "strategy.tp=3 does not divide model.n_head=4"),
    ({"tp": 2}, 3, "tiny", "strategy.tp=2 does not divide the world size 3"),
    ({"sp": True}, 1, "tiny", "strategy.sp=true needs strategy.tp >= 2"),
    ({"pp": 2}, 2, "tiny", "model.tie_embeddings=false"),
    ({"pp": 8}, 8, "tiny:untied", "needs at least 8 blocks but model.n_layer=4"),
    ({"pp": 2, "pp_microbatches": 3}, 2, "tiny:untied", "micro_batch=4 is not divisible by strategy.pp_microbatches=3"),
    # pp_microbatches left at 0 (= pp): the message names the key the user set, not the one they never did
    ({"pp": 3}, 2, "tiny:untied", "the pipeline micro-batches, 3 (strategy.pp_microbatches=0: as many as "
                                  "strategy.pp=3)"),
    ({"pp": 4, "pp_microbatches": 2}, 4, "tiny:untied", "strategy.pp_microbatches=2 is too few"),
    ({"pp": 2, "dp": "ddp"}, 4, "tiny:untied", "with dp=ddp is not supported"),
    ({"pp": 2, "pp_schedule": "interleaved1f1b", "pp_virtual": 1}, 2, "tiny:untied", "pp_virtual=1 is invalid"),
    ({"pp": 2, "pp_schedule": "zigzag"}, 2, "tiny:untied", "valid values: gpipe, 1f1b, interleaved1f1b"),
    ({"tp": 2, "pp": 2}, 2, "tiny:untied", "strategy.pp=2 x tp=2 does not divide the world size 2"),
    ({"dp": "ddp", "dp_replicate": 2}, 4, "tiny", "strategy.dp_replicate=2 (HSDP) needs strategy.dp=fsdp"),
    ({"dp": "fsdp", "dp_replicate": 3}, 4, "tiny", "strategy.dp_replicate=3 does not divide the data-parallel "
                                                   "degree 4 (world_size=4 / (tp=1 x pp=1)); valid: 1, 2, 4"),
    ({"dp": "fsdp", "dp_replicate": 0}, 4, "tiny", "strategy.dp_replicate=0 is invalid; must be >= 1"),
])
def test_impossible_meshes_stop_before_training(fields, world, model, error):
    with pytest.raises((StrategyError, ConfigError)) as exc:
        cfg = run_cfg(fields, 4, 1, model=model)
        cfg.strategy.validate_for("cpu", world)
    assert error in str(exc.value) and "\n" not in str(exc.value)


def test_dp_none_fills_the_world_with_model_parallel_ranks():
    s = StrategyConfig(tp=2, pp=2)
    with pytest.raises(StrategyError, match="launch 4 process"):
        s.validate_for("cpu", 8)
    s.validate_for("cpu", 4)


@pytest.mark.parametrize("fields, name", [
    ({"dp": "fsdp", "tp": 2, "sp": True}, "fsdp+tp2+sp"), ({"dp": "ddp", "tp": 2}, "ddp+tp2"),
    ({"tp": 2}, "tp2"), ({"dp": "fsdp", "pp": 2}, "fsdp+pp2(1f1b)"),
    ({"pp": 2, "pp_schedule": "interleaved1f1b"}, "pp2(interleaved1f1b/v2)"),
    ({"dp": "fsdp", "tp": 2, "ac": "full", "amp": "bf16"}, "fsdp+tp2+ac(full)+bf16"),
    ({"dp": "fsdp", "dp_replicate": 2}, "hsdp2"),
    ({"dp": "fsdp", "dp_replicate": 4, "reshard_after_forward": False, "tp": 2}, "hsdp4(no-reshard)+tp2"),
])
def test_canonical_names(fields, name):
    assert StrategyConfig(**fields).canonical_name == name


def test_layout_columns():
    cols = layout_columns(StrategyConfig(dp="fsdp", tp=2, pp=2, pp_schedule="gpipe"), 16)
    assert cols == {"tp": 2, "pp": 2, "dp_shard": 4, "dp_replicate": 1, "pp_schedule": "gpipe",
                    "pp_microbatches": 2, "mesh": "pp2xdp4xtp2"}
    assert layout_columns(StrategyConfig(dp="ddp"), 4)["dp_replicate"] == 4
    hsdp = layout_columns(StrategyConfig(dp="fsdp", dp_replicate=2, tp=2), 16)  # 2 replicas of 4 shards, tp 2
    assert (hsdp["dp_replicate"], hsdp["dp_shard"], hsdp["mesh"]) == (2, 4, "dp_replicate2xdp_shard4xtp2")
    assert layout_columns(StrategyConfig(), 1) == {"tp": 1, "pp": 1, "dp_shard": 1, "dp_replicate": 1,
                                                   "pp_schedule": None, "pp_microbatches": None, "mesh": "1"}
    # the ranks that split the data: 16 / (tp 2 x pp 2) under FSDP or HSDP, 16 / tp 2 under DDP; without data
    # parallelism a tp group's ranks share their micro-batches
    for dp, rep, pp, want in (("ddp", 1, 1, 8), ("fsdp", 1, 2, 4), ("fsdp", 2, 2, 4)):
        assert dp_degree(StrategyConfig(dp=dp, dp_replicate=rep, tp=2, pp=pp), 16) == want
    assert dp_degree(StrategyConfig(tp=2), 2) == 1 and dp_degree(StrategyConfig(), 1) == 1


def test_stages_hold_consecutive_blocks_under_global_names():
    assert [list(r) for r in stage_blocks(7, 3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert stage_ids(1, 4, 2) == [1, 5]
    cfg = model_cfg("tiny:untied")
    whole = build_model(cfg, "cpu")
    whole.init_weights(3)
    names = []
    for stage in range(2):
        part = split_stage(build_model(cfg, "meta"), stage, 2)
        part.to_empty(device="cpu")
        part.init_weights(3)  # the whole model's draws, keeping this stage's
        mine = dict(part.named_parameters())
        names += list(mine)
        for name, p in mine.items():
            assert torch.equal(p, dict(whole.named_parameters())[name]), name
    assert sorted(names) == sorted(n for n, _ in whole.named_parameters())
    assert [n for n in names if n.startswith("tok_emb")] == ["tok_emb.weight"]  # first stage only


def test_bubble_fraction():
    assert bubble_fraction(StrategyConfig()) == 0
    assert bubble_fraction(StrategyConfig(pp=4, pp_microbatches=8)) == pytest.approx(3 / 11)
    interleaved = StrategyConfig(pp=4, pp_microbatches=8, pp_schedule="interleaved1f1b")
    assert bubble_fraction(interleaved) == pytest.approx(3 / 19)


def test_in_flight_micro_batches_per_schedule():
    s = StrategyConfig(pp=4, pp_microbatches=8)
    assert [in_flight_chunks(s, r) for r in range(4)] == [4, 3, 2, 1]  # 1f1b: pp - rank
    assert in_flight_chunks(StrategyConfig(pp=4, pp_microbatches=8, pp_schedule="gpipe"), 3) == 8
    il = StrategyConfig(pp=4, pp_microbatches=8, pp_schedule="interleaved1f1b")
    assert in_flight_chunks(il, 0) == 3 * 2 + 4 + 1


def test_tensor_parallel_parameter_shapes_match_the_cost_model(ranks):
    """The cost model's local shapes (strategies/tp.py: tp_local_shape) are those of the real DTensor shards."""
    assert sorted(map(tuple, _local_shapes_worker(0, 1))) == sorted(_predicted_shapes(1))
    got = ranks(_local_shapes_worker)
    assert sorted(map(tuple, got[0])) == sorted(_predicted_shapes(2))


def _predicted_shapes(tp: int) -> list:
    g = param_groups(model_cfg("llama-tiny:untied"), StrategyConfig(tp=tp) if tp > 1 else None, tp)
    return list(g.root) + [s for b in g.blocks for s in b]


def _local_shapes_worker(rank: int, world: int) -> list:
    cfg = model_cfg("llama-tiny:untied")
    model = apply_strategies(build_model(cfg, "meta"), StrategyConfig(tp=world), torch.device("cpu"), 0)
    return [tuple(getattr(p, "to_local", lambda p=p: p)().shape) for p in model.parameters()]
