"""Result tables: atomic appends under concurrency, one id claim per run, one row per run id, and clear load errors."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from bench.harness import table
from bench.harness.table import DuplicateRun, append_row, claim_id, register_rank, run_ids, write_steps
from reports import ResultsError, load, load_steps
from reports.load import BadValueWarning, TornLineWarning
from reports.record import REQUIRED_COLUMNS

pytestmark = pytest.mark.unit


def make_row(i: int, **kw) -> dict:
    row = {c: None for c in REQUIRED_COLUMNS}
    row.update(run_id=f"r{i}", model="tiny", strategy="single", status="ok", tokens_per_sec=float(i),
               config={"nested": {"i": i}, "blob": "x" * 5000}, **kw)
    return row


def _writer(path, start, n):
    for i in range(start, start + n):
        append_row(path, make_row(i))


def test_concurrent_appends_never_interleave(tmp_path):
    procs = [mp.get_context("fork").Process(target=_writer, args=(tmp_path, k * 100, 60)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    df = load(tmp_path)
    assert len(df) == 240 and sorted(df.run_id) == sorted(f"r{k * 100 + i}" for k in range(4) for i in range(60))
    assert all(len(c["blob"]) == 5000 for c in df.config)
    assert pd.read_json(tmp_path / "runs.jsonl", lines=True).shape[0] == 240  # pandas reads it directly


def test_nan_and_inf_become_null(tmp_path):
    append_row(tmp_path, make_row(1, loss=float("nan"), mfu=float("inf")))
    line = (tmp_path / "runs.jsonl").read_text()
    assert "NaN" not in line and json.loads(line)["loss"] is None


def test_row_without_required_columns_is_refused(tmp_path):
    with pytest.raises(ValueError, match="tokens_per_sec"):
        append_row(tmp_path, {"run_id": "x"})
    assert not (tmp_path / "runs.jsonl").exists()


def test_one_claim_per_run_id_and_no_claim_mistaken_for_another(tmp_path):
    assert claim_id(tmp_path, "abc") is None
    again = claim_id(tmp_path, "abc")
    assert "run_id='abc' is already claimed by another run" in again and f"{os.getpid()}" in again
    register_rank(tmp_path, "abc", 1)
    # the ids 'abc.ranks' and 'abc' once shared a path (the ranks' folder of one was the claim of the other)
    assert claim_id(tmp_path, "abc.ranks") is None and claim_id(tmp_path, "def") is None


def _claim_then_append(path, run_id, box):
    refused = claim_id(path, run_id)
    if refused is None:
        append_row(path, make_row(0) | {"run_id": run_id})
    box.put(refused)


def test_two_runs_started_at_once_with_one_id_leave_one_row_in_20_of_20(tmp_path):
    ctx = mp.get_context("fork")
    for k in range(20):
        box = ctx.Queue()
        procs = [ctx.Process(target=_claim_then_append, args=(tmp_path, f"same-{k}", box)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        answers = [box.get(), box.get()]
        assert sorted(a is None for a in answers) == [False, True], answers  # one claims, one is refused
    assert sorted(load(tmp_path).run_id) == sorted(f"same-{k}" for k in range(20))


def test_a_second_row_with_one_id_is_refused_under_the_lock(tmp_path):
    append_row(tmp_path, make_row(1))
    before = (tmp_path / "runs.jsonl").read_bytes()
    with pytest.raises(DuplicateRun, match="run_id='r1'"):
        append_row(tmp_path, make_row(1) | {"status": "error"})
    assert (tmp_path / "runs.jsonl").read_bytes() == before
    append_row(tmp_path, make_row(11))  # 'r1' inside another id or value is not the id
    assert list(load(tmp_path).run_id) == ["r1", "r11"]


def _killed_at_write(path, half):
    """A writer that dies holding the table's lock: before its write, or after writing half its row."""
    real = os.write

    def die(fd, data):
        if half:
            real(fd, data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    table.os.write = die
    append_row(path, make_row(7))


@pytest.mark.parametrize("half", [False, True], ids=["before-write", "mid-write"])
def test_a_writer_killed_holding_the_lock_stops_no_other_writer_of_the_run(tmp_path, half):
    """Two ranks of one failed run write its row; the first dies inside append_row (forced, not waited for):
    the second still writes the run's row, exactly once, and the table loads."""
    append_row(tmp_path, make_row(1))
    p = mp.get_context("fork").Process(target=_killed_at_write, args=(tmp_path, half))
    p.start()
    p.join()
    assert p.exitcode == -signal.SIGKILL
    text = (tmp_path / "runs.jsonl").read_text()
    assert text.count('"run_id": "r7"') == (1 if half else 0) and text.endswith("\n") is not half
    append_row(tmp_path, make_row(7) | {"status": "error"})  # the other rank
    with pytest.warns(TornLineWarning) if half else contextlib.nullcontext():
        df = load(tmp_path)
    assert list(df.run_id) == ["r1", "r7"] and df.status.iloc[1] == "error"


def test_a_row_is_one_write_of_the_whole_line(tmp_path, monkeypatch):
    """The promise behind "whole row or none": the line goes to the file in a single write(2) call, under the
    lock (two calls could be split by a crash, and by another writer that does not lock)."""
    calls = []
    real = os.write

    def counting(fd, data):
        calls.append(bytes(data))
        return real(fd, data)

    monkeypatch.setattr(table.os, "write", counting)
    append_row(tmp_path, make_row(1))
    append_row(tmp_path, make_row(2))
    assert len(calls) == 2 and all(c.endswith(b"\n") and c.count(b"\n") == 1 for c in calls)
    assert b"".join(calls) == (tmp_path / "runs.jsonl").read_bytes()


@pytest.mark.parametrize("make, problem", [
    (lambda d: (d / "steps").write_text("x"), "steps exists and is not a folder"),
    (lambda d: (d / ".claims").write_text("x"), ".claims exists and is not a folder"),
    (lambda d: ((d / "runs.jsonl").unlink(), (d / "runs.jsonl").mkdir()), "holds a folder named runs.jsonl"),
])
def test_write_problem_finds_what_would_fail_and_leaves_nothing(tmp_path, make, problem):
    d = tmp_path / "res"
    assert table.write_problem(d, 200) is None and not d.exists()  # proved by doing, nothing left behind
    d.mkdir()
    append_row(d, make_row(1))
    before = sorted(p.name for p in d.iterdir())
    assert table.write_problem(d, 200) is None and sorted(p.name for p in d.iterdir()) == before
    make(d)
    assert problem in table.write_problem(d, 200)
    assert "cannot create a file in /proc" in table.write_problem("/proc/n00bgpt/x", 10)
    assert "name too long" in table.write_problem(tmp_path, 300).lower()


def test_reports_warn_about_text_in_numeric_columns_and_repeated_ids(tmp_path):
    append_row(tmp_path, make_row(1))
    append_row(tmp_path, make_row(2))
    with open(tmp_path / "runs.jsonl", "a") as f:  # written by hand: a text number, a copied row
        f.write(json.dumps(make_row(3) | {"tokens_per_sec": "fast"}) + "\n" + json.dumps(make_row(1)) + "\n")
    with pytest.warns(BadValueWarning) as got:
        df = load(tmp_path)
    msgs = [str(w.message) for w in got]
    assert any("runs.jsonl:3: column 'tokens_per_sec' holds 'fast', not a number" in m for m in msgs)
    assert any("runs.jsonl:4: run_id 'r1' is also the run at" in m and "runs.jsonl:1" in m for m in msgs)
    assert df.tokens_per_sec.isna().tolist() == [False, False, True, False]  # never plotted as a number
    assert pd.api.types.is_numeric_dtype(df.tokens_per_sec)


def test_steps_log_round_trip(tmp_path):
    write_steps(tmp_path, "r1", [{"step": 0, "loss": 1.5, "step_time_s": None}, {"step": 1, "loss": 1.2,
                                                                                "step_time_s": 0.1}])
    df = load_steps(tmp_path, "r1")
    assert list(df.loss) == [1.5, 1.2]
    with pytest.raises(ResultsError, match="no per-step log"):
        load_steps(tmp_path, "nope")


def test_load_errors_name_the_file_and_problem(tmp_path):
    with pytest.raises(ResultsError, match="no such file"):
        load(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ResultsError, match="holds no result tables"):
        load(empty)
    append_row(tmp_path, make_row(1))
    good = (tmp_path / "runs.jsonl").read_text()
    trunc = tmp_path / "trunc.jsonl"
    trunc.write_text(good + good[: len(good) // 2])
    with pytest.raises(ResultsError, match=r"trunc.jsonl:2: malformed JSON \(truncated"):
        load(trunc, strict=True)
    with pytest.warns(TornLineWarning, match=r"trunc.jsonl:2: skipped: malformed JSON \(truncated"):
        assert list(load(trunc).run_id) == ["r1"]
    nocol = tmp_path / "nocol.jsonl"
    nocol.write_text(json.dumps({"run_id": "x", "model": "tiny"}) + "\n")
    with pytest.raises(ResultsError, match=r"nocol.jsonl: missing required columns \['timestamp'"):
        load(nocol)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n")
    with pytest.raises(ResultsError, match="blank.jsonl: no result rows"):
        load(blank)


def test_load_accepts_files_folders_and_globs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    append_row(a, make_row(1))
    append_row(b, make_row(2))
    assert len(load([a, b])) == 2
    assert len(load(str(tmp_path / "*"))) == 2
    assert set(load(a / "runs.jsonl").source_file) == {str(a / "runs.jsonl")}


def test_append_after_a_torn_last_line_keeps_the_new_row(tmp_path):
    append_row(tmp_path, make_row(1))
    table = tmp_path / "runs.jsonl"
    with open(table, "a") as f:
        f.write('{"run_id": "torn", "mod')  # a writer that died mid-line
    append_row(tmp_path, make_row(2))
    with pytest.warns(TornLineWarning, match="runs.jsonl:2: skipped"):
        assert list(load(tmp_path).run_id) == ["r1", "r2"]
    assert run_ids(tmp_path) == {"r1", "r2"}


# A writer process: appends rows r<start>.. and prints each id once append_row has returned (= completed).
# With "torn", it first writes half a row under the table's lock, as a writer killed mid-write would
# (a tool that skips the lock can interleave with anyone; append_row cannot guard against that).
_WRITER = """
import fcntl, sys
sys.path.insert(0, sys.argv[1])
from bench.harness.table import append_row
from reports.record import REQUIRED_COLUMNS
path, start, torn = sys.argv[2], int(sys.argv[3]), sys.argv[4] == "torn"
if torn:
    with open(path + "/runs.jsonl", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write('{"run_id": "fragment-' + str(start) + '", "model": "ti')
for i in range(start, start + 400):
    row = dict.fromkeys(REQUIRED_COLUMNS)
    row.update(run_id=f"r{i}", model="tiny", status="ok", config={"blob": "x" * 5000})
    append_row(path, row)
    print(f"r{i}", flush=True)
"""


@pytest.mark.e2e
def test_writers_killed_at_random_points_lose_no_completed_row(tmp_path):
    """SIGKILL 60 writers (two at a time, some leaving a torn line first) at random moments: every row a
    writer reported complete is in the table exactly once, nothing is duplicated, and the table loads."""
    from tests.helpers import ROOT

    rng = random.Random(0)
    done: list[str] = []
    for k in range(30):
        procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(ROOT), str(tmp_path), str((2 * k + j) * 1000),
                                   "torn" if rng.random() < 0.3 else "whole"], stdout=subprocess.PIPE, text=True)
                 for j in range(2)]
        time.sleep(rng.uniform(0.1, 0.5))  # interpreter start-up (~0.05 s) + a random number of rows
        for p in procs:
            os.kill(p.pid, signal.SIGKILL)
        for p in procs:
            out, _ = p.communicate()
            done += out.split()  # only lines printed in full after append_row returned
    ids = [json.loads(line)["run_id"] for line in (tmp_path / "runs.jsonl").read_text().splitlines()
           if line.startswith("{") and line.endswith("}")]
    assert len(done) > 50  # the kills did land after some rows
    assert len(ids) == len(set(ids))  # exactly once
    assert set(done) <= set(ids)
    torn = "fragment" in (tmp_path / "runs.jsonl").read_text()
    with pytest.warns(TornLineWarning) if torn else contextlib.nullcontext():
        df = load(tmp_path)
    assert set(done) <= set(df.run_id) and len(df) == len(ids)

