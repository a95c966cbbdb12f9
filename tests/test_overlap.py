"""Exposed communication (bench/measure/overlap.py): interval unions against hand-computed answers and a
brute-force timeline."""

from __future__ import annotations

import random

import pytest

from bench.measure.overlap import exposure, length, subtract, union


def test_union_merges_overlaps_and_drops_empty_intervals():
    assert union([(3, 4), (0, 1), (0.5, 2), (2, 2.5), (5, 5)]) == [(0, 2.5), (3, 4)]
    assert length([(0, 1), (0, 1), (0.5, 1.5)]) == 1.5  # a sum of lengths would say 3.5


def test_subtract_and_exposure_on_a_constructed_step():
    # compute 0-4 and 6-9 (two streams, overlapping 3-4 counted once); comm 3-7 and 8-10 (two collectives)
    compute = [(0, 4), (3, 4), (6, 9)]
    comm = [(3, 7), (8, 10), (9, 9.5)]
    assert subtract(comm, compute) == [(4, 6), (9, 10)]
    cols = exposure(comm, compute, n_steps=2)
    assert cols == pytest.approx({"comm_time_s": 3.0, "compute_time_s": 3.5, "exposed_comm_s": 1.5,
                                  "overlap_pct": 50.0})
    assert exposure([], compute)["overlap_pct"] is None
    assert exposure(comm, [])["exposed_comm_s"] == pytest.approx(6.0)  # nothing hides it
    with pytest.raises(ValueError, match="n_steps=0"):
        exposure(comm, compute, 0)


def test_against_a_brute_force_timeline():
    rng = random.Random(0)
    for _ in range(200):
        def draw():
            return [(s, s + rng.randint(0, 15)) for s in (rng.randint(0, 100) for _ in range(rng.randint(0, 8)))]
        comm, compute = draw(), draw()
        ticks = [t + 0.5 for t in range(130)]
        inside = [lambda t, iv=iv: any(s <= t < e for s, e in iv) for iv in (comm, compute)]
        want = sum(1 for t in ticks if inside[0](t) and not inside[1](t))
        assert length(subtract(comm, compute)) == pytest.approx(want)
        assert length(comm) == pytest.approx(sum(1 for t in ticks if inside[0](t)))
