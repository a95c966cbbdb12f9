"""The CI benchmark matrix: small fixed CPU runs. CI gates with it through the same-run A/B gate
(``python -m bench.gate --ab``, bench/gate/ab.py), which runs these entries with two revisions'
code alternately. This script runs them with this tree's code alone:

    python bench/gate/ci_suite.py --out ci_out                     # run the matrix (3 repeats, round-robin)
    python bench/gate/ci_suite.py --out ci_out --gate              # ... then gate against results/baselines/ci-cpu
    python bench/gate/ci_suite.py --out ci_out --update-baseline   # run and accept the result as that baseline
    python bench/gate/ci_suite.py --list

``--gate`` compares with numbers recorded earlier (bench/gate/thresholds.yaml): meaningful only against a
baseline recorded on this same host; against another machine's it stops and names the fields that
differ (device_name, ...).

Entries (tiny model, seq 128, micro-batch 4, 30 timed steps after 5 warm-up, fp32): single, ddp, fsdp,
fsdp+ac on 2 gloo ranks, per-block compile on one process; each repeated ``--repeats`` times (default 3)
in round-robin order, so slow drift of a shared machine hits every entry alike. Every run probes the
peak FLOP/s afresh (N00BGPT_PEAK_CACHE=0), which makes MFU comparable across machines and moments.
The baseline lives in results/baselines/ci-cpu/.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.gate import regress  # noqa: E402
from bench.launch import suite  # noqa: E402

BASELINE = suite.ROOT / "results" / "baselines" / "ci-cpu"
COMMON = ["seq_len=128", "micro_batch=4", "steps=30", "warmup=5", "log_every=0", "device=cpu"]
MATRIX = [
    ("single", "tiny", "single", [], 0),
    ("ddp", "tiny", "ddp", [], 2),
    ("fsdp", "tiny", "fsdp", [], 2),
    ("fsdp-ac", "tiny", "fsdp_ac", [], 2),
    ("compile", "tiny", "compile", [], 0),
]
ENV = {"N00BGPT_PEAK_CACHE": "0", "OMP_NUM_THREADS": "1"}


def plan(results: Path, repeats: int, extra: list[str] = ()) -> list[tuple[str, list[str]]]:
    return [(f"{e[0]}#{r}", suite.command((e[0], e[1], e[2], [*e[3], *extra], e[4]), results, COMMON, "ci_suite"))
            for r in range(repeats) for e in MATRIX]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="ci_out")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gate", action="store_true", help=f"gate the results against {BASELINE}")
    ap.add_argument("--update-baseline", action="store_true", help=f"replace {BASELINE} with these results")
    ap.add_argument("--thresholds", default=str(suite.ROOT / "bench" / "thresholds.yaml"),
                    help="thresholds for --gate (default bench/gate/thresholds.yaml)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--budget", type=int, default=900)
    ap.add_argument("--extra", nargs="*", default=[], help="overrides added to every entry (e.g. debug_delay_s=0.01)")
    args = ap.parse_args(argv)
    results = Path(args.out).resolve() / "results"
    runs = plan(results, args.repeats, args.extra)
    if args.list:
        for _, cmd in runs:
            print(shlex.join(cmd))
        return 0
    failed = suite.run_plan(runs, timeout_s=300, budget_s=args.budget, env=ENV, quiet=True)
    if args.update_baseline:
        if failed:
            print("ci_suite: not updating the baseline: some entries failed", file=sys.stderr)
            return 1
        shutil.rmtree(BASELINE, ignore_errors=True)
        shutil.copytree(results, BASELINE, ignore=shutil.ignore_patterns(".claims"))
        print(f"ci_suite: baseline replaced: {BASELINE}")
    if args.gate:
        return regress.main(["--baseline", str(BASELINE), "--candidate", str(results), "--thresholds",
                             args.thresholds])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
