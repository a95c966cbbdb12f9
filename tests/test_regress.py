"""The regression gate: exact verdicts on synthetic result sets, and a real injected regression
through the CLI (a per-step delay) that fails while an unchanged rerun passes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.gate import regress
from bench.harness.table import append_row
from reports.record import REQUIRED_COLUMNS
from tests.helpers import ROOT, cache_peak, run_cli_forked

pytestmark = pytest.mark.unit


def row(i, strategy="ddp", tps=1000.0, mfu=0.1, mem=10**9, loss=2.5, status="ok", host="h1", **kw):
    r = {c: None for c in REQUIRED_COLUMNS}
    r.update(run_id=f"r{i}", model="tiny", strategy=strategy, world_size=2, device="cpu", device_name="CPU",
             dtype="fp32", seq_len=64, micro_batch=2, grad_accum=1, tokens_per_sec=tps, mfu=mfu, peak_mem_bytes=mem,
             loss=loss, status=status, hostname=host)
    r.update(kw)
    return r


def write(path, rows):
    for r in rows:
        append_row(path, r)
    return path


def verdicts(table):
    return {(r.setup.split()[1], r.metric): r.verdict for r in table.itertuples()}


def test_medians_and_thresholds(tmp_path):
    th = regress.load_thresholds(None)
    base = write(tmp_path / "b", [row(i, tps=t, mfu=t / 1e4) for i, t in enumerate([1000, 1010, 990])])
    # one outlier run among three does not move the median
    ok = write(tmp_path / "c", [row(10 + i, tps=t, mfu=t / 1e4) for i, t in enumerate([995, 1005, 500])])
    v = verdicts(regress.gate(regress._load([base], "b"), regress._load([ok], "c"), th))
    assert v[("ddp", "tokens_per_sec")] == "PASS" and v[("ddp", "mfu")] == "PASS"
    slow = write(tmp_path / "s", [row(20 + i, tps=t, mfu=t / 1e4) for i, t in enumerate([850, 860, 840])])
    table = regress.gate(regress._load([base], "b"), regress._load([slow], "s"), th)
    v = verdicts(table)
    assert v[("ddp", "tokens_per_sec")] == "FAIL" and v[("ddp", "mfu")] == "FAIL"
    assert table[table.metric == "tokens_per_sec"].delta_pct.iloc[0] == pytest.approx(-15.0)
    # between the thresholds: a 9% drop fails MFU (6%) but not raw tokens/s (12%, drift-prone)
    mid = write(tmp_path / "m", [row(30 + i, tps=t, mfu=t / 1e4) for i, t in enumerate([910, 910, 910])])
    v = verdicts(regress.gate(regress._load([base], "b"), regress._load([mid], "m"), th))
    assert v[("ddp", "tokens_per_sec")] == "PASS" and v[("ddp", "mfu")] == "FAIL"


def test_raw_throughput_is_only_compared_on_the_same_machine(tmp_path):
    th = regress.load_thresholds(None)
    base = write(tmp_path / "b", [row(0, tps=1000, mfu=0.1, host="h1")])
    other = write(tmp_path / "c", [row(1, tps=500, mfu=0.1, host="h2")])
    v = verdicts(regress.gate(regress._load([base], "b"), regress._load([other], "c"), th))
    assert v[("ddp", "tokens_per_sec")] == "SKIP" and v[("ddp", "mfu")] == "PASS"


def test_memory_loss_and_status(tmp_path):
    th = regress.load_thresholds(None)
    base = write(tmp_path / "b", [row(0), row(1, strategy="fsdp"), row(2, strategy="single")])
    cand = write(tmp_path / "c", [row(3, mem=int(1.06e9)), row(4, strategy="fsdp", loss=2.5 * (1 + 2e-4)),
                                  row(5, strategy="single", status="error")])
    v = verdicts(regress.gate(regress._load([base], "b"), regress._load([cand], "c"), th))
    assert v[("ddp", "peak_mem_bytes")] == "FAIL" and v[("ddp", "loss")] == "PASS"
    assert v[("fsdp", "loss")] == "FAIL" and v[("fsdp", "peak_mem_bytes")] == "PASS"
    assert v[("single", "status")] == "FAIL"
    lower = write(tmp_path / "l", [row(6, strategy="fsdp", loss=2.5 * (1 - 2e-4))])  # either direction fails
    assert verdicts(regress.gate(regress._load([base], "b"), regress._load([lower], "l"), th))[("fsdp", "loss")] \
        == "FAIL"


def test_missing_setup_fails_and_nothing_in_common_is_unusable(tmp_path):
    th = regress.load_thresholds(None)
    base = write(tmp_path / "b", [row(0), row(1, strategy="fsdp")])
    cand = write(tmp_path / "c", [row(2)])
    v = verdicts(regress.gate(regress._load([base], "b"), regress._load([cand], "c"), th))
    assert v[("fsdp", "status")] == "FAIL"
    other = write(tmp_path / "o", [row(3, strategy="single")])
    with pytest.raises(regress.GateInputError, match="no setup of the baseline"):
        regress.gate(regress._load([base], "b"), regress._load([other], "o"), th)


@pytest.mark.e2e
def test_cli_exit_codes(tmp_path):
    base = write(tmp_path / "b", [row(0)])
    slow = write(tmp_path / "s", [row(1, tps=500, mfu=0.05)])
    cmd = [sys.executable, "-m", "bench.gate"]
    same = subprocess.run([*cmd, f"baseline={base}", f"candidate={base}"], cwd=ROOT, capture_output=True,
                          text=True)
    assert same.returncode == 0 and "all" in same.stdout and "verdict" in same.stdout
    res = subprocess.run([*cmd, f"baseline={base}", f"candidate={slow}"], cwd=ROOT, capture_output=True,
                         text=True)
    assert res.returncode == 1 and "FAIL" in res.stdout and "-50.00%" in res.stdout
    missing = subprocess.run([*cmd, f"baseline={tmp_path / 'nope'}", f"candidate={base}"], cwd=ROOT,
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "nope" in missing.stderr
    bad = tmp_path / "t.yaml"
    bad.write_text("mfu:\n  max_drop: 5\n")
    res = subprocess.run([*cmd, f"baseline={base}", f"candidate={base}", f"thresholds={bad}"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "unknown keys ['max_drop']" in res.stderr


@pytest.mark.e2e
def test_injected_slowdown_is_caught_and_unchanged_rerun_passes(tmp_path):
    """Real runs: tiny single-process, 3 repeats per side alternated; the candidate sleeps three steps' time per
    step, a 4x slowdown (tiny's ~25 ms steps drift between runs on a busy 2-core host: an unchanged rerun has read
    -26 % and -36 % beside the other test worker, so the limit is 50 % and the slowdown far beyond it). Judged on
    tokens/s (same machine): MFU's per-run peak probe varied 62-92 GFLOP/s between identical runs, which a 15-step
    test cannot average out."""
    args = ["model=tiny", "seq_len=64", "micro_batch=2", "steps=15", "warmup=3", "log_every=0", "device=cpu"]
    # a peak the test sets (far above this CPU's): a probe beside the other test worker could come out low enough
    # to make MFU > 1 (status suspect, exit 3), and MFU is not what this test judges
    env = cache_peak(tmp_path / "cache", 1e15)
    # one calibration run first (the slowdown is its step time; not compared), then three rounds of the three
    # sides alternated, each run in its own process forked from one warmed interpreter (tests/helpers.py
    # run_cli_forked): every side meets the same moments of a shared host
    first = run_cli_forked([[*args, f"results_dir={tmp_path / 'calibrate'}"]], tmp_path, env=env)
    assert first[0].returncode == 0, first[0].stderr[-2000:]
    step = json.loads((tmp_path / "calibrate" / "runs.jsonl").read_text().splitlines()[0])["step_time_median_s"]
    sides = {"base": [], "same": [], "slow": [f"debug_delay_s={3 * step:.5f}"]}
    argvs = [[*args, *extra, f"results_dir={tmp_path / side}"] for i in range(3) for side, extra in sides.items()]
    for res in run_cli_forked(argvs, tmp_path, env=env):
        assert res.returncode == 0, res.stderr[-2000:]
    # Thresholds for this short test (15 steps, noisier than the CI suite's 30): the point is the
    # mechanism -- an injected 4x slowdown (-75 %) fails, an unchanged rerun passes (reads of -26 % and -36 % beside
    # the other test worker failed tighter limits); docs/gate.md gives the real ones.
    th = tmp_path / "th.yaml"
    th.write_text("tokens_per_sec:\n  max_drop_pct: 50.0\n  same_machine_only: true\n"
                  "peak_mem_bytes:\n  max_rise_pct: 10.0\nloss:\n  max_rel_diff: 1.0e-4\n"
                  "status:\n  ok_must_stay_ok: true\n")
    cmd = [sys.executable, "-m", "bench.gate", f"thresholds={th}", f"baseline={tmp_path / 'base'}"]
    same = subprocess.run([*cmd, f"candidate={tmp_path / 'same'}"], cwd=ROOT, capture_output=True, text=True)
    slow = subprocess.run([*cmd, f"candidate={tmp_path / 'slow'}"], cwd=ROOT, capture_output=True, text=True)
    assert slow.returncode == 1, slow.stdout
    assert any("tokens_per_sec" in ln and "FAIL" in ln for ln in slow.stdout.splitlines())
    assert same.returncode == 0, same.stdout


def test_noise_analysis_counts_false_alarms_and_detections(tmp_path):
    """bench/gate/noise.py's arithmetic on synthetic runs: steady unchanged runs never alarm, a 10% MFU drop
    is detected against a 6% threshold, and a 3% drop is not."""
    from bench.gate import noise

    def runs(folder, mfu_scale, n=6):
        for i in range(n):
            for tag, strategy in (("ci_suite:single", "single"), ("ci_suite:ddp", "ddp")):
                r = row(f"{folder}{i}{strategy}", strategy=strategy, tps=1000.0 * mfu_scale, mfu=0.1 * mfu_scale)
                r.update(tag=tag, timestamp=f"2026-01-01T00:00:{i:02d}")
                append_row(tmp_path / folder, r)

    runs("unchanged", 1.0)
    runs("slowed", 0.9)
    text = noise.analyse(tmp_path)
    assert "False alarms (unchanged vs unchanged, whole gate): 0/2" in text
    assert "Detection of a 10% slowdown (per entry, MFU or tokens/s check): 8/8 = 100%" in text
    (tmp_path / "slowed" / "runs.jsonl").unlink()
    runs("slowed", 0.97)
    assert "0/8 = 0%" in noise.analyse(tmp_path)


def test_no_common_setup_names_the_fields_that_differ(tmp_path):
    th = regress.load_thresholds(None)
    base = write(tmp_path / "b", [row(0, device_name="Intel(R) Xeon(R)")])
    cand = write(tmp_path / "c", [row(1, device_name="AMD EPYC")])
    with pytest.raises(regress.GateInputError) as err:
        regress.gate(regress._load([base], "b"), regress._load([cand], "c"), th)
    msg = str(err.value)
    assert "nearest candidate differs in device_name 'Intel(R) Xeon(R)' vs 'AMD EPYC'" in msg and "ab=true" in msg


def test_suspect_rows_are_not_compared(tmp_path):
    """A row with mfu > 1 (written before the suspect status existed) is marked suspect on load and left out,
    so its impossible MFU is never reported as an improvement."""
    th = regress.load_thresholds(None)
    base = write(tmp_path / "b", [row(0, mfu=0.5)])
    cand = write(tmp_path / "c", [row(1, mfu=1.09, hfu=1.09), row(2, mfu=0.49)])
    df = regress._load([cand], "c")
    assert list(df.status) == ["suspect", "ok"] and "cannot be true" in df.error.iloc[0]
    table = regress.gate(regress._load([base], "b"), df, th)
    mfu = table[table.metric == "mfu"].iloc[0]
    assert mfu.candidate == pytest.approx(0.49) and mfu.verdict == "PASS"
