"""The regression gate: compare a candidate result set with a baseline, setup by setup.

    python -m bench.gate --baseline results/baselines/ci-cpu --candidate ci_out/results
    python -m bench.gate --baseline B --candidate C --thresholds bench/gate/thresholds.yaml

Setups are matched on SETUP_KEYS (model, strategy, world size, device, dtype, batch shape); each
metric compares medians over a setup's ok runs (so repeats damp the noise) against the thresholds
(bench/gate/thresholds.yaml, documented there and in the README):

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

import argparse
import math
import sys
from pathlib import Path

import pandas as pd
import yaml

from reports.load import ResultsError, load

SETUP_KEYS = ["model", "strategy", "world_size", "device_name", "dtype", "seq_len", "micro_batch", "grad_accum"]
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


def _median(rows: pd.DataFrame, col: str) -> float:
    vals = pd.to_numeric(rows[col], errors="coerce").dropna()
    return float(vals.median()) if len(vals) else math.nan


def gate(baseline: pd.DataFrame, candidate: pd.DataFrame, thresholds: dict) -> pd.DataFrame:
    """One row per (setup, metric): baseline, candidate, delta_pct, threshold, verdict (PASS/FAIL/SKIP)."""
    out = []
    cand_groups = {k: g for k, g in candidate.groupby(SETUP_KEYS, dropna=False)}
    matched = 0
    for key, base in baseline.groupby(SETUP_KEYS, dropna=False):
        setup = f"{key[0]} {key[1]} ws={key[2]} {key[4]} mb={key[6]} seq={key[5]}"
        cand = cand_groups.get(key)
        base_ok = base[base.status == "ok"]
        if cand is None:
            if len(base_ok) and thresholds.get("status", {}).get("ok_must_stay_ok", True):
                out.append({"setup": setup, "metric": "status", "baseline": "ok", "candidate": "missing",
                            "delta_pct": math.nan, "threshold": "present and ok", "verdict": "FAIL"})
            continue
        matched += 1
        cand_ok = cand[cand.status == "ok"]
        if "status" in thresholds and thresholds["status"].get("ok_must_stay_ok", True) and len(base_ok):
            failed = not len(cand_ok)
            out.append({"setup": setup, "metric": "status", "baseline": f"{len(base_ok)}/{len(base)} ok",
                        "candidate": f"{len(cand_ok)}/{len(cand)} ok", "delta_pct": math.nan,
                        "threshold": "ok stays ok", "verdict": "FAIL" if failed else "PASS"})
        if not len(base_ok) or not len(cand_ok):
            continue
        same_machine = (set(base_ok.hostname) == set(cand_ok.hostname) and len(set(base_ok.hostname)) == 1)
        for metric, rule in thresholds.items():
            if metric == "status":
                continue
            b, c = _median(base_ok, metric), _median(cand_ok, metric)
            delta = (c - b) / abs(b) * 100 if b else math.nan
            if math.isnan(b) or math.isnan(c):
                verdict, threshold = "SKIP", "no value"
            elif metric in ("tokens_per_sec", "mfu"):
                threshold = f"drop <= {rule['max_drop_pct']}%"
                if metric == "tokens_per_sec" and rule.get("same_machine_only", True) and not same_machine:
                    verdict, threshold = "SKIP", "different machines"
                else:
                    verdict = "FAIL" if -delta > rule["max_drop_pct"] else "PASS"
            elif metric == "peak_mem_bytes":
                threshold = f"rise <= {rule['max_rise_pct']}%"
                verdict = "FAIL" if delta > rule["max_rise_pct"] else "PASS"
            else:  # loss
                threshold = f"|rel diff| <= {rule['max_rel_diff']:g}"
                verdict = "FAIL" if abs(delta) / 100 > rule["max_rel_diff"] else "PASS"
            out.append({"setup": setup, "metric": metric, "baseline": b, "candidate": c, "delta_pct": delta,
                        "threshold": threshold, "verdict": verdict})
    if not matched:
        raise GateInputError("no setup of the baseline appears in the candidate (matched on "
                             + ", ".join(SETUP_KEYS) + "); " + nearest_setups(baseline, candidate))
    return pd.DataFrame(out)


def nearest_setups(baseline: pd.DataFrame, candidate: pd.DataFrame, limit: int = 3) -> str:
    """For the first baseline setups, the candidate setup sharing the most SETUP_KEYS and the fields that differ."""
    cands = [dict(zip(SETUP_KEYS, k)) for k in candidate.groupby(SETUP_KEYS, dropna=False).groups]
    notes = []
    for key in list(baseline.groupby(SETUP_KEYS, dropna=False).groups)[:limit]:
        b = dict(zip(SETUP_KEYS, key))
        best = max(cands, key=lambda c: sum(str(c[k]) == str(b[k]) for k in SETUP_KEYS))
        diff = ", ".join(f"{k} {b[k]!r} vs {best[k]!r}" for k in SETUP_KEYS if str(best[k]) != str(b[k]))
        notes.append(f"baseline {b['model']} {b['strategy']} ws={b['world_size']}: nearest candidate differs in {diff}")
    return "; ".join(notes) + (" (raw numbers from another machine do not compare: use --ab)"
                               if any("device_name" in n for n in notes) else "")


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def render(table: pd.DataFrame) -> str:
    cols = ["setup", "metric", "baseline", "candidate", "delta", "threshold", "verdict"]
    rows = [[r.setup, r.metric, _fmt(r.baseline), _fmt(r.candidate),
             "-" if r.delta_pct != r.delta_pct else f"{r.delta_pct:+.2f}%", r.threshold, r.verdict]
            for r in table.itertuples()]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join([line, "-" * len(line), *body])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gate", description=__doc__.splitlines()[0])
    ap.add_argument("--ab", nargs="?", const="", metavar="REV",
                    help="same-run A/B gate against the code of REV (default: results/baselines/BASE_REV), "
                         "see bench/gate/ab.py")
    ap.add_argument("--baseline", nargs="+", help="baseline result files/folders/globs")
    ap.add_argument("--candidate", nargs="+", help="candidate result files/folders/globs")
    ap.add_argument("--thresholds", help=f"YAML thresholds (default {DEFAULT_THRESHOLDS}; "
                                         "with --ab bench/gate/thresholds_ab.yaml)")
    ap.add_argument("--rounds", type=int, help="--ab: rounds (pairs per entry; default 2 taking turns, 4 run by run)")
    ap.add_argument("--mode", default="auto", help="--ab: turns (step by step), runs (run after run), or auto "
                                                    "(turns when the baseline revision can)")
    ap.add_argument("--out", default="ab_out", help="--ab: folder for both sides' rows and ab.json")
    ap.add_argument("--slow-pct", type=float, default=0.0,
                    help="--ab: slow the candidate by exactly this percentage (the gate study)")
    ap.add_argument("--entries", nargs="*", help="--ab: only these CI matrix entries")
    args = ap.parse_args(argv)
    if args.ab is not None:
        from bench.gate import ab as ab_gate

        return ab_gate.main(args.ab or None, args.out, args.rounds, args.thresholds, args.slow_pct, args.entries,
                            args.mode)
    if not (args.baseline and args.candidate):
        ap.error("--baseline and --candidate are required (or --ab)")
    try:
        thresholds = load_thresholds(args.thresholds)
        table = gate(_load(args.baseline, "baseline"), _load(args.candidate, "candidate"), thresholds)
    except GateInputError as exc:
        print(f"regress: error: {exc}", file=sys.stderr)
        return 2
    print(render(table))
    fails = int((table.verdict == "FAIL").sum())
    print(f"\nregress: {fails} regression(s) in {len(table)} checks" if fails else
          f"\nregress: all {len(table)} checks hold ({int((table.verdict == 'SKIP').sum())} skipped)")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
