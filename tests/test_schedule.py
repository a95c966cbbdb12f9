"""The learning-rate schedule (bench/harness/schedule.py): its factors against values worked out here, and the lr
the harness's own optimizer steps with, step by step."""

from __future__ import annotations

import math

import pytest
import torch

from bench.harness.dist import DistInfo
from bench.harness.loop import build, make_step, plan_batch
from bench.harness.schedule import lr_factor
from tests.helpers.training import run_cfg

pytestmark = pytest.mark.unit


def test_factors_at_the_edges_and_between():
    """10 steps, 2 of warm-up, decaying to 0.1: warm-up 1/2 then 1; the first step after it 1, the last 0.1; step
    5 (3 of 7 decay steps in) 0.1 + 0.9 (1 + cos(3 pi / 7)) / 2 for cosine, 0.1 + 0.9 x 4/7 for linear; steps past
    the run stay at 0.1; constant keeps its warm-up then 1."""
    cos_5 = 0.1 + 0.9 * (1 + math.cos(3 * math.pi / 7)) / 2
    expect = {"cosine": [0.5, 1.0, 1.0, None, None, cos_5, None, None, None, 0.1, 0.1],
              "linear": [0.5, 1.0, 1.0, None, None, 0.1 + 0.9 * 4 / 7, None, None, None, 0.1, 0.1],
              "constant": [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]}
    for schedule, values in expect.items():
        for k, want in enumerate(values):
            if want is not None:
                assert lr_factor(k, 10, schedule, warmup=2, min_ratio=0.1) == pytest.approx(want), (schedule, k)
    decay = [lr_factor(k, 10, "cosine", 2, 0.1) for k in range(2, 10)]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly down after warm-up
    assert lr_factor(0, 10, "cosine", 0, 0.0) == 1.0 and lr_factor(9, 10, "linear", 0, 0.0) == 0.0


def test_the_optimizer_steps_with_the_scheduled_lr():
    """tiny through build and make_step, lr 1e-3, cosine after 2 warm-up steps over the run's 2 + 4 steps: the lr
    the optimizer holds when each step starts is 1e-3 x (1/2, 1, then the cosine from 1 down to 0.1); a constant lr
    makes no scheduler."""
    cfg = run_cfg({}, 2, 1, steps=4)
    cfg.warmup, cfg.lr_schedule, cfg.lr_warmup, cfg.lr_min_ratio = 2, "cosine", 2, 0.1
    info = DistInfo(0, 0, 1, 1, torch.device("cpu"), None)
    b = build(cfg, info, plan_batch(cfg, info))
    step = make_step(cfg, info, b)
    seen = []
    for k in range(6):
        seen.append(b.opt.param_groups[0]["lr"])
        step(k)
    decay = [0.1 + 0.9 * (1 + math.cos(math.pi * i / 3)) / 2 for i in range(4)]
    assert seen == pytest.approx([1e-3 * f for f in (0.5, 1.0, *decay)])
    assert build(run_cfg({}, 2, 1, steps=2), info, plan_batch(run_cfg({}, 2, 1, steps=2), info)).sched is None
