"""The wiring from each rank's measurements to the row, against what the test observes itself.

Two real gloo ranks train with DDP through ``train`` (the harness's loop). The test wraps the step function
to take its own clock per step on each rank, to make rank 1 sleep 60 ms after every even step (so the
per-step maximum over ranks differs from either rank's own times), and to hold 256 MiB on rank 1 only
during the timed steps; it also makes the *prediction* of communication deliberately wrong. Then:

- step times: the row's median/p10/p90 are those of the per-step max over ranks of the test's clock, and
  tokens/s is timed steps x global batch tokens / the sum of those maxima -- not rank 0's own times;
- memory: the row's peak is rank 1's (the larger), not rank 0's;
- communication: the measured column equals the bytes DDP must all-reduce, 4 x parameters, counted by the
  test from the model, while the prediction column carries the wrong prediction: the two never mix.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import bench.harness.loop as loop
import bench.plan.annotate as annotate
from bench.harness.dist import DistInfo
from bench.run import predictions
from tests.helpers.training import run_cfg

pytestmark = pytest.mark.dist

SLEEP = 0.06
BALLAST = 256 * 2**20


def _vm_hwm() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _worker(rank: int, world_size: int) -> dict:
    cfg = run_cfg({"dp": "ddp"}, 2, 1, steps=8, seq_len=32)
    cfg.warmup, cfg.log_every, cfg.measure_comm, cfg.measure_overlap = 2, 0, True, True
    info = DistInfo(rank, rank, world_size, 1, torch.device("cpu"), "gloo")
    seen: list[float] = []
    held: list[torch.Tensor] = []
    params: list[int] = []
    real_make_step = loop.make_step

    def make_step(cfg_, info_, b):
        params.append(sum(p.numel() for p in b.model.parameters()))
        step_fn = real_make_step(cfg_, info_, b)

        def observed(step: int):
            t0 = time.perf_counter()
            out = step_fn(step)
            if rank == 1 and step == cfg.warmup:
                held.append(torch.ones(BALLAST // 4))  # touched: resident on rank 1 only
            if rank == 1 and step % 2 == 0:
                time.sleep(SLEEP)
            seen.append(time.perf_counter() - t0)
            return out
        return observed

    loop.make_step = make_step
    annotate.predict_comm = lambda *a, **k: {"all_reduce": 1, "total": 1}  # a wrong prediction, on purpose
    out = loop.train(cfg, info)
    hwm = _vm_hwm()  # the training run's, before the probes that follow it
    out.metrics.update(predictions(cfg, info, loop.plan_batch(cfg, info), out))  # what bench/run.py adds
    return {"metrics": out.metrics, "status": out.status, "seen": seen[cfg.warmup:cfg.warmup + cfg.steps],
            "hwm": hwm, "params": params[0]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import run_ranks

    return run_ranks(_worker, 2, tmp_path_factory.mktemp("wiring"))


def test_step_times_are_the_per_step_max_over_ranks(run):
    m = run[0]["metrics"]
    assert run[0]["status"] == "ok" and m == run[1]["metrics"]  # every rank returns the same row
    worst = [max(a, b) for a, b in zip(run[0]["seen"], run[1]["seen"])]
    own = [run[0]["seen"], run[1]["seen"]]
    # the test's clock sits just inside the harness's: equal within a few ms per step even when a busy
    # neighbour preempts between the two clocks (the distinction below is the 60 ms sleep)
    assert m["step_time_median_s"] == pytest.approx(float(np.median(worst)), abs=5e-3)
    assert m["step_time_p90_s"] == pytest.approx(float(np.percentile(worst, 90)), abs=5e-3)
    assert m["tokens_per_sec"] == pytest.approx(len(worst) * m["global_batch_tokens"] / sum(worst), rel=0.03)
    # and not either rank's own: each rank had fast steps, the max over ranks has none
    assert all(float(np.median(o)) < m["step_time_median_s"] - SLEEP / 3 or
               float(np.percentile(o, 10)) < m["step_time_p10_s"] - SLEEP / 3 for o in own)
    assert m["step_time_p10_s"] > SLEEP  # every combined step contains rank 1's sleep


def test_peak_memory_is_the_worst_rank(run):
    m = run[0]["metrics"]
    per_rank = m["peak_mem_bytes_per_rank"]
    assert per_rank[1] - per_rank[0] > 0.8 * BALLAST
    assert m["peak_mem_bytes"] == max(per_rank) == per_rank[1]
    assert m["peak_mem_bytes"] > run[0]["hwm"] + 0.5 * BALLAST  # above anything rank 0 ever held
    assert per_rank[1] <= run[1]["hwm"]  # a high-water mark since the window began, within the process's


def test_measured_communication_is_observed_not_predicted(run):
    m = run[0]["metrics"]
    assert m["comm_bytes_per_step"] == 4 * run[0]["params"]  # DDP all-reduces every fp32 gradient once
    assert m["comm_breakdown"] == {"all_reduce": 4 * run[0]["params"]}
    assert m["pred_comm_bytes_per_step"] == 1 and m["pred_comm_breakdown"] == {"all_reduce": 1}


def test_overlap_columns_come_from_the_profiled_steps(run):
    """bench/measure/overlap.py's columns are in the row, consistent with each other and with the step."""
    m = run[0]["metrics"]
    assert 0 <= m["exposed_comm_s"] <= m["comm_time_s"] <= m["step_time_p90_s"] + SLEEP
    assert 0 < m["compute_time_s"] and 0 <= m["overlap_pct"] <= 100  # the min over ranks (others: the max)


def test_predicted_step_time_is_the_model_on_the_runs_own_rates(run):
    """The row's prediction is bench/plan/steptime.py on the rates the row records (no spare core here for
    two ranks on this test's CPU budget decides the overlap rule)."""
    import os

    from bench.plan.steptime import Rates, can_overlap, predict_step
    from tests.helpers.training import run_cfg

    m = run[0]["metrics"]
    cfg = run_cfg({"dp": "ddp"}, 2, 1, steps=8, seq_len=32)
    overlap = can_overlap("cpu", 2, 1, len(os.sched_getaffinity(0)))
    p = predict_step(cfg.model, cfg.strategy, 2, 2, 32, 1,
                     Rates(m["peak_flops"], m["mem_bw_bytes_per_s"], m["link_bw_bytes_per_s"],
                           link_bw_by_kind=m["link_bw_by_kind"]), overlap)
    assert m["pred_step_time_s"] == pytest.approx(p["step_s"]) and m["pred_tokens_per_sec"] == pytest.approx(
        p["tokens_per_sec"])
    assert m["pred_step_breakdown"]["compute_s"] == pytest.approx(p["compute_s"])
    assert m["link_bw_bytes_per_s"] > 0 and m["mem_bw_bytes_per_s"] > 0
    assert set(m["link_bw_by_kind"]) == {"all_reduce", "all_gather", "reduce_scatter"}
    assert ("contended" in m["link_bw_by_kind_source"]) == (not overlap)  # probed as the run communicates
