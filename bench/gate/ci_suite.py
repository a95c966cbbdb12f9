"""The CI benchmark matrix: small fixed CPU runs. CI gates with it through the same-run A/B gate
(``python -m bench.gate ab=true``, bench/gate/ab.py), which runs these entries with two revisions'
code alternately. This script runs them with this tree's code alone:

    python -m bench.gate.ci_suite out=ci_out                        # run the matrix (3 repeats, round-robin)
    python -m bench.gate.ci_suite out=ci_out gate=true              # ... then gate against results/baselines/ci-cpu
    python -m bench.gate.ci_suite out=ci_out update_baseline=true   # run and accept the result as that baseline
    python -m bench.gate.ci_suite dry_run=true

``gate=true`` compares with numbers recorded earlier (bench/gate/thresholds.yaml): meaningful only against a
baseline recorded on this same host; against another machine's it stops and names the fields that
differ (device_name, ...).

Entries (tiny model, seq 128, micro-batch 4, 30 timed steps after 5 warm-up, fp32): single, ddp, fsdp,
fsdp+ac on 2 gloo ranks, per-block compile on one process; each repeated ``--repeats`` times (default 3)
in round-robin order, so slow drift of a shared machine hits every entry alike. Every run probes the
peak FLOP/s afresh (N00BGPT_PEAK_CACHE=0), which makes MFU comparable across machines and moments.
The baseline lives in results/baselines/ci-cpu/.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.gate import regress  # noqa: E402
from bench.launch import suite  # noqa: E402
from bench.launch.suite import Entry  # noqa: E402
from models.cli import fail, opt, parse  # noqa: E402

BASELINE = suite.ROOT / "results" / "baselines" / "ci-cpu"
COMMON = ["seq_len=128", "micro_batch=4", "steps=30", "warmup=5", "log_every=0", "device=cpu"]
MATRIX = [
    Entry("single", "tiny", "single", [], 0),
    Entry("ddp", "tiny", "ddp", [], 2),
    Entry("fsdp", "tiny", "fsdp", [], 2),
    Entry("fsdp-ac", "tiny", "fsdp_ac", [], 2),
    Entry("compile", "tiny", "compile", [], 0),
]
ENV = {"N00BGPT_PEAK_CACHE": "0", "OMP_NUM_THREADS": "1"}


def plan(results: Path, repeats: int, extra: list[str] = ()) -> list[tuple[str, list[str]]]:
    return [(f"{e.label}#{r}", suite.command(e._replace(overrides=[*e.overrides, *extra]), results, COMMON, "ci_suite"))
            for r in range(repeats) for e in MATRIX]


@dataclass
class SuiteArgs:
    out: str = opt("ci_out", "output folder (results/ under it)")
    repeats: int = opt(3, "runs of every entry, round-robin")
    gate: bool = opt(False, f"gate the results against {BASELINE.relative_to(suite.ROOT)} (same host only)")
    update_baseline: bool = opt(False, "replace that baseline with these results")
    thresholds: str = opt(str(suite.ROOT / "bench" / "gate" / "thresholds.yaml"), "thresholds for gate=true")
    dry_run: bool = opt(False, "print the commands and exit")
    budget: int = opt(900, "total seconds; later entries are skipped past it")
    extra: list[str] = opt([], "overrides added to every entry (e.g. extra=[debug_delay_s=0.01])")

def main(argv=None) -> int:
    args = parse(SuiteArgs, argv, "python -m bench.gate.ci_suite", __doc__)
    if args.repeats < 1 or args.budget < 1:
        fail("python -m bench.gate.ci_suite", f"repeats={args.repeats}, budget={args.budget}: both must be >= 1")
    results = Path(args.out).resolve() / "results"
    runs = plan(results, args.repeats, args.extra)
    if args.dry_run:
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
        return regress.check(BASELINE, results, args.thresholds)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
