"""Exposed communication (bench/measure/overlap.py): interval unions against hand-computed answers and a
brute-force timeline."""

from __future__ import annotations

import random

import pytest

from bench.measure.overlap import exposure, length, subtract, union

pytestmark = pytest.mark.dist


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


SLEEP = 0.2


def _constructed_step(rank: int, world_size: int) -> dict:
    """Per step: an all-reduce issued asynchronously while this rank multiplies matrices and runs elementwise
    ops (hidden), then rank 1
    sleeps SLEEP s while rank 0 already waits in a blocking all-reduce (exposed on rank 0 only)."""
    import time

    import torch
    import torch.distributed as dist

    from bench.measure.overlap import profiled_exposure

    x, a, big = torch.ones(1024), torch.randn(256, 256), torch.randn(2_000_000)
    compute_wall, matmul_wall, blocking_wall, wait_wall = [], [], [], []

    def steps():
        for _ in range(2):
            work = dist.all_reduce(x, async_op=True)
            t0 = time.perf_counter()
            for _ in range(40):
                a @ a
            t1 = time.perf_counter()
            for _ in range(10):
                big.mul(2.0).add_(1.0)  # elementwise: compute, not matmul
            compute_wall.append(time.perf_counter() - t0)
            matmul_wall.append(t1 - t0)
            t3 = time.perf_counter()
            work.wait()  # normally done already: the all-reduce ran under the matmuls
            wait_wall.append(time.perf_counter() - t3)
            if rank == 1:
                time.sleep(SLEEP)
            t2 = time.perf_counter()
            dist.all_reduce(x)
            blocking_wall.append(time.perf_counter() - t2)

    cols = profiled_exposure(steps, "cpu", 2)
    return {**cols, "compute_wall": sum(compute_wall) / 2, "matmul_wall": sum(matmul_wall) / 2,
            "blocking_wall": sum(blocking_wall) / 2, "waiting": (sum(blocking_wall) + sum(wait_wall)) / 2}


def test_exposed_communication_on_a_constructed_case(ranks):
    r0, r1 = ranks(_constructed_step)
    # exposed = the time the rank sat in a collective with nothing to compute, as its own clock saw it: rank 0
    # waits for rank 1's SLEEP in the blocking all-reduce; rank 1 arrives last and hardly waits (on a busy host
    # either may also wait for its asynchronous all-reduce, which its clock sees too)
    for r in (r0, r1):
        assert r["exposed_comm_s"] == pytest.approx(r["waiting"], rel=0.15, abs=0.01)
    assert r0["blocking_wall"] > SLEEP / 2 and r0["exposed_comm_s"] > r1["exposed_comm_s"]
    for r in (r0, r1):  # compute = the matmuls, as the rank's own clock saw them (profiler overhead aside)
        assert r["compute_wall"] * 0.7 < r["compute_time_s"] < r["compute_wall"] * 1.1
        assert r["matmul_wall"] * 0.7 < r["matmul_time_s"] < r["matmul_wall"] * 1.1
        assert r["matmul_time_s"] < r["compute_time_s"] - 0.5 * (r["compute_wall"] - r["matmul_wall"])
        assert 0 <= r["overlap_pct"] <= 100
