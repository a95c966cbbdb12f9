"""The regression gate's command line (``python -m bench.gate``): the same-run A/B gate (bench/gate/ab.py, what CI
runs) or committed numbers against committed numbers (bench/gate/regress.py).

    python -m bench.gate ab=true                       # same-run A/B against BASE_REV (CI)
    python -m bench.gate baseline=results/baselines/ci-cpu candidate=ci_out/results
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.gate import ab as ab_gate
from bench.gate import regress
from models.cli import UsageError, opt, parse


@dataclass
class GateArgs:
    ab: bool = opt(False, "same-run A/B gate (what CI runs): the CI matrix with this tree and with rev's code")
    rev: str = opt("", "ab: the baseline revision (default: results/baselines/BASE_REV)")
    rounds: int = opt(0, "ab: first rounds (pairs of turn-taking jobs) per entry; more while not sure (0: 1)")
    out: str = opt("ab_out", "ab: folder for both sides' rows and ab.json")
    slow_pct: float = opt(0.0, "ab: slow the candidate by exactly this percentage (the gate study)")
    entries: list[str] = opt([], "ab: only these CI matrix entries")
    timing: bool = opt(True, "ab: judge speed too (false: status, counters, loss included, and memory; one round)")
    baseline: list[str] = opt([], "committed numbers: baseline result files/folders/globs")
    candidate: list[str] = opt([], "committed numbers: candidate result files/folders/globs")
    thresholds: str = opt("", f"YAML thresholds (default {regress.DEFAULT_THRESHOLDS.name}; ab: thresholds_ab.yaml)")

    def __post_init__(self) -> None:
        if not self.ab and not (self.baseline and self.candidate):
            raise UsageError("baseline= and candidate= are required (or ab=true)")


def main(argv: list[str] | None = None) -> int:
    args = parse(GateArgs, argv, "python -m bench.gate", __doc__)
    if args.ab:
        return ab_gate.main(args.rev or None, args.out, args.rounds or None, args.thresholds or None, args.slow_pct,
                            args.entries or None, args.timing)
    return regress.check(args.baseline, args.candidate, args.thresholds or None)
