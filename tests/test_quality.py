"""Time to target over seeds (reports/quality.py): the verdict rule on constructed seed sets, whose p-values are
counted here by hand from the ranks, and the report that puts the race first."""

from __future__ import annotations

import math

import pytest

from bench.harness.table import append_row, write_steps
from reports import build, load, quality
from tests.test_reports import row

pytestmark = pytest.mark.unit

FAST = [10.0, 11.0, 12.0, 13.0, 14.0]
SLOW = [15.0, 16.0, 17.0, 18.0, 19.0]


def test_p_values_equal_the_counts_of_rank_sums():
    """5 seeds each. Ranks 1-5 against 6-10: of the C(10, 5) = 252 ways to pick 5 of the 10 ranks only the
    observed one has rank sum 15, so p = 1/252. With the 5th and 6th swapped the rank sum is 16, reached by 2
    subsets ({1,2,3,4,5} and {1,2,3,4,6}): p = 2/252. Identical times: every relabelling ties, p = 1."""
    assert quality.p_sooner(FAST, SLOW) == pytest.approx(1 / 252)
    assert quality.p_sooner([10, 11, 12, 13, 15.0], [14.0, 16, 17, 18, 19]) == pytest.approx(2 / 252)
    assert quality.p_sooner([5.0] * 5, [5.0] * 5) == 1.0
    assert quality.p_sooner(SLOW, FAST) == 1.0  # the other direction: every relabelling is at least as sooner


def test_verdicts_clearly_sooner_clearly_later_indistinguishable_and_censored():
    assert quality.verdict("a", FAST, "b", SLOW)["call"] == "sooner"
    later = quality.verdict("a", SLOW, "b", FAST)
    assert later["call"] == "later" and later["p"] == pytest.approx(1 / 252) and "b reaches the target sooner" in \
        later["text"]
    mixed = quality.verdict("a", [10.0, 12, 14, 16, 18], "b", [11.0, 13, 15, 17, 19])
    assert mixed["call"] == "not distinguishable" and mixed["p"] > 0.2 and "needs < 0.01" in mixed["text"]
    # seeds that never reached the target are later than every seed that did: still a clean separation
    censored = quality.verdict("a", FAST, "b", [15.0, 16.0, 17.0, math.inf, math.inf])
    assert censored["call"] == "sooner" and censored["p"] == pytest.approx(1 / 252)
    # 4 vs 4 cannot reach p < 0.01 (the smallest is 1/70): said, not overclaimed
    assert quality.verdict("a", FAST[:4], "b", SLOW[:4])["call"] == "not distinguishable"
    assert quality.verdict("a", FAST[:1], "b", SLOW)["call"] == "too few seeds"


def _race_rows(d, recipe: str, times, batch: int, tps: float):
    for seed, t in enumerate(times):
        rid = f"{recipe}-{batch}-{seed}"
        r = row(rid, recipe, 1, tps, 1.0, 0.1, status="ok" if math.isfinite(t) else "not_reached")
        r.update(data="markov", target_loss=3.0, seed=seed, global_batch_seqs=batch, micro_batch=batch,
                 tokens_per_sec=tps, config={"lr": 3e-3, "lr_schedule": "constant"},
                 time_to_target_s=t if math.isfinite(t) else None, eval_loss=2.9 if math.isfinite(t) else 3.2,
                 tokens_to_target=int(t * tps) if math.isfinite(t) else None,
                 steps_to_target=int(t) if math.isfinite(t) else None)
        append_row(d, r)
        n = 20
        write_steps(d, rid, [{"step": i, "phase": "timed", "loss": 5.0 - 0.1 * i, "step_time_s": t / n,
                              "tokens": (i + 1) * 64 * batch, "train_time_s": (i + 1) * t / n,
                              **({"eval_loss": 5.1 - 0.1 * i, "wall_s": (i + 1) * t / n * 1.2} if i % 5 == 4 else {})}
                             for i in range(n)])


def test_the_report_opens_with_the_race_its_verdict_and_curves(tmp_path):
    """Two recipes at the same tokens/s, one with half the batch: the recipe label names the batch (it differs),
    the leaderboard puts the sooner recipe first with its seeds reached and the verdict, and the race is the
    report's first section, with a figure of three panels (steps, tokens, seconds) holding both recipes."""
    d = tmp_path / "results"
    _race_rows(d, "ddp", FAST, 4, 1000.0)
    _race_rows(d, "ddp", SLOW[:3] + [math.inf, math.inf], 8, 1000.0)
    rep = build.build(load(d))
    assert len(rep.races) == 1
    race = rep.races[0]
    table = race["table"]
    assert list(table.recipe) == ["ddp (batch 4, mb 4)", "ddp (batch 8, mb 8)"]
    assert list(table.reached) == [5, 3] and table.time_to_target_s.iloc[0] == 12.0
    md = build.to_markdown(rep)
    first = md.split("\n## ")[1]
    assert first.startswith("Time to target: tiny on 1x TestCPU, seq 32, data markov: to held-out loss 3")
    assert "| later, p=0.00397 |" in first.replace("  ", " ") or "later, p=0.00397" in first
    assert "ddp (batch 4, mb 4) reaches the target sooner than ddp (batch 8, mb 8)" in first
    fig = rep.figures[race["figure"]]
    axes = fig.get_axes()
    assert [a.get_xlabel() for a in axes] == ["step (warm-up included)", "tokens trained",
                                             "training seconds (eval excluded)"]
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["ddp (batch 4, mb 4) (5 seeds)",
                                                                       "ddp (batch 8, mb 8) (5 seeds)"]
    html = build.to_html(rep)
    assert html.index("Time to target") < html.index("At a glance")
