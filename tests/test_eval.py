"""Held-out evaluation and the run to a target (bench/harness/evaluate.py, loop.py Target, bench/run.py).

- Parity: the held-out loss each strategy computes with its own model (DDP, FSDP with checkpointing, tensor and
  sequence parallel, a pipeline's forward-only schedule, FSDP x TP and PP x FSDP on 4 ranks) equals the single
  process's at every evaluation, within the losses' parity tolerance, on real gloo ranks.
- Independent of the harness's arithmetic: the single process's held-out loss equals the mean cross-entropy of
  its model on the held-out batches, computed here from the logits.
- The run to a target, end to end: a loose target on data=markov is reached in a bounded number of steps (exit 0,
  the row's time, tokens and steps to it agree with its per-step log); a target below the language's floor is
  never reached (status not_reached, exit 4, a row with the held-out loss, max_time_s stopping it early).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bench.harness.data import markov_floor
from bench.harness.dist import DistInfo
from bench.harness.loop import train
from tests.helpers import ROOT
from tests.helpers.training import RTOL, run_cfg

EVAL_EVERY, STEPS = 3, 6

# name -> (strategy fields, model, micro_batch, grad_accum): 4 sequences per step, as the reference
TWO_RANKS = {
    "ddp": ({"dp": "ddp"}, "tiny", 2, 1),
    "fsdp_ac": ({"dp": "fsdp", "ac": "full"}, "tiny", 1, 2),
    "tp2_sp": ({"tp": 2, "sp": True}, "tiny", 2, 2),
    "pp2_1f1b": ({"pp": 2, "pp_schedule": "1f1b"}, "tiny:untied", 4, 1),
}
FOUR_RANKS = {
    "fsdp_tp": ({"dp": "fsdp", "tp": 2}, "tiny", 2, 1),
    "pp2_fsdp": ({"dp": "fsdp", "pp": 2}, "tiny:untied", 2, 1),
}


def _evals(fields: dict, model: str, mb: int, ga: int, data: str, rank: int = 0, world: int = 1):
    cfg = run_cfg(fields, mb, ga, model=model, data=data, steps=STEPS)
    cfg.eval_every = EVAL_EVERY
    info = DistInfo(rank, rank, world, 1, torch.device("cpu"), "gloo" if world > 1 else None)
    out = train(cfg, info)
    assert out.status == "ok", out.metrics
    return [e["eval_loss"] for e in out.evals], out


def _worker(rank: int, world: int, cases: dict, data: str) -> dict:
    return {name: _evals(*case, data, rank, world)[0] for name, case in cases.items()}


@pytest.fixture(scope="module")
def single(corpus) -> dict:
    return {m: _evals({}, m, 2, 2, corpus)[0] for m in ("tiny", "tiny:untied")}


@pytest.mark.dist
@pytest.mark.parametrize("world, cases", [(2, TWO_RANKS), (4, FOUR_RANKS)], ids=["2ranks", "4ranks"])
def test_every_strategy_evaluates_the_same_held_out_loss(ranks, corpus, single, world, cases):
    per_rank = ranks(_worker, cases, corpus, world_size=world)
    for name, (_, model, _, _) in cases.items():
        ref = torch.tensor(single[model])
        assert len(ref) == STEPS // EVAL_EVERY and ref[-1] < ref[0], "the held-out loss must fall"
        for rank in range(world):
            torch.testing.assert_close(torch.tensor(per_rank[rank][name]), ref, rtol=RTOL, atol=0,
                                       msg=lambda m, n=name, r=rank: f"{n} rank {r}: held-out loss {m}")


@pytest.mark.unit
def test_the_held_out_loss_is_the_mean_cross_entropy_on_the_held_out_batches(corpus):
    """After the run, the model's own logits on the 4 held-out global batches (2 micro-batches each), cross
    entropy averaged over every token here, give the loss the run's last evaluation reported."""
    cfg = run_cfg({}, 2, 2, data=corpus, steps=STEPS)
    cfg.eval_every = STEPS
    from bench.harness.loop import build, make_step, plan_batch, run_steps

    info = DistInfo(0, 0, 1, 1, torch.device("cpu"), None)
    b = build(cfg, info, plan_batch(cfg, info))
    status, _, mine, target = run_steps(cfg, info, b, make_step(cfg, info, b), None, "t")
    assert status == "ok" and len(target.evals) == 1
    with torch.no_grad():
        nll = [F.cross_entropy(b.model(x).flatten(0, 1), y.flatten(), reduction="none")  # logits (B, T, V)
               for x, y in (b.eval_data.batch(k, m) for k in range(cfg.eval_batches) for m in range(2))]
    assert target.evals[0]["eval_loss"] == pytest.approx(float(torch.cat(nll).mean()), rel=1e-5)
    assert mine["eval_loss"] == target.evals[0]["eval_loss"] and mine["evals"] == 1 and mine["eval_time_s"] > 0


def _run(tmp_path, *overrides):
    cmd = [sys.executable, "bench/run.py", "model=tiny", "data=markov", "micro_batch=8", "seq_len=64", "warmup=1",
           "lr=3e-3", f"results_dir={tmp_path}", "log_every=0", "measure_comm=false", "measure_counters=false",
           *overrides]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    steps = [json.loads(line) for line in (tmp_path / "steps" / f"{rows[-1]['run_id']}.jsonl").read_text()
             .splitlines()]
    return res, rows, steps


@pytest.mark.e2e
def test_a_loose_target_is_reached_and_timed(tmp_path):
    """Target: halfway from uniform guessing (ln 256) to the language's floor, on tiny, evaluated every 5 steps,
    at most 200 steps: reached, exit 0; the row's steps, tokens and time to target agree with the per-step log
    (the first evaluation at or below the target, its cumulative training time), training time excludes the
    evaluations, and the run stopped there."""
    floor = markov_floor(256, 64)
    target = (math.log(256) + floor) / 2
    res, rows, steps = _run(tmp_path, "eval_every=5", f"target_loss={target:.4f}", "steps=199",
                            f"tensorboard={tmp_path / 'tb'}")
    assert res.returncode == 0, res.stdout + res.stderr
    row = rows[-1]
    assert row["status"] == "ok" and row["target_loss"] == pytest.approx(target, abs=1e-4)
    evals = [s for s in steps if "eval_loss" in s]
    first = next(s for s in evals if s["eval_loss"] <= row["target_loss"])
    assert all(s["eval_loss"] > row["target_loss"] for s in evals if s["step"] < first["step"])
    assert [s["step"] for s in evals] == list(range(4, first["step"] + 1, 5))
    assert row["steps_to_target"] == first["step"] + 1 == len(steps) < 200, "the run must stop at the target"
    assert row["tokens_to_target"] == row["steps_to_target"] * 8 * 64
    assert row["time_to_target_s"] == pytest.approx(first["train_time_s"]) == pytest.approx(row["train_time_s"])
    assert row["time_to_target_s"] == pytest.approx(sum(s["train_time_s"] - p["train_time_s"] for p, s in
                                                        zip([{"train_time_s": 0}] + steps, steps)))
    assert row["wall_to_target_s"] > row["time_to_target_s"] + 0.5 * row["eval_time_s"]
    assert row["eval_loss"] == first["eval_loss"] and row["evals"] == len(evals)
    assert row["eval_tokens"] == 4 * 8 * 64 and "target_loss" in res.stdout and "reached at step" in res.stdout

    # the same curves, read back by TensorBoard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb" / row["run_id"]))
    acc.Reload()
    held = acc.Scalars("loss/held_out")
    assert [e.step for e in held] == [s["step"] for s in evals]
    assert [e.value for e in held] == pytest.approx([s["eval_loss"] for s in evals], rel=1e-6)
    assert [e.value for e in acc.Scalars("loss/train")] == pytest.approx([s["loss"] for s in steps], rel=1e-6)
    walls = [e.wall_time for e in acc.Scalars("loss/train")]  # relative time = training seconds
    assert walls[-1] - walls[0] == pytest.approx(steps[-1]["train_time_s"] - steps[0]["train_time_s"], abs=1e-3)


@pytest.mark.e2e
def test_a_target_below_the_floor_is_not_reached(tmp_path):
    """No model gets below the language's floor: status not_reached, exit 4, a row with the held-out loss and
    no time to target; max_time_s=1 gives up at the first evaluation past a second of training (500 steps would
    take 10 s or more)."""
    below = markov_floor(256, 64) * 0.5
    res, rows, steps = _run(tmp_path, "eval_every=2", f"target_loss={below:.4f}", "max_time_s=1", "steps=500")
    assert res.returncode == 4, res.stdout + res.stderr
    row = rows[-1]
    assert row["status"] == "not_reached" and row["time_to_target_s"] is None and row["eval_loss"] > below
    assert "not_reached" not in row["error"] and "target_loss" in row["error"]
    evals = [s for s in steps if "eval_loss" in s]
    assert evals[-1]["train_time_s"] >= 1 > max([0] + [e["train_time_s"] for e in evals[:-1]])
    assert evals[-1]["step"] == len(steps) - 1 < 499
    assert row["tokens_per_sec"] > 0 and row["timed_steps"] == len(steps) - 1  # its speed is measured all the same
