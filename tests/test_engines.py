"""The two instruments every tool shares: the A/B engine (bench/gate/paired.py) and the probe engine
(bench/measure/probe.py), on constructed inputs whose answers are worked out here by hand."""

from __future__ import annotations

import math

import pytest

from bench.gate.paired import alternate, median, median_se, paired_ratios, round_order, summarize
from bench.measure import probe
from bench.measure.probe import Trial, get_or_probe

pytestmark = pytest.mark.unit


def test_rounds_alternate_the_order():
    assert [round_order("AB", r) for r in range(4)] == [["A", "B"], ["B", "A"], ["A", "B"], ["B", "A"]]
    assert round_order(["x", "y", "z"], 1) == ["z", "y", "x"]
    calls = []
    out = alternate(("A", "B"), 3, lambda v, r: calls.append((r, v)) or f"{v}{r}")
    assert calls == [(0, "A"), (0, "B"), (1, "B"), (1, "A"), (2, "A"), (2, "B")]
    assert out == {"A": ["A0", "A1", "A2"], "B": ["B0", "B1", "B2"]}  # each variant's results in round order


def test_step_k_is_paired_with_step_k():
    # a slow phase in the middle of both runs cancels when step k meets step k; sorted steps would not
    a = [1.0, 1.0, 2.0, 2.0, 1.0]
    b = [1.1, 1.1, 2.2, 2.2, 1.1]
    assert paired_ratios(b, a) == pytest.approx([1.1] * 5)
    assert paired_ratios([1.0, 0.0, 3.0], [2.0, 1.0]) == [0.5]  # a zero step and a missing step are left out
    r = summarize([1.2, 0.9, 1.0, 1.1, 5.0])
    assert (r.median, r.low, r.high, r.n) == (1.1, 0.9, 5.0, 5)  # one wild step does not move the median
    assert math.isnan(summarize([]).median) and summarize([]).n == 0


def test_the_median_leaves_out_what_was_not_measured():
    assert median([3.0, None, 1.0, float("nan"), 2.0]) == 2.0
    assert median([4, 1, 3, 2]) == 2.5
    assert math.isnan(median([None, float("nan")]))


def test_the_medians_standard_error_matches_the_medians_observed_spread():
    """``median_se`` from one round's own steps against an independent source: the spread of the medians of many
    rounds drawn here (121 steps each, log ratios normal with sd 10 %). Their sd is sqrt(pi/2) x 10 % / 11 =
    1.14 %; the per-round estimates centre on the observed spread within 10 %. A wild step (x3) moves neither."""
    import random
    import statistics

    rng = random.Random(0)
    rounds = [[math.exp(rng.gauss(0, 0.10)) for _ in range(121)] for _ in range(2000)]
    observed = statistics.stdev(math.log(statistics.median(r)) for r in rounds)
    assert observed == pytest.approx(math.sqrt(math.pi / 2) * 0.10 / 11, rel=0.05)
    assert statistics.mean(median_se(r) for r in rounds) == pytest.approx(observed, rel=0.10)
    r = rounds[0]
    assert median_se([*r[:-1], r[-1] * 3]) == pytest.approx(median_se(r), rel=0.05)
    assert math.isnan(median_se([1.0])) and median_se([1.0, 1.0, 1.0]) == 0.0


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("N00BGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("N00BGPT_PEAK_CACHE", raising=False)
    return tmp_path


class FakeMeter:
    """A NeighbourMeter whose sample says other work took ``share`` of the host."""

    share = 0.0

    def start(self):
        return self

    def sample(self):
        return FakeMeter.share


def test_measured_judged_cached_and_read_back(cache, monkeypatch):
    monkeypatch.setattr(probe, "NeighbourMeter", FakeMeter)
    monkeypatch.setattr(probe, "neighbour_share", lambda samples: max(samples))
    runs = []

    def measure():
        runs.append(1)
        return Trial({"a": 1.0 + len(runs), "b": 10.0})

    FakeMeter.share = 0.5  # a busy host: used for this run, not cached
    t, src = get_or_probe("thing", "k", measure, ("a", "b"), neighbours_limit=0.2)
    assert t.values == {"a": 2.0, "b": 10.0} and src == "probe:measured thing (neighbours 50% of the host: not cached)"
    assert probe.cache_get("k|a") is None
    FakeMeter.share = 0.0  # quiet: cached ...
    t, src = get_or_probe("thing", "k", measure, ("a", "b"), neighbours_limit=0.2)
    assert (t.values, src) == ({"a": 3.0, "b": 10.0}, "probe:measured thing")
    t, src = get_or_probe("thing", "k", measure, ("a", "b"), neighbours_limit=0.2)  # ... and read back
    assert (t.values, src, len(runs)) == ({"a": 3.0, "b": 10.0}, "probe:cached thing", 2)
    t, src = get_or_probe("thing", "k", measure, ("a", "b"), fresh=True)  # fresh: measured again, replaced
    assert t.values["a"] == 4.0 and probe.cache_get("k|a") == 4.0
    # its own evidence of contention (a spread, a CPU share) is a reason too, named in the source
    t, src = get_or_probe("x", "k2", lambda: Trial({None: 5.0}, ["contended: trials spread 40%"]))
    assert src == "probe:measured x (contended: trials spread 40%: not cached)" and probe.cache_get("k2") is None
    t, src = get_or_probe("x", "k3", lambda: Trial({None: 5.0}), cache=False)  # N00BGPT_PEAK_CACHE=0
    assert src == "probe:measured x (uncached)" and probe.cache_get("k3") is None


def test_ranks_measure_together_unless_every_rank_has_the_value(cache, monkeypatch):
    """A group probe is read back only when every rank holds the cached value (else all measure, or a rank that
    skipped would leave the others waiting in the probe's collectives); the ranks' values combine by their max
    (the slowest rank's time), the neighbours over every rank's host, and only the writer caches."""
    monkeypatch.setattr(probe, "NeighbourMeter", FakeMeter)
    monkeypatch.setattr(probe, "neighbour_share", lambda samples: max(samples))
    FakeMeter.share = 0.0
    probe.cache_put("g|t", 1.0)  # this rank has it; the other does not
    other = {"hits": [None], "values": ({"t": 3.0}, 0.3)}

    def gather(obj):
        return [obj, other["hits"]] if isinstance(obj, list) else [obj, other["values"]]

    t, src = get_or_probe("parts", "g", lambda: Trial({"t": 2.0}), ("t",), gather=gather, writer=False,
                          neighbours_limit=0.2)
    assert t.values == {"t": 3.0}  # measured again, the slowest rank's
    assert src == "probe:measured parts (neighbours 30% of the host: not cached)"  # the other rank's host was busy
    other["values"] = ({"t": 3.0}, 0.0)
    get_or_probe("parts", "g", lambda: Trial({"t": 2.0}), ("t",), gather=gather, writer=False)
    assert probe.cache_get("g|t") == 1.0  # clean, but this rank is not the writer: the cache is untouched
