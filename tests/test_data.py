"""The synthetic token source (bench/harness/data.py): checked on its own, because every parity test's
reference draws from the same source and cannot see a flaw the two share."""

from __future__ import annotations

import pytest
import torch

from bench.harness.data import SyntheticData

pytestmark = pytest.mark.unit


def test_synthetic_sequences_are_distinct_reproducible_and_shifted():
    """Three steps of 4 micro-batches (2 data-parallel ranks x 2 accumulation steps) of 4 sequences: all 48
    sequences differ from each other (a global batch of copies would train like one sequence, and parity against
    a reference with the same flaw would still hold); the same (seed, step, index) gives the same tokens in another
    instance, another seed other tokens; targets are the inputs shifted by one; every id is below the vocabulary."""
    cpu = torch.device("cpu")
    data = SyntheticData(256, 4, 16, seed=0, device=cpu)
    seqs = []
    for step in range(3):
        for index in range(4):
            x, y = data.batch(step, index)
            assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
            assert torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < 256 and int(x.min()) >= 0
            seqs += [tuple(row.tolist()) for row in x]
    assert len(set(seqs)) == len(seqs) == 48
    again = SyntheticData(256, 4, 16, seed=0, device=cpu).batch(2, 3)
    assert all(torch.equal(a, b) for a, b in zip(again, data.batch(2, 3)))
    assert not torch.equal(SyntheticData(256, 4, 16, seed=1, device=cpu).batch(2, 3)[0], again[0])
