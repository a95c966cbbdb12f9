"""Combine what every rank measured into the one row, by each column's rule in reports/record.py.

Each rank contributes a dict of record columns (its own peak memory, telemetry window, contention,
first step time, ...). ``combine_ranks`` applies the column's ``rule``:

- ``max``  the worst rank (memory, a synchronous step's time, host load, steal);
- ``min``  the worst rank where smaller is worse (cpu_util, the lowest SM clock);
- ``sum``  totals over ranks (GPU energy);
- ``mean`` averages (GPU utilisation, power, clock);
- ``union`` sorted names seen on any rank (throttle reasons);
- ``rank0`` rank 0's value (identical on every rank, or rank 0's view of a shared resource);
- ``per_rank`` the list in rank order.

Values of None (a rank that could not read the number) are left out; a column no rank could read is
None. Per-step times combine per step (``metrics.combine_step_times``: the max over ranks of each step)
before the derived statistics are taken.
"""

from __future__ import annotations

from reports.record import META

_RULES = {
    "max": max,
    "min": min,
    "sum": sum,
    "mean": lambda vs: sum(vs) / len(vs),
    "union": lambda vs: sorted({n for v in vs for n in v}),
    "rank0": lambda vs: vs[0],
}


def rule_of(column: str) -> str:
    """The cross-rank rule of a record column (KeyError for a name that is not a column)."""
    rule = META[column]["rule"]
    if rule not in (*_RULES, "per_rank"):
        raise ValueError(f"column {column!r} has rule {rule!r}: it is not combined from ranks")
    return rule


def combine_ranks(per_rank: list[dict]) -> dict:
    """One dict of record columns from every rank's dict (rank order), each column by its rule."""
    out = {}
    for column in dict.fromkeys(k for r in per_rank for k in r):
        rule = rule_of(column)
        if rule == "per_rank":
            out[column] = [r.get(column) for r in per_rank]
            continue
        values = [r[column] for r in per_rank if r.get(column) is not None]
        if rule == "rank0":
            out[column] = per_rank[0].get(column)
        else:
            out[column] = _RULES[rule](values) if values else None
    return out
