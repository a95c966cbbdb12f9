"""The same-run A/B gate: its verdict rule on constructed pairs, and real A/B runs of two revisions of
this repository (a clone with a committed slowdown) in which the baseline really is the named revision."""

from __future__ import annotations

import json
import math
import random
import re
import statistics
import subprocess
import sys

import pytest

from bench.gate import ab as ab_gate
from bench.gate.ab import Pair, Run, judge, needs_more
from tests.helpers import ROOT

pytestmark = pytest.mark.unit

TH = ab_gate.load_thresholds(None)


def run(side, t=0.1, status="ok", mem=1e9, loss=5.5, error=None):
    return Run(side, status, t if status in ("ok", "suspect") else None, mem, 10.0, error, {"loss": loss})


def steps_for(ratio, sd):
    """Five paired step ratios whose median is ``ratio`` and whose round sd (``observe``) is ``sd``, built from the
    documented definition: log ratios ln(ratio) + a x (-2, -1, 0, 1, 2) have MAD a, so the median's standard error
    is sqrt(pi/2) x 1.4826 a / sqrt(5), times round_sd_scale."""
    a = sd / (TH["round_sd_scale"] * math.sqrt(math.pi / 2) * 1.4826 / math.sqrt(5))
    return [ratio * math.exp(a * k) for k in (-2, -1, 0, 1, 2)]


def pairs(ratios, sd=0.01, **cand):
    """One pair per ratio, each of 5 paired steps whose median is that ratio and whose round sd is ``sd``; one
    step in every round is wild (+50 %, in place of the highest: the median and the MAD do not move)."""
    def steps(r):
        xs = steps_for(r, sd)
        return [*xs[:4], xs[4] + 0.5]
    return [Pair(i, "AB" if i % 2 == 0 else "BA", run("base"), run("cand", t=0.1 * r, **cand), step_ratios=steps(r))
            for i, r in enumerate(ratios)]


def checks(v):
    return {c["metric"]: c["verdict"] for c in v.checks}


def test_verdicts_on_paired_ratios():
    assert judge("e", pairs([0.98, 1.02, 1.01, 0.99]), TH).verdict == "PASS"
    slow = judge("e", pairs([1.09, 1.11, 1.10, 1.12]), TH)
    assert checks(slow)["step_time"] == "FAIL"
    st = next(c for c in slow.checks if c["metric"] == "step_time")
    assert st["ratio"] == pytest.approx(statistics.geometric_mean([1.09, 1.11, 1.10, 1.12])) and st["pairs"] == 4
    assert st["round_sd_pct"] == pytest.approx([1.0] * 4)  # each round's own sd, from its steps
    # one wild step in every round (the helper's +0.5) moves neither the rounds' medians nor their spread
    assert judge("e", pairs([1.00, 1.01, 0.99, 1.00]), TH).verdict == "PASS"
    # +4 % is a regression over four rounds; +2 % is not (the test's midpoint is 1.025)
    assert checks(judge("e", pairs([1.04] * 4), TH))["step_time"] == "FAIL"
    assert checks(judge("e", pairs([1.02] * 4), TH))["step_time"] == "PASS"


def test_rounds_weigh_by_their_own_spread():
    """Each round weighs 1/sd^2, its sd measured from its own steps: a round 10 % slower with sd 1 % and an
    unchanged one with sd 3 % combine to 1.1^(0.9) (weights 1/0.01^2 and 1/0.03^2, nine to one), not to the plain
    geometric mean 1.049; the sd has a floor (min_round_sd_pct) for steps that do not vary at all."""
    v = judge("e", [*pairs([1.10], sd=0.01), *pairs([1.00], sd=0.03)], TH)
    st = next(c for c in v.checks if c["metric"] == "step_time")
    assert st["ratio"] == pytest.approx(1.1 ** 0.9) and st["round_sd_pct"] == pytest.approx([1.0, 3.0])
    assert ab_gate.observe([1.02] * 60, TH) == (1.02, TH["min_round_sd_pct"] / 100)
    # the lines at total precision w: d/2 + ln(miss/(1 - false_alarm)) / (w d), d/2 + ln((1 - miss)/false_alarm)
    # / (w d) in log ratio, worked out here for w = 1/0.01^2 (one round of sd 1 %)
    d, w = math.log(1.05), 1e4
    want = (d / 2 + math.log(TH["miss"] / (1 - TH["false_alarm"])) / (w * d),
            d / 2 + math.log((1 - TH["miss"]) / TH["false_alarm"]) / (w * d))
    assert [math.log(x) for x in ab_gate.sprt_lines(w, TH)] == pytest.approx(want)


def test_status_memory_and_loss_checks():
    broken = [Pair(0, "AB", run("base"), run("cand", status="error", error="rank 0: boom"))]
    v = judge("e", broken, TH)
    assert checks(v)["status"] == "FAIL" and "boom" in v.checks[0]["detail"]
    new = [Pair(0, "AB", run("base", status="error", error="unknown preset"), run("cand"))]
    v = judge("e", new, TH)
    assert v.verdict == "SKIP" and "new?" in v.checks[0]["detail"]
    assert checks(judge("e", pairs([1.0, 1.0], mem=1.08e9), TH))["peak_mem"] == "FAIL"
    assert checks(judge("e", pairs([1.0, 1.0], mem=1.03e9), TH))["peak_mem"] == "PASS"
    # the loss is a counter, judged exactly: the last bit, either direction (a lower loss is a different
    # computation, not a win), named
    for loss in (math.nextafter(5.5, 6), math.nextafter(5.5, 5)):
        v = judge("e", pairs([1.0, 1.0], loss=loss), TH)
        assert checks(v)["counters"] == "FAIL" and "loss 5.5 -> " in v.checks[1]["detail"]
    assert checks(judge("e", pairs([1.0, 1.0], loss=5.5), TH))["counters"] == "PASS"
    accepted = judge("e", pairs([1.0, 1.0], loss=5.6), {**TH, "accept_counters": ["loss"]})
    assert checks(accepted)["counters"] == "PASS" and "on purpose" in accepted.checks[1]["detail"]


def test_a_suspect_run_finished_and_is_compared_on_its_steps():
    """A run whose MFU exceeded 1 because its matmul peak was probed low beside other work (CI on a busy host) is
    suspect, not failed: its step times are real and MFU is not judged here, so the pair is compared and said so."""
    for side in ("base", "cand"):
        ps = pairs([1.0, 1.0])
        setattr(ps[0], side, run(side, status="suspect", error="mfu=1.3 > 1"))
        ps[0].step_ratios = [1.0] * 5
        v = judge("e", ps, TH)
        assert checks(v) == {"status": "PASS", "counters": "PASS", "step_time": "PASS", "peak_mem": "PASS"}
        assert "1 suspect" in v.checks[0]["detail"]
    slow = pairs([1.2, 1.2])
    slow[1].cand = run("cand", t=0.12, status="suspect")
    assert checks(judge("e", slow, TH))["step_time"] == "FAIL"  # a suspect run's slowness still counts


def test_the_counters_look_at_every_candidate_run():
    """Candidates with different losses: three rounds equal, one off in the last bit. Judging the first pair would
    pass; every pair is compared."""
    ps = pairs([1.0, 1.0, 1.0, 1.0])
    ps[2].cand = run("cand", loss=math.nextafter(5.5, 6))
    assert checks(judge("e", ps, TH))["counters"] == "FAIL"
    ps[2].cand = run("cand", loss=5.5)
    assert checks(judge("e", ps, TH))["counters"] == "PASS"


def test_borderline_rounds_are_measured_again_up_to_a_limit():
    assert needs_more(pairs([1.03]), TH)  # between the lines after one round: more
    assert not needs_more(pairs([1.00]), TH)  # clearly unchanged
    assert needs_more(pairs([1.10]), TH)  # clearly slower, but one round never fails (min_fail_rounds) ...
    assert not needs_more(pairs([1.10, 1.10]), TH)  # ... two do
    assert not needs_more(pairs([1.025] * TH["max_pairs"]), TH)  # the limit stops it
    # the lines close in as rounds accumulate (rounds of sd 1 %): 1.035 is not sure after one round, a fail after
    # eight; a noisier round (sd 2.3 %) decides less: 1.086 then 1.0 is not sure, 1.015 needs three rounds to pass
    call = ab_gate.speed_call
    assert call([(1.035, 0.01)], TH) == "not sure" and call([(1.035, 0.01)] * 8, TH) == "fail"
    assert call([(1.2, 0.01)], TH) == "not sure" and call([(1.086, 0.023), (1.0, 0.023)], TH) == "not sure"
    assert call([(1.015, 0.023)] * 2, TH) == "not sure" and call([(1.015, 0.023)] * 3, TH) == "pass"


def _simulated_rates(th, step_sd, n=3000, steps=120, seed=0):
    """The whole sequential rule (rounds until sure, at most max_pairs, then ``speed_verdict``) on rounds drawn
    here: ``steps`` paired step ratios, each log ratio normal with ``step_sd`` around 1 and around 1 +
    detect_pct/100, every round observed from its own steps (``observe``). Returns (false alarms, detections,
    mean rounds unchanged, mean rounds slowed)."""
    rng = random.Random(seed)

    def one(mu):
        return ab_gate.observe([math.exp(rng.gauss(mu, step_sd)) for _ in range(steps)], th)

    out = []
    for mu in (0.0, math.log1p(th["detect_pct"] / 100)):
        fails = rounds = 0
        for _ in range(n):
            rs = [one(mu)]
            while ab_gate.speed_call(rs, th) == "not sure" and len(rs) < th["max_pairs"]:
                rs.append(one(mu))
            fails += ab_gate.speed_verdict(rs, th)[0] == "FAIL"
            rounds += len(rs)
        out += [fails / n, rounds / n]
    return out[0], out[2], out[1], out[3]


def test_the_sequential_rule_keeps_its_design_error_rates_on_any_host():
    """Wald's bounds, checked by simulating rounds of 120 steps whose steps spread like this machine's quiet (10 %
    per step) and twice as wide: false alarms at most false_alarm / (1 - miss), misses at most miss / (1 -
    false_alarm) (truncation at max_pairs included), on both -- each round measures its own spread, so a noisier
    host buys more rounds instead of more false alarms -- and a short gate where steps spread like this machine's
    (an unchanged entry under 1.5 rounds, a slower one under 3). A rule that swapped the two error rates, forgot
    that the lines close in with the precision, judged every round on the midpoint, or took the rounds' sd from
    anything but their steps breaks one of these."""
    fa, det, n_aa, n_slow = _simulated_rates(TH, 0.10)
    assert fa <= TH["false_alarm"] / (1 - TH["miss"])
    assert 1 - det <= TH["miss"] / (1 - TH["false_alarm"])
    assert n_aa < 1.5 and n_slow < 3
    fa2, det2, n_aa2, _ = _simulated_rates(TH, 0.20, n=2000, seed=1)
    assert fa2 <= TH["false_alarm"] / (1 - TH["miss"]) and 1 - det2 <= TH["miss"] / (1 - TH["false_alarm"])
    assert n_aa2 > n_aa  # ... paid for in rounds


def test_one_round_then_more_only_for_an_entry_not_sure_yet(monkeypatch):
    """run_ab's sequence on constructed rounds: an entry clear after its first round gets one pair, one near the
    limit gets rounds until it is sure (here its second round settles it), one that stays near it stops at
    max_pairs and says it was judged at the cap; the first mover alternates between entries and rounds."""
    script = {"fast": [1.00], "settles": [1.05, 1.09], "stuck": [1.0315, 1.0185] * 10}
    sd = {"fast": 0.01, "settles": 0.01, "stuck": 0.023}  # each entry's rounds' own spread
    calls = []

    class FakeRunner:
        def __init__(self, *a, **k):
            pass

    def fake_pair(runner, entry, rnd, index):
        calls.append((entry.label, rnd))
        r = script[entry.label][rnd]
        first = ab_gate.round_order(("base", "cand"), rnd + index)[0]
        return Pair(rnd, "AB" if first == "base" else "BA", run("base"), run("cand", t=0.1 * r),
                    step_ratios=steps_for(r, sd[entry.label]))

    monkeypatch.setattr(ab_gate, "Runner", FakeRunner)
    monkeypatch.setattr(ab_gate, "measure_pair", fake_pair)
    matrix = [ab_gate.Entry(name, "tiny", "single", [], 0) for name in script]
    verdicts = {v.entry: v for v in ab_gate.run_ab(ROOT, ROOT, 1, TH, matrix, log=lambda m: None)}
    assert [c for c in calls if c[0] == "fast"] == [("fast", 0)]
    assert [c for c in calls if c[0] == "settles"] == [("settles", 0), ("settles", 1)]
    assert len([c for c in calls if c[0] == "stuck"]) == TH["max_pairs"]
    st = {k: next(c for c in v.checks if c["metric"] == "step_time") for k, v in verdicts.items()}
    assert (st["fast"]["verdict"], st["fast"]["call"], st["fast"]["pairs"]) == ("PASS", "pass", 1)
    assert st["settles"]["verdict"] == "FAIL" and st["settles"]["call"] == "fail"  # geometric mean 1.07
    assert st["stuck"]["call"] == "not sure" and "midpoint" in st["stuck"]["detail"]
    assert [p.order for p in verdicts["settles"].pairs] == ["BA", "AB"]  # entry 1 starts with the candidate


def test_a_round_is_judged_on_its_paired_steps_not_whole_runs():
    """A round's observation is the median of its steps paired k with k, not the runs' median step times: a pair
    whose run medians say 1.00 but whose steps, paired, are 8 % slower counts as 1.08. Rounds combine by their
    precision-weighted geometric mean (a round 10 % slower and one 10 % faster, equally spread, cancel)."""
    base, cand = run("base", t=0.100), run("cand", t=0.100)  # the runs' medians agree ...
    slow = [Pair(0, "AB", base, cand, step_ratios=[1.08] * 40 + [0.95] * 20)]  # ... their paired steps do not
    v = judge("e", slow, TH)
    st = next(c for c in v.checks if c["metric"] == "step_time")
    assert checks(v)["step_time"] == "FAIL" and st["ratio"] == pytest.approx(1.08) and st["steps"] == 60
    two = [Pair(0, "AB", base, cand, step_ratios=[1.1] * 60), Pair(1, "BA", base, cand, step_ratios=[1 / 1.1] * 60)]
    assert ab_gate.pooled([ab_gate.observe(p.step_ratios, TH) for p in two])[0] == pytest.approx(1.0)
    # two runs that finished but left no paired steps cannot pass on speed
    blind = judge("e", [Pair(0, "AB", base, cand, step_ratios=[])], TH)
    assert checks(blind)["step_time"] == "FAIL" and "cannot be judged" in blind.checks[-1]["detail"]


@pytest.mark.e2e
def test_bad_input_exits_2(tmp_path):
    cmd = [sys.executable, "-m", "bench.gate", f"out={tmp_path / 'o'}", "ab=true"]
    res = subprocess.run([*cmd, "rev=no-such-rev"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "revision 'no-such-rev' is not a commit" in res.stderr
    res = subprocess.run([*cmd, "rev=HEAD", "entries=nope"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "unknown entries ['nope']; valid: single, ddp" in res.stderr
    bad = tmp_path / "th.yaml"
    bad.write_text("detect_pct: -1\n")
    res = subprocess.run([*cmd, "rev=HEAD", f"thresholds={bad}"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "expected exactly the keys" in res.stderr
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def slow_clone(tmp_path_factory):
    """A clone of this repository whose newest commit adds a 50 ms sleep to every training step."""
    clone = tmp_path_factory.mktemp("ab") / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    train = clone / "bench" / "harness" / "loop.py"
    text = train.read_text()
    marker = "        b.opt.zero_grad(set_to_none=True)\n"
    assert marker in text
    train.write_text(text.replace(marker, marker + "        time.sleep(0.05)  # the regression under test\n"))
    git = ["git", "-C", str(clone), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "commit", "-qam", "slow"], check=True)
    return clone


def ab(clone, rev, out):
    """One round of one entry, 30 paired steps (the shipped rule with shorter rounds: a +50 ms step is far from
    any line, so no borderline round is added); the alternation of rounds is tests/test_engines.py's."""
    th = out.parent / "thresholds_30.yaml"
    th.write_text(re.sub(r"^round_steps: \S+", "round_steps: 30", ab_gate.DEFAULT_THRESHOLDS.read_text(), flags=re.M))
    return subprocess.run([sys.executable, "-m", "bench.gate", "ab=true", f"rev={rev}", "entries=single",
                           "rounds=1", f"out={out}", f"thresholds={th}"], cwd=clone, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.e2e
def test_a_committed_slowdown_fails_against_its_parent(slow_clone, tmp_path):
    res = ab(slow_clone, "HEAD~1", tmp_path / "o")
    assert res.returncode == 1, res.stdout + res.stderr
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("single") and "step_time" in ln)
    assert "FAIL" in line
    ratio = float(line.split("ratio ")[1].split()[0])
    assert ratio > 1.25  # 50 ms on a ~40-100 ms step


@pytest.mark.e2e
def test_the_baseline_is_the_named_revision_not_the_working_tree(slow_clone, tmp_path):
    """Baseline = the slow HEAD, candidate = the working tree with the sleep removed: faster, so it passes."""
    loop = "bench/harness/loop.py"
    subprocess.run(["git", "-C", str(slow_clone), "checkout", "-q", "HEAD~1", "--", loop], check=True)
    try:
        res = ab(slow_clone, "HEAD", tmp_path / "o")
    finally:
        subprocess.run(["git", "-C", str(slow_clone), "checkout", "-q", "HEAD", "--", loop], check=True)
    assert res.returncode == 0, res.stdout + res.stderr
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("single") and "step_time" in ln)
    assert float(line.split("ratio ")[1].split()[0]) < 0.8


def _with_counters(ps, base: dict, cand: dict):
    for p in ps:
        p.base.counters, p.cand.counters = dict(base), dict(cand)
    return ps


COUNTED = {"flops_counted_per_step": 1000, "comm_bytes_per_step": 0, "param_bytes": 400, "optimizer_state_bytes": 816,
           "graphs_compiled": 0, "graph_breaks": 0}


def test_counters_are_judged_exactly_and_first_whatever_the_timing_says():
    """Equal counters pass; one FLOP more per step fails with the counter named, though the timing passes and comes
    after it; a change listed in accept_counters is said, not failed; a counter the baseline does not record yet is
    named, not judged; one neither records (FLOPs under compile) is not mentioned."""
    same = judge("e", _with_counters(pairs([1.0, 1.0]), COUNTED, COUNTED), TH)
    assert same.verdict == "PASS" and [c["metric"] for c in same.checks][:3] == ["status", "counters", "step_time"]
    more = judge("e", _with_counters(pairs([0.97, 0.98]), COUNTED, {**COUNTED, "flops_counted_per_step": 1001}), TH)
    counters = next(c for c in more.checks if c["metric"] == "counters")
    assert more.verdict == "FAIL" and checks(more)["step_time"] == "PASS"
    assert counters["verdict"] == "FAIL" and "flops_counted_per_step 1000 -> 1001 (+0.10%)" in counters["detail"]
    breaks = _with_counters(pairs([1.0]), COUNTED, {**COUNTED, "graph_breaks": 1})
    assert "graph_breaks 0 -> 1" in next(c["detail"] for c in judge("e", breaks, TH).checks
                                         if c["metric"] == "counters")
    accepted = judge("e", _with_counters(pairs([1.0]), COUNTED, {**COUNTED, "param_bytes": 800}),
                     {**TH, "accept_counters": ["param_bytes"]})
    said = next(c for c in accepted.checks if c["metric"] == "counters")
    assert said["verdict"] == "PASS" and "on purpose" in said["detail"] and "param_bytes 400 -> 800" in said["detail"]
    old_base = {**COUNTED, "param_bytes": None, "flops_counted_per_step": None}
    new = judge("e", _with_counters(pairs([1.0]), old_base, {**COUNTED, "flops_counted_per_step": None}), TH)
    detail = next(c["detail"] for c in new.checks if c["metric"] == "counters")
    assert new.verdict == "PASS" and "not on the baseline yet: param_bytes" in detail and "flops" not in detail


def test_without_timing_no_speed_verdict_and_no_more_rounds():
    """timing=false: a 20 % slower candidate with equal counters passes (no speed check at all), while a changed
    counter still fails."""
    slow = _with_counters(pairs([1.2]), COUNTED, COUNTED)
    v = judge("e", slow, TH, timing=False)
    assert v.verdict == "PASS" and "step_time" not in checks(v) and set(checks(v)) == {"status", "counters", "peak_mem"}
    changed = _with_counters(pairs([1.0]), COUNTED, {**COUNTED, "comm_bytes_per_step": 8})
    assert judge("e", changed, TH, timing=False).verdict == "FAIL"


def test_accept_counters_must_name_counters(tmp_path):
    bad = tmp_path / "th.yaml"
    bad.write_text((ab_gate.DEFAULT_THRESHOLDS.read_text()).replace("accept_counters: []", "accept_counters: [flops]"))
    with pytest.raises(ab_gate.ABInputError, match="accept_counters"):
        ab_gate.load_thresholds(bad)
    for key, bad_value in (("false_alarm", "0.9"), ("miss", "0"), ("round_sd_scale", "0"), ("min_fail_rounds", "0"),
                             ("round_steps", "0"), ("round_steps", "60.5")):
        text = ab_gate.DEFAULT_THRESHOLDS.read_text()
        bad.write_text(re.sub(rf"^{key}: \S+", f"{key}: {bad_value}", text, count=1, flags=re.M))
        with pytest.raises(ab_gate.ABInputError, match=f"{key}={bad_value}"):
            ab_gate.load_thresholds(bad)


def test_the_study_summary_counts_centres_and_implied_rates(tmp_path):
    """study.md from constructed gates: the A/A rounds lean one way when the baseline moves first and the other way
    when the candidate does (the table shows both centres), their resampled rule raises no alarm; slowed rounds at
    1.06-1.08 are detected in every resampled entry."""
    from bench.gate import study

    def gate(name, slow, ratios, folder=tmp_path, steps=TH["round_steps"]):
        verdicts = [{"entry": f"e{i}", "verdict": "FAIL" if slow else "PASS",
                     "checks": [{"metric": "step_time", "verdict": "FAIL" if slow else "PASS", "ratio": r,
                                 "pairs": 1}],
                     "pairs": [{"order": "AB" if i % 2 == 0 else "BA", "step_ratios": [r] * 3}]}
                    for i, r in enumerate(ratios)]
        (folder / f"{name}.json").write_text(json.dumps({"condition": name, "slow_pct": slow, "wall_s": 60.0,
                                                         "thresholds": {"round_steps": steps}, "verdicts": verdicts}))

    gate("quiet-aa-0", 0.0, [0.99, 1.01, 0.99, 1.01])
    gate("quiet-slow-0", 5.0, [1.06, 1.08, 1.07, 1.06])
    text = study.summarise(tmp_path)
    aa = next(ln for ln in text.splitlines() if ln.startswith("| unchanged | quiet"))
    assert "0.9900 +- 0.00% (n=2)" in aa and "1.0100 +- 0.00% (n=2)" in aa and "0.0000 (false alarms)" in aa
    slow = next(ln for ln in text.splitlines() if ln.startswith("| +5%"))
    assert "1.0000 (detected)" in slow
    # rounds at 1.03 with sd 2.3 %: never sure, the cap, then FAIL on the midpoint
    se = 0.023 / TH["round_sd_scale"]
    assert study.implied_rates([(1.03, se)] * 10, TH, n=100) == (1.0, TH["max_pairs"])
    # pooled with another study: an unchanged round counts as measured; a slowed one by its distance from its
    # entry's centre (e0: 1.06 then 1.08, so +-ln(1.08/1.06)/2, x sqrt(2/1) for the centre taken from 2 rounds),
    # placed on the unchanged rounds' centre (ln 0.99 + ln 1.01)/2; a gate of shorter rounds is another
    # measurement: shown in the spread by length, left out of the rates; a kind of one round has no centre
    gate("quiet-slow-1", 5.0, [1.08, 1.06, 1.07, 1.08])
    gate("loaded-slow-0", 5.0, [1.2])
    other = tmp_path / "other"
    other.mkdir()
    (other / "quiet-aa-0.json").write_text((tmp_path / "quiet-aa-0.json").read_text())
    gate("quiet-aa-1", 0.0, [0.9, 1.1, 0.9, 1.1], folder=other, steps=60)
    res = study.residuals([tmp_path, other], TH["round_steps"])
    assert len(res["quiet"]) == 16 and not res["loaded"]
    assert len(study.residuals([tmp_path, other])["quiet"]) == 20
    aa_centre = (math.log(0.99) + math.log(1.01)) / 2
    want = sorted([math.log(0.99), math.log(1.01)] * 4 + [aa_centre] * 2
                  + [aa_centre + s * math.log(1.08 / 1.06) / 2 * math.sqrt(2) for s in (-1, 1)] * 3)
    assert [r for r, _ in sorted(res["quiet"])] == pytest.approx(want, abs=1e-12)
    pooled = study.summarise(tmp_path, [other])
    assert "Pooled over" in pooled and f"|           {TH['round_steps']} | quiet     |       16 |" in pooled
    assert "|            60 | quiet     |        4 |" in pooled


def test_a_recorded_gate_replays_under_the_shipped_rule():
    """``study.replay`` on constructed rounds of sd 1.8 % each, worked out against the shipped lines (after 1 round
    pass below 1.0092, no fail yet; after 2 fail above 1.0457; after 4 pass below 1.0208; after 8 1.0227 / 1.0299,
    the cap judged on the midpoint 1.0247); and every committed gate of the shipped rule's kind replays, under the
    rule it ran (its recorded thresholds), to its own recorded verdicts."""
    from bench.gate import study

    def entry(rounds, other="PASS"):
        return {"entry": "e", "verdict": "?", "checks": [{"metric": "counters", "verdict": other}],
                "pairs": [{"order": "AB", "step_ratios": steps_for(r, 0.018)} for r in rounds]}

    cases = [([1.00], "PASS"), ([1.08], None), ([1.08, 1.08], "FAIL"), ([1.026] * 8, "FAIL"), ([1.024] * 8, "PASS"),
             ([1.02] * 4, "PASS")]
    got = study.replay({"verdicts": [entry(r) for r, _ in cases]}, TH)
    assert [speed for _, speed, _ in got] == [want for _, want in cases]
    assert study.replay({"verdicts": [entry([1.08], other="FAIL")]}, TH) == [("e", None, "FAIL")]
    keys = ("detect_pct", "round_sd_scale", "min_round_sd_pct", "false_alarm", "miss", "max_pairs",
            "min_fail_rounds")
    checked = 0
    for f in sorted((ROOT / "results" / "noise").glob("*/*-*-*.json")):
        g = json.loads(f.read_text())
        th = g.get("thresholds", {})
        if any(th.get(k) is None for k in keys):  # a gate from before the sequential rule
            continue
        recorded = [next(c["verdict"] for c in v["checks"] if c["metric"] == "step_time") for v in g["verdicts"]]
        assert [speed for _, speed, _ in study.replay(g, th)] == recorded, f.name  # under its own rule
        checked += 1
    assert checked >= 5  # results/noise/2026-12-04-r120 (the gates of the rule with its rounds' own spread)


def test_the_held_out_loss_is_judged_when_both_revisions_evaluate(tmp_path):
    """The runs evaluate once, after their last step, when both trees know eval_every; a baseline from before
    held-out evaluation would refuse the option, so then neither side gets it (its loss alone is judged)."""
    old = tmp_path / "old" / "bench" / "harness"
    old.mkdir(parents=True)
    (old / "config.py").write_text("class RunConfig:\n    steps: int = 20\n    lr: float = 3e-4\n")
    assert ab_gate.knows(ROOT, "eval_every") and ab_gate.knows(ROOT, "steps")
    assert not ab_gate.knows(tmp_path / "old", "eval_every") and not ab_gate.knows(ROOT, "eval")
    both = ab_gate.Runner(tmp_path / "o1", {"base": ROOT, "cand": ROOT}, {"base": [], "cand": []})
    assert f"eval_every={ab_gate.EVAL_AFTER_LAST}" in both.common
    mixed = ab_gate.Runner(tmp_path / "o2", {"base": tmp_path / "old", "cand": ROOT}, {"base": [], "cand": []})
    assert not any(c.startswith("eval_every") for c in mixed.common)
