"""The GPU calibration the planner applies: results/calibration.json, written by ``python -m bench.tune.calibrate``.

Per device (bench/hardware.py's label) and compile mode, the fraction of the datasheet's matmul peak and memory
bandwidth the committed rows reached, and the leave-one-out error of step times predicted with them (the fit and
its definitions: bench/tune/efficiency.py). A device without an entry is predicted from its datasheet as is.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

PATH = Path(__file__).resolve().parents[2] / "results" / "calibration.json"


@cache
def _table() -> dict:
    return json.loads(PATH.read_text()) if PATH.exists() else {}


def device_calibration(label: str) -> dict | None:
    """The entry for the device ``label`` (efficiency by mode, leave-one-out errors, rows), or None."""
    entry = _table().get(label)
    return entry if isinstance(entry, dict) else None


def efficiencies(label: str, compiled: bool) -> tuple[float, float] | None:
    """(matmul, memory) efficiency of ``label`` for a compiled or eager strategy; None when not calibrated (or that
    mode has no rows: then the other mode's, which is closer than the datasheet)."""
    entry = device_calibration(label)
    if entry is None:
        return None
    eff = entry["efficiency"].get("compiled" if compiled else "eager") or next(iter(entry["efficiency"].values()))
    return eff["matmul"], eff["memory"]


def error_note(label: str) -> str:
    """One line for the plan's header: how far GPU step times predicted for ``label`` are expected to be off."""
    entry = device_calibration(label)
    if entry is None:
        others = {k: v for k, v in _table().items() if isinstance(v, dict)}
        seen = "; ".join(f"{k}: datasheet alone off by a median {v['datasheet_median_abs_error']:.0%}"
                         for k, v in others.items())
        return (f"step times for {label}: datasheet rates, not calibrated (no committed {label} rows"
                + (f"; {seen}" if seen else "") + ")")
    return (f"step times for {label}: datasheet rates x efficiencies fitted on {entry['rows']} committed {label} rows "
            f"(results/calibration.json); leave-one-out error median {entry['loo_median_abs_error']:.0%}, max "
            f"{entry['loo_max_abs_error']:.0%} (the datasheet alone: median "
            f"{entry['datasheet_median_abs_error']:.0%}); links as given (link_gbps=)")
