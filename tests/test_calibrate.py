"""The GPU calibration (bench/tune/efficiency.py, calibrate.py) and the planner's use of it (bench/plan/calibration.py).

The fit is checked on constructed points whose efficiencies are known, the leave-one-out rule against a fit done
here without the row, the committed file against a fresh fit of the committed rows, and the planner's rates
against the datasheet times the committed efficiencies.
"""

from __future__ import annotations

import json
import random

import pytest

from bench.plan.__main__ import PlanArgs, plan, render
from bench.plan.calibration import PATH
from bench.tune.calibrate import FOLDERS, points
from bench.tune.efficiency import Point, calibrate, fit, loo_efficiencies
from strategies.config import StrategyConfig

pytestmark = pytest.mark.unit


def test_the_fit_recovers_known_efficiencies():
    rng = random.Random(0)
    pts = [(a, b, a / 0.6 + b / 0.3) for a, b in ((rng.uniform(0.1, 1), rng.uniform(0.1, 1)) for _ in range(6))]
    mm, mem = fit(pts)
    assert mm == pytest.approx(0.6, rel=1e-9) and mem == pytest.approx(0.3, rel=1e-9)


def test_an_efficiency_above_the_datasheet_is_held_at_one():
    # the memory-bound part measured faster than the datasheet allows: efficiency 1, matmul refitted alone
    pts = [(1.0, 1.0, 1.0 / 0.5 + 1.0 / 2.0), (2.0, 0.5, 2.0 / 0.5 + 0.5 / 2.0)]
    mm, mem = fit(pts)
    assert mem == 1.0 and 0 < mm <= 1
    # with y = 1 fixed the least-squares x solves sum (a/m)(a x + b - m)/m = 0, worked out here
    x = sum(a / m * (m - b) / m for a, b, m in pts) / sum((a / m) ** 2 for a, b, m in pts)
    assert mm == pytest.approx(1 / x)


def test_leave_one_out_never_uses_the_row_it_predicts():
    p = [Point("H100 SXM5", "eager", a, b, a / 0.5 + b / 0.25, f"r{i}") for i, (a, b) in
         enumerate(((1.0, 0.2), (0.5, 0.4), (0.8, 0.1)))]
    p.append(Point("H100 SXM5", "eager", 1.0, 1.0, 100.0, "outlier"))  # a row far off the others' efficiencies
    loo = loo_efficiencies(p)
    assert loo[3] == pytest.approx((0.5, 0.25), rel=1e-9)  # from the three others alone: their exact efficiencies
    assert loo[0] == pytest.approx(fit([(x.compute_s, x.memory_s, x.measured_s) for x in p[1:]]))
    lone = loo_efficiencies([*p, Point("H100 SXM5", "compiled", 1.0, 1.0, 2.0, "alone")])
    assert lone[4] == pytest.approx(fit([(x.compute_s, x.memory_s, x.measured_s) for x in p]))  # its mode: none


def test_the_committed_calibration_is_the_committed_rows_fit():
    """results/calibration.json is what ``python -m bench.tune.calibrate`` computes from results/gpu today, and it
    beats the datasheet alone in leave-one-out error."""
    fresh = {"folders": list(FOLDERS), **calibrate(points())}
    assert json.loads(PATH.read_text()) == json.loads(json.dumps(fresh))
    h100 = fresh["H100 SXM5"]
    assert h100["rows"] >= 10 and h100["loo_median_abs_error"] < h100["datasheet_median_abs_error"]
    assert all(0 < e <= 1 for m in h100["efficiency"].values() for e in m.values())


def test_the_planner_applies_the_calibration_and_says_its_error():
    cal = json.loads(PATH.read_text())["H100 SXM5"]
    base = dict(model="gpt2-small", world_size=1, device="H100", micro_batch=16)
    on = {r["strategy"]: r for r in plan(PlanArgs(**base))}
    off = {r["strategy"]: r for r in plan(PlanArgs(**base, calibrated=False))}
    for name in ("single+bf16", "single"):
        b_on, b_off = on[name]["pred_step_breakdown"], off[name]["pred_step_breakdown"]
        assert b_on["compute_s"] == pytest.approx(b_off["compute_s"] / cal["efficiency"]["eager"]["matmul"])
        assert b_on["memory_s"] == pytest.approx(b_off["memory_s"] / cal["efficiency"]["eager"]["memory"])
        assert on[name]["pred_step_error"]["loo_median_abs"] == cal["loo_median_abs_error"]
        assert off[name]["pred_step_error"] is None
    # a compiled strategy (the tuner's and budget's; the planner does not try compile) gets the compiled mode's
    compiled, plain = PlanArgs(**base).rates(StrategyConfig(amp="bf16", compile=True)), PlanArgs(
        **base, calibrated=False).rates(StrategyConfig(amp="bf16", compile=True))
    assert compiled.matmul_flops == pytest.approx(plain.matmul_flops * cal["efficiency"]["compiled"]["matmul"])
    assert compiled.mem_bw == pytest.approx(plain.mem_bw * cal["efficiency"]["compiled"]["memory"])
    text = render(list(on.values()), 80)
    assert f"leave-one-out error median {cal['loo_median_abs_error']:.0%}" in text
    a100 = render(plan(PlanArgs(**dict(base, device="A100"))), 80)
    assert "step times for A100: datasheet rates, not calibrated" in a100
