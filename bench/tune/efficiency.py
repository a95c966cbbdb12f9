"""The GPU calibration's fit: two efficiencies per device and compile mode, and their leave-one-out error.

Per device and compile mode (``eager`` / ``compiled``: inductor fuses the memory-bound operators):

    measured step = compute_s / e_matmul + memory_s / e_memory      (compute_s, memory_s: the datasheet prediction)

by least squares on the relative error, ``sum_i ((compute_i x + memory_i y) / measured_i - 1)^2`` with
``x = 1 / e_matmul >= 1`` and ``y = 1 / e_memory >= 1`` (an efficiency above the datasheet is not physical: a bound
that binds is fixed at 1 and the other refitted). The error it reports is **leave-one-out**: each row predicted from
the efficiencies fitted without it (its compile mode's other rows; with fewer than two of those, every other row of
the device), so no row grades the fit it helped make. The rows come from bench/tune/budget.py (``points_of``: each
committed row with its datasheet prediction); ``python -m bench.tune.calibrate`` writes the result.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.gate.paired import median


def fit(points: list[tuple[float, float, float]]) -> tuple[float, float]:
    """(e_matmul, e_memory) minimising ``sum ((a x + b y) / m - 1)^2`` over points (a, b, m) with x, y >= 1
    (module docstring); x = 1 / e_matmul, y = 1 / e_memory."""
    def solve(fixed_x: float | None = None, fixed_y: float | None = None) -> tuple[float, float]:
        # normal equations of the scaled rows (a/m, b/m) against 1
        saa = sum((a / m) ** 2 for a, b, m in points)
        sbb = sum((b / m) ** 2 for a, b, m in points)
        sab = sum(a * b / m**2 for a, b, m in points)
        sa1 = sum(a / m for a, b, m in points)
        sb1 = sum(b / m for a, b, m in points)
        if fixed_x is not None:
            return fixed_x, max(1.0, (sb1 - fixed_x * sab) / sbb) if sbb else 1.0
        if fixed_y is not None:
            return max(1.0, (sa1 - fixed_y * sab) / saa) if saa else 1.0, fixed_y
        det = saa * sbb - sab**2
        if abs(det) < 1e-12 * saa * sbb:
            return solve(fixed_y=1.0)
        return (sa1 * sbb - sb1 * sab) / det, (sb1 * saa - sa1 * sab) / det

    def loss(x: float, y: float) -> float:
        return sum(((a * x + b * y) / m - 1) ** 2 for a, b, m in points)

    x, y = solve()
    if x < 1 or y < 1:  # a bound binds: the better of the two constrained fits
        x, y = min((solve(fixed_x=1.0), solve(fixed_y=1.0)), key=lambda xy: loss(*xy))
    return 1 / x, 1 / y


@dataclass
class Point:
    """One committed GPU row, predicted from its datasheet: its device (bench/hardware.py's label), compile mode,
    the prediction's compute and memory-bound seconds, the measured median step and the row's label."""

    device: str
    mode: str
    compute_s: float
    memory_s: float
    measured_s: float
    label: str

    def predicted(self, eff: tuple[float, float]) -> float:
        return self.compute_s / eff[0] + self.memory_s / eff[1]


def loo_efficiencies(pts: list[Point]) -> list[tuple[float, float]]:
    """For each point (all of one device), the efficiencies fitted without it: on its compile mode's other points,
    or on every other point when its mode has fewer than two others."""
    out = []
    for p in pts:
        others = [q for q in pts if q is not p and q.mode == p.mode]
        if len(others) < 2:
            others = [q for q in pts if q is not p]
        out.append(fit([(q.compute_s, q.memory_s, q.measured_s) for q in others]))
    return out


def calibrate(pts: list[Point]) -> dict:
    """Per device: the efficiencies per compile mode from all its rows, each row's leave-one-out prediction error,
    and their median and maximum (module docstring)."""
    out = {}
    for device in sorted({p.device for p in pts}):
        mine = [p for p in pts if p.device == device]
        eff = {m: fit([(p.compute_s, p.memory_s, p.measured_s) for p in mine if p.mode == m])
               for m in sorted({p.mode for p in mine})}
        loo = []
        for p, e in zip(mine, loo_efficiencies(mine)):
            loo.append({"row": p.label, "mode": p.mode, "measured_s": p.measured_s,
                        "predicted_s": p.predicted(e), "error": p.predicted(e) / p.measured_s - 1,
                        "datasheet_error": (p.compute_s + p.memory_s) / p.measured_s - 1})
        errs = [abs(x["error"]) for x in loo]
        out[device] = {"rows": len(mine),
                       "efficiency": {m: {"matmul": round(e[0], 4), "memory": round(e[1], 4)} for m, e in eff.items()},
                       "loo_median_abs_error": round(median(errs), 4), "loo_max_abs_error": round(max(errs), 4),
                       "datasheet_median_abs_error": round(median(abs(x["datasheet_error"]) for x in loo), 4),
                       "loo": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in x.items()} for x in loo]}
    return {"model": "measured = compute_s / e_matmul + memory_s / e_memory", **out}
