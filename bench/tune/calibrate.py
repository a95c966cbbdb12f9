"""Calibrate the step-time model's datasheet rates against the committed GPU rows, and say how far off it still is.

    python -m bench.tune.calibrate                   # refit from results/gpu*, write results/calibration.json
    python -m bench.tune.calibrate check=true        # exit 1 when the committed file is not today's fit

The planner predicts a GPU not at hand from its datasheet (bench/plan/steptime.py with bench/hardware.py's peak in
the strategy's compute dtype and its HBM bandwidth): on the committed H100 rows that is off by a median 54 %, the
model's matmuls and memory-bound operators reaching only part of the datasheet. This fits, per device and compile
mode, the fraction of each that the rows reached, with its leave-one-out error (the fit and its definitions:
bench/tune/efficiency.py). Only single-GPU rows are used (a multi-GPU step also depends on the links, which the
planner takes as ``link_gbps=``). ``results/calibration.json`` holds the efficiencies, the leave-one-out error per
row and its median and maximum; the planner (``python -m bench.plan device=H100 ...``) applies the efficiencies of
its device and states that error in its header and in every row; ``python -m bench.tune.budget`` shows it beside
the uncalibrated line.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from bench.tune.budget import ROOT, load_set, points_of
from bench.tune.efficiency import Point, calibrate
from models.cli import opt, parse

FOLDERS = ("results/gpu",)  # committed single-node GPU rows; add a folder when new GPU rows land
OUT = ROOT / "results" / "calibration.json"


def points(folders=FOLDERS) -> list[Point]:
    """The single-GPU ok rows of ``folders`` with their datasheet predictions."""
    return points_of([r for folder in folders for r in load_set(folder, "row") if r["world_size"] == 1])


@dataclass
class CalibrateArgs:
    check: bool = opt(False, "only compare results/calibration.json with a fresh fit (exit 1 when they differ)")


def main(argv=None) -> int:
    args = parse(CalibrateArgs, argv, "python -m bench.tune.calibrate", __doc__)
    fresh = {"folders": list(FOLDERS), **calibrate(points())}
    text = json.dumps(fresh, indent=1) + "\n"
    if args.check:
        same = OUT.exists() and OUT.read_text() == text
        print(f"{OUT.relative_to(ROOT)} is {'today' if same else 'NOT today'}'s fit of {', '.join(FOLDERS)}")
        return 0 if same else 1
    OUT.write_text(text)
    for device, c in ((k, v) for k, v in fresh.items() if isinstance(v, dict)):
        print(f"{device}: {c['rows']} rows; "
              + "; ".join(f"{m}: matmul {e['matmul']:.0%}, memory {e['memory']:.0%} of the datasheet"
                          for m, e in c["efficiency"].items())
              + f"; leave-one-out error median {c['loo_median_abs_error']:.1%}, max {c['loo_max_abs_error']:.1%} "
              f"(datasheet alone: median {c['datasheet_median_abs_error']:.1%})")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
