"""Measure the regression gate's false-alarm and detection rates on this machine.

    python -m bench.gate.noise rounds=12 out=noise_out          # ~15 min on 2 cores; nothing else may run

Alternates, round by round, the unchanged CI suite (bench/gate/ci_suite.py entries) with the same suite
slowed by 10 % (``debug_delay_s`` = 10 % of each entry's median step time in the first round).
Then, with runs grouped in threes as the CI gate uses them (median of 3 repeats per side):
- run-to-run noise: coefficient of variation of tokens/s, MFU and peak memory per entry;
- false-alarm rate: share of (baseline group, candidate group) pairs of *unchanged* runs that the
  gate (bench/gate/regress.py, default thresholds) fails;
- detection rate: share of (unchanged baseline group, slowed candidate group) pairs in which the
  gate fails the slowed entry's throughput/MFU check.
Writes noise_out/noise.md and prints it.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pandas as pd  # noqa: E402

from bench.gate import (
    ci_suite,  # noqa: E402
    regress,  # noqa: E402
)
from bench.launch import suite  # noqa: E402
from models.cli import opt, parse  # noqa: E402
from reports.build import markdown_table  # noqa: E402
from reports.load import load  # noqa: E402


def run_round(out: Path, delays: dict[str, float] | None) -> None:
    results = out / ("slowed" if delays else "unchanged")
    plan = []
    for e in ci_suite.MATRIX:
        extra = [f"debug_delay_s={delays[e.label]:.6f}"] if delays else []
        plan.append((e.label, suite.command(e._replace(overrides=[*e.overrides, *extra]), results, ci_suite.COMMON,
                                            "ci_suite")))
    suite.run_plan(plan, timeout_s=300, budget_s=3600, env=ci_suite.ENV, quiet=True)


def groups(df: pd.DataFrame, size: int) -> list[pd.DataFrame]:
    df = df.sort_values("timestamp").assign(entry=lambda d: d.tag)
    df["rank_in_entry"] = df.groupby("entry").cumcount()
    n = int(df.rank_in_entry.max() + 1) // size
    return [df[(df.rank_in_entry >= g * size) & (df.rank_in_entry < (g + 1) * size)] for g in range(n)]


def analyse(out: Path, size: int = 3, thresholds_path: str | None = None) -> str:
    thresholds = regress.load_thresholds(thresholds_path)
    same = load(out / "unchanged")
    slow = load(out / "slowed")
    lines = ["# Regression-gate noise on this machine", ""]
    cells = []
    g_same, g_slow = groups(same, size), groups(slow, size)
    for tag, d in same.groupby("tag"):
        cv = {c: d[c].std() / d[c].mean() * 100 for c in ("tokens_per_sec", "mfu", "peak_mem_bytes")}
        meds = [g[g.tag == tag].mfu.median() for g in g_same]
        drop = max((a - b) / a * 100 for a, b in itertools.permutations(meds, 2)) if len(meds) > 1 else float("nan")
        cells.append([tag, len(d), f"{cv['tokens_per_sec']:.1f}%", f"{cv['mfu']:.1f}%",
                      f"{cv['peak_mem_bytes']:.2f}%", f"{drop:.1f}%"])
    lines.append(markdown_table(["entry", "runs", "tokens/s CV", "MFU CV", "peak mem CV",
                                 "max MFU drop between groups of 3"], cells))
    false_alarms, pairs = 0, 0
    for b, c in itertools.permutations(range(len(g_same)), 2):
        table = regress.gate(g_same[b], g_same[c], thresholds)
        pairs += 1
        false_alarms += bool((table.verdict == "FAIL").any())
    detected, det_pairs = 0, 0
    for b, c in itertools.product(range(len(g_same)), range(len(g_slow))):
        table = regress.gate(g_same[b], g_slow[c], thresholds)
        perf = table[table.metric.isin(["mfu", "tokens_per_sec"])]
        for _, setup in perf.groupby("setup"):
            det_pairs += 1
            detected += bool((setup.verdict == "FAIL").any())
    lines += ["", f"False alarms (unchanged vs unchanged, whole gate): {false_alarms}/{pairs} group pairs "
              f"= {false_alarms / max(pairs, 1):.0%}",
              f"Detection of a 10% slowdown (per entry, MFU or tokens/s check): {detected}/{det_pairs} "
              f"= {detected / max(det_pairs, 1):.0%}",
              f"Thresholds: {thresholds}", ""]
    return "\n".join(lines)


@dataclass
class NoiseArgs:
    rounds: int = opt(12, "rounds of (unchanged, slowed) runs")
    out: str = opt("noise_out", "output folder")
    analyse_only: bool = opt(False, "re-analyse the runs already in out")
    thresholds: str = opt("", "thresholds YAML to evaluate (default bench/gate/thresholds.yaml)")

def main(argv=None) -> int:
    args = parse(NoiseArgs, argv, "python -m bench.gate.noise", __doc__)
    out = Path(args.out).resolve()
    if not args.analyse_only:
        run_round(out, None)
        first = load(out / "unchanged")
        delays = {t.removeprefix("ci_suite:"): 0.10 * g.step_time_median_s.median() for t, g in first.groupby("tag")}
        print(f"[noise] 10% delays per entry (s): {delays}", flush=True)
        for r in range(args.rounds):
            run_round(out, delays)
            if r + 1 < args.rounds:
                run_round(out, None)
    text = analyse(out, thresholds_path=args.thresholds or None)
    (out / "noise.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
