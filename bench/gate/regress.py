"""The regression gate: compare a candidate result set with a baseline, setup by setup.

    python -m bench.gate ab=true                       # same-run A/B against BASE_REV (bench/gate/ab.py; CI)
    python -m bench.gate baseline=results/baselines/ci-cpu candidate=ci_out/results
    python -m bench.gate baseline=B candidate=C thresholds=bench/gate/thresholds.yaml

This is the reports' comparison (reports.compare: setups and variants matched as the report tables group
them, medians over each side's ok runs, so repeats damp the noise) plus thresholds
(bench/gate/thresholds.yaml, documented there and in docs/gate.md):

- ``tokens_per_sec`` may drop at most ``max_drop_pct`` -- only when both sides ran on the same
  hostname and device (raw throughput is not comparable between machines; else verdict SKIP);
- ``mfu`` may drop at most ``max_drop_pct`` (achieved FLOP/s over a peak measured in the same run);
- ``peak_mem_bytes`` may rise at most ``max_rise_pct``;
- ``loss`` must match within ``max_rel_diff`` (relative);
- ``status``: every setup with an ok run in the baseline has an ok run in the candidate.

Exit codes: 0 every check holds; 1 a regression; 2 unusable input (missing/malformed file, unknown
threshold key, no setup in common) -- never a silent pass.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd
import yaml

from reports.aggregate import format_value
from reports.compare import compare
from reports.load import ResultsError, load
from reports.record import SETUP_KEYS, VARIANT_KEYS

DEFAULT_THRESHOLDS = Path(__file__).with_name("thresholds.yaml")
_KNOWN = {
    "tokens_per_sec": {"max_drop_pct", "same_machine_only"},
    "mfu": {"max_drop_pct"},
    "peak_mem_bytes": {"max_rise_pct"},
    "loss": {"max_rel_diff"},
    "status": {"ok_must_stay_ok"},
}


class GateInputError(ValueError):
    """Unusable gate input: exit code 2."""


def load_thresholds(path: str | Path | None) -> dict:
    path = Path(path) if path else DEFAULT_THRESHOLDS
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise GateInputError(f"{path}: cannot read thresholds: {exc}") from None
    if not isinstance(data, dict):
        raise GateInputError(f"{path}: expected a mapping of metric -> settings")
    for metric, settings in data.items():
        if metric not in _KNOWN:
            raise GateInputError(f"{path}: unknown metric {metric!r}; valid: {', '.join(_KNOWN)}")
        bad = set(settings or {}) - _KNOWN[metric]
        if bad:
            raise GateInputError(f"{path}: {metric}: unknown keys {sorted(bad)}; valid: {sorted(_KNOWN[metric])}")
    return data


def _load(paths, side: str) -> pd.DataFrame:
    try:
        return load(paths)
    except ResultsError as exc:
        raise GateInputError(f"{side}: {exc}") from None


def gate(baseline: pd.DataFrame, candidate: pd.DataFrame, thresholds: dict) -> pd.DataFrame:
    """The reports' comparison (reports.compare) plus thresholds: one row per (setup, metric) with baseline,
    candidate, delta_pct, threshold and verdict (PASS/FAIL/SKIP)."""
    try:
        cmp = compare(baseline, candidate, keep_unmatched=True)
    except ResultsError:
        raise GateInputError("no setup of the baseline appears in the candidate (matched on "
                             + ", ".join(SETUP_KEYS + VARIANT_KEYS) + "); " + nearest_setups(baseline, candidate)
                             ) from None
    must_stay_ok = thresholds.get("status", {}).get("ok_must_stay_ok", True)
    out = []
    for r in cmp.itertuples():
        model, device, ws, seq, mb, ga = r.key
        setup = f"{model} {r.strategy} ws={ws} mb={mb} seq={seq}"

        def add(metric, b, c, delta, threshold, verdict, setup=setup):
            out.append({"setup": setup, "metric": metric, "baseline": b, "candidate": c, "delta_pct": delta,
                        "threshold": threshold, "verdict": verdict})

        if not r.matched:
            if r.n_ok_baseline and must_stay_ok:
                add("status", "ok", "missing", math.nan, "present and ok", "FAIL")
            continue
        if "status" in thresholds and must_stay_ok and r.n_ok_baseline:
            add("status", f"{r.n_ok_baseline}/{r.n_runs_baseline} ok", f"{r.n_ok_candidate}/{r.n_runs_candidate} ok",
                math.nan, "ok stays ok", "FAIL" if not r.n_ok_candidate else "PASS")
        if not r.n_ok_baseline or not r.n_ok_candidate:
            continue
        same_machine = r.hosts_baseline == r.hosts_candidate and "," not in r.hosts_baseline
        for metric, rule in thresholds.items():
            if metric == "status":
                continue
            b, c = getattr(r, f"{metric}_baseline"), getattr(r, f"{metric}_candidate")
            delta = getattr(r, f"{metric}_delta_pct") if b else math.nan
            if b != b or c != c:
                add(metric, b, c, delta, "no value", "SKIP")
            elif metric in ("tokens_per_sec", "mfu"):
                if metric == "tokens_per_sec" and rule.get("same_machine_only", True) and not same_machine:
                    add(metric, b, c, delta, "different machines", "SKIP")
                else:
                    add(metric, b, c, delta, f"drop <= {rule['max_drop_pct']}%",
                        "FAIL" if -delta > rule["max_drop_pct"] else "PASS")
            elif metric == "peak_mem_bytes":
                add(metric, b, c, delta, f"rise <= {rule['max_rise_pct']}%",
                    "FAIL" if delta > rule["max_rise_pct"] else "PASS")
            else:  # loss
                add(metric, b, c, delta, f"|rel diff| <= {rule['max_rel_diff']:g}",
                    "FAIL" if abs(delta) / 100 > rule["max_rel_diff"] else "PASS")
    return pd.DataFrame(out)


def nearest_setups(baseline: pd.DataFrame, candidate: pd.DataFrame, limit: int = 3) -> str:
    """For the first baseline setups, the candidate setup sharing the most key fields and the fields that differ."""
    keys = SETUP_KEYS + VARIANT_KEYS
    cands = [dict(zip(keys, k)) for k in candidate.groupby(keys, dropna=False).groups]
    notes = []
    for key in list(baseline.groupby(keys, dropna=False).groups)[:limit]:
        b = dict(zip(keys, key))
        best = max(cands, key=lambda c: sum(str(c[k]) == str(b[k]) for k in keys))
        diff = ", ".join(f"{k} {b[k]!r} vs {best[k]!r}" for k in keys if str(best[k]) != str(b[k]))
        notes.append(f"baseline {b['model']} {b['strategy']} ws={b['world_size']}: nearest candidate differs in {diff}")
    return "; ".join(notes) + (" (raw numbers from another machine do not compare: use ab=true)"
                               if any("device_name" in n for n in notes) else "")


def render(table: pd.DataFrame) -> str:
    """The verdict table as text (pandas), values formatted as the reports format them."""
    shown = table.assign(
        baseline=[format_value(m, v) if isinstance(v, float) else str(v) for m, v in zip(table.metric, table.baseline)],
        candidate=[format_value(m, v) if isinstance(v, float) else str(v)
                   for m, v in zip(table.metric, table.candidate)],
        delta=["-" if d != d else f"{d:+.2f}%" for d in table.delta_pct])
    return shown[["setup", "metric", "baseline", "candidate", "delta", "threshold", "verdict"]].to_string(index=False)


def check(baseline, candidate, thresholds: str | None = None) -> int:
    """Gate committed numbers: print the verdict table; 0 every check holds, 1 a regression, 2 unusable input."""
    try:
        table = gate(_load(baseline, "baseline"), _load(candidate, "candidate"), load_thresholds(thresholds or None))
    except GateInputError as exc:
        print(f"regress: error: {exc}", file=sys.stderr)
        return 2
    print(render(table))
    fails = int((table.verdict == "FAIL").sum())
    print(f"\nregress: {fails} regression(s) in {len(table)} checks" if fails else
          f"\nregress: all {len(table)} checks hold ({int((table.verdict == 'SKIP').sum())} skipped)")
    return 1 if fails else 0
