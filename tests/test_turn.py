"""Turn taking between two jobs (bench/harness/turn.py): real processes alternate step by step, never overlap,
and a job that stops early never leaves the other waiting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.harness.turn import ENV_FILE, ENV_SIDE, write_turn
from tests.helpers import ROOT

pytestmark = pytest.mark.dist

# A job: N "steps" of ~20 ms busy work, each logged with its start and end (monotonic clock).
_JOB = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from bench.harness.turn import get_turnstile
log, steps, stop_at = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
turn = get_turnstile(0, timeout_s=60)
try:
    for k in range(steps):
        if k == stop_at:
            raise RuntimeError("stops early")
        turn.wait(k)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.02:
            pass
        t1 = time.monotonic()
        with open(log, "a") as f:
            f.write(json.dumps([k, t0, t1]) + "\\n")
        turn.done(k)
except RuntimeError:
    turn.release()
    sys.exit(3)
turn.finish(steps)
"""


def run_pair(tmp_path, steps=8, stop=(-1, -1)):
    turn = tmp_path / "turn"
    write_turn(turn, "F 0")
    procs = []
    for side, stop_at in zip("FS", stop):
        env = {**os.environ, ENV_FILE: str(turn), ENV_SIDE: side}
        procs.append(subprocess.Popen([sys.executable, "-c", _JOB, str(ROOT), str(tmp_path / side), str(steps),
                                       str(stop_at)], env=env))
    codes = [p.wait(timeout=60) for p in procs]
    logs = {s: [json.loads(x) for x in (tmp_path / s).read_text().splitlines()] for s in "FS"}
    return codes, logs


def test_two_jobs_alternate_step_by_step_without_overlap(tmp_path):
    codes, logs = run_pair(tmp_path)
    assert codes == [0, 0]
    events = sorted([(t0, t1, side, k) for side in "FS" for k, t0, t1 in logs[side]])
    assert [(side, k) for _, _, side, k in events] == [(s, k) for k in range(8) for s in "FS"]
    for (_, end, *_), (start, *_) in zip(events, events[1:]):
        assert start >= end  # the next step starts only after the previous one ended


def test_a_job_that_stops_early_frees_the_other(tmp_path):
    codes, logs = run_pair(tmp_path, steps=8, stop=(3, -1))
    assert codes == [3, 0]
    assert [k for k, *_ in logs["F"]] == [0, 1, 2] and [k for k, *_ in logs["S"]] == list(range(8))
