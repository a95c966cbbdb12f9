"""Result tables: one JSON object per line in ``<results_dir>/runs.jsonl``, pandas-readable
(``reports.load`` or ``pandas.read_json(path, lines=True)``), plus a per-step log per run in
``<results_dir>/steps/<run_id>.jsonl``.

Appends are atomic: the row is serialised first, then written with a single ``write`` to a
file opened with O_APPEND under an exclusive ``flock``, then fsync'd. Concurrent runs never
interleave, and a run killed at any point leaves either its whole row or none. A table whose last
line was cut short by someone else (a crash mid-write of another tool, a full disk, a copy) has no
final newline: the writer terminates that fragment first, so the new row is never glued to it and
lost; readers (reports.load) skip the fragment with a warning naming file:line. Tested by SIGKILLing
writers at random points (tests/test_results.py). The per-step log is written to a temporary file
and renamed into place.

``claim_run`` makes sure one run writes one row even when several ranks fail at once.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import socket
import time
from pathlib import Path

from reports.load import read_rows
from reports.record import REQUIRED_COLUMNS, RUNS_FILE, RunRecord


def _clean(value):
    """JSON has no NaN/Inf: store them as null (a NaN loss is told by status='nan')."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def append_row(results_dir: str | Path, row: RunRecord | dict) -> Path:
    """Append ``row`` (a RunRecord, or a dict with at least REQUIRED_COLUMNS) as one line to
    ``results_dir/runs.jsonl`` atomically; returns the file."""
    if isinstance(row, RunRecord):
        row = row.to_row()
    missing = [c for c in REQUIRED_COLUMNS if c not in row]
    if missing:
        raise ValueError(f"result row lacks required columns: {missing}")
    path = Path(results_dir) / RUNS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(_clean(row), allow_nan=False, default=str) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn last line: end it, keep our row whole
            data = b"\n" + data
        written = os.write(fd, data)
        if written != len(data):  # never expected for a regular file; refuse to leave half a row
            os.ftruncate(fd, os.fstat(fd).st_size - written)
            raise OSError(f"short write to {path}")
        os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    return path


def write_steps(results_dir: str | Path, run_id: str, steps: list[dict]) -> Path:
    """Write the per-step log (one JSON object per step) atomically via rename."""
    folder = Path(results_dir) / "steps"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{run_id}.jsonl"
    tmp = folder / f".{run_id}.{os.getpid()}.tmp"
    tmp.write_text("".join(json.dumps(_clean(s), allow_nan=False) + "\n" for s in steps))
    os.replace(tmp, path)
    return path


def run_ids(results_dir: str | Path) -> set[str]:
    """The run_ids already in ``results_dir/runs.jsonl``."""
    return {r.get("run_id") for r in read_rows(results_dir)}


def claim_run(results_dir: str | Path, run_id: str) -> bool:
    """True for the first caller per run_id (any process), False after: decides who writes an error row."""
    folder = Path(results_dir) / ".claims"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(folder / run_id, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except FileExistsError:
        return False


def register_rank(results_dir: str | Path, run_id: str, rank: int) -> None:
    """Note this rank's host and pid for the run, so a survivor can name a rank that died (``dead_ranks``)."""
    folder = Path(results_dir) / ".claims" / f"{run_id}.ranks"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(rank)).write_text(f"{socket.gethostname()} {os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) is dead too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def dead_ranks(results_dir: str | Path, run_id: str, wait_s: float = 1.0) -> list[int]:
    """Ranks of the run on this host whose process no longer exists (other hosts' ranks cannot be checked).
    Called on the error path only: a killed peer's sockets close (and our collective fails) a moment before
    the kernel marks the process dead, so look again for up to ``wait_s`` seconds before answering none."""
    deadline = time.monotonic() + wait_s
    while True:
        dead = _dead_now(Path(results_dir) / ".claims" / f"{run_id}.ranks")
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(0.05)


def _dead_now(folder: Path) -> list[int]:
    host, dead = socket.gethostname(), []
    for f in sorted(folder.glob("*"), key=lambda f: int(f.name) if f.name.isdigit() else -1):
        try:
            h, pid = f.read_text().split()
        except (OSError, ValueError):
            continue
        if h == host and f.name.isdigit() and not _alive(int(pid)):
            dead.append(int(f.name))
    return dead
