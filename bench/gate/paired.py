"""The one A/B engine: alternate the variants, pair step k with step k, judge the median of the paired ratios.

On a shared host the speed moves from second to second (docs/gate.md), so a comparison is only fair when the
variants meet the same moments. Every tool that compares variants on this host uses this module:

- the regression gate (bench/gate/ab.py): the baseline revision's code against the working tree, both jobs
  taking turns step by step (bench/harness/turn.py), rounds with the first mover swapped;
- the variant tool (bench/launch/ab.py): two configurations in one process, round after round;
- the overhead tool (bench/launch/overhead.py): the harness against a bare hand-written loop;
- the tuner's repeats (bench/tune): N strategies, every other round in reverse order.

Definitions:

- ``round_order(variants, r)``: round r runs them as given when r is even, reversed when odd (A B, B A, A B, ...
  or A B C, C B A, ...): a drift over the session meets every variant early and late;
- ``paired_ratios(num, den)``: ``num[k] / den[k]`` for every step k both have (the k-th timed step of one variant
  against the k-th of the other, measured about one step apart when they take turns);
- ``summarize(ratios)``: their median (the judged number: robust to a preempted step), min and max;
- ``median_se(ratios)``: the standard error of ln(median), from the ratios' own spread;
- ``median(values)``: the one median of this package -- None and NaN left out, NaN when nothing is left.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def median(values: Iterable[float | None]) -> float:
    """The median of the values that are not None or NaN (NaN when there are none)."""
    kept = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(kept) if kept else math.nan


def round_order(variants: Sequence[T], rnd: int) -> list[T]:
    """The order variants run in round ``rnd``: as given on even rounds, reversed on odd ones."""
    return list(variants) if rnd % 2 == 0 else list(variants)[::-1]


def alternate(variants: Sequence[T], rounds: int, run: Callable[[T, int], R]) -> dict[T, list[R]]:
    """``run(variant, round)`` for every variant in every round, in ``round_order``; each variant's results in
    round order."""
    out: dict[T, list[R]] = {v: [] for v in variants}
    for rnd in range(rounds):
        for v in round_order(variants, rnd):
            out[v].append(run(v, rnd))
    return out


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Step k of ``num`` over step k of ``den``, for every k both have (a zero or missing step is left out)."""
    return [n / d for n, d in zip(num, den) if n and d]


def median_se(ratios: Sequence[float]) -> float:
    """The standard error of ln(median(ratios)), from the ratios' own spread (dimensionless, a log ratio):

        sqrt(pi/2) * 1.4826 * MAD / sqrt(n),   MAD = median |ln r_k - median ln r|,

    1.4826 MAD being a normal sample's sd estimated robustly (a preempted step does not widen it) and
    sqrt(pi/2) sd / sqrt(n) the large-sample sd of a normal sample's median. Steps measured in a row are not
    quite independent, so a user of this number scales it by a measured factor (bench/gate/ab.py ``observe``).
    NaN for fewer than 2 positive ratios."""
    logs = [math.log(r) for r in ratios if r and r > 0]
    if len(logs) < 2:
        return math.nan
    m = statistics.median(logs)
    mad = statistics.median(abs(x - m) for x in logs)
    return math.sqrt(math.pi / 2) * 1.4826 * mad / math.sqrt(len(logs))


@dataclass
class Ratio:
    """The judged median of paired ratios, their range and how many there were."""

    median: float
    low: float
    high: float
    n: int


def summarize(ratios: Sequence[float]) -> Ratio:
    """``Ratio`` of ``ratios`` (NaN fields when there are none)."""
    if not ratios:
        return Ratio(math.nan, math.nan, math.nan, 0)
    return Ratio(median(ratios), min(ratios), max(ratios), len(ratios))
