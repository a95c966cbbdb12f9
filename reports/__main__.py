"""Build a report from result tables.

    python -m reports results=results out=report                        # tables, plots, index.html, summary.md
    python -m reports "results=[results/gpu,results/*.jsonl]" out=report  # files, folders and globs, many at once
    python -m reports baseline=old candidate=new out=cmp                 # side by side with % deltas

Exit codes: 0 written; 2 unusable input (the message names the file and the problem). A torn or
unparsable line is skipped with a warning naming file:line; ``strict=true`` makes it an error (exit 2).
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

from models.cli import opt, parse
from reports import build, compare
from reports.load import BadValueWarning, ResultsError, TornLineWarning, load


@dataclass
class ReportArgs:
    out: str = opt(help="output folder")
    results: list[str] = opt([], "result files, folders or globs")
    baseline: list[str] = opt([], "baseline results (with candidate=)")
    candidate: list[str] = opt([], "candidate results (with baseline=)")
    strict: bool = opt(False, "a torn/unparsable line is an error, not skipped")


def main(argv: list[str] | None = None) -> int:
    args = parse(ReportArgs, argv, "python -m reports", __doc__)
    warnings.simplefilter("always", TornLineWarning)
    warnings.simplefilter("always", BadValueWarning)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    strict = args.strict
    try:
        build.check_out(args.out)  # before reading anything: the report can be written there
        if args.baseline or args.candidate:
            if not (args.baseline and args.candidate):
                raise ResultsError("baseline= and candidate= go together")
            rep, page, md = compare.report(load(args.baseline, strict=strict), load(args.candidate, strict=strict))
            index = build.write(rep, args.out, html_text=page, markdown=md)
        else:
            if not args.results:
                raise ResultsError("give results= (files/folders/globs), or baseline= and candidate=")
            rep = build.build(load(args.results, strict=strict))
            index = build.write(rep, args.out)
    except ResultsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {index} ({len(rep.figures)} figures, summary.md beside it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
