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

One run, one row: a run first claims its id (``claim_id``: ``mkdir .claims/<run_id>``, which exactly one
process can win, so two runs started at once with one id cannot both proceed), and ``append_row`` checks
under the table's lock that no row with the id exists before it writes. The check and the write are one
operation, so when several ranks fail at once, the first to append writes the run's row and the others
find it (``DuplicateRun``), and a writer killed at any point never stops another from writing the row.
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


class DuplicateRun(ValueError):
    """The table already holds a row with this run_id (nothing was written)."""


def _has_id(fd: int, size: int, run_id) -> bool:
    """Whether the open table (its first ``size`` bytes) holds a row whose run_id is ``run_id``: the id's JSON
    text is searched for, and each line that holds it is parsed (a torn or foreign line is not a row)."""
    needle = json.dumps(run_id).encode()
    data = os.pread(fd, size, 0) if size else b""
    at = data.find(needle)
    while at != -1:
        start, end = data.rfind(b"\n", 0, at) + 1, data.find(b"\n", at)
        end = len(data) if end == -1 else end
        try:
            row = json.loads(data[start:end])
        except ValueError:
            row = None
        if isinstance(row, dict) and row.get("run_id") == run_id:
            return True
        at = data.find(needle, end)
    return False


def append_row(results_dir: str | Path, row: RunRecord | dict) -> Path:
    """Append ``row`` (a RunRecord, or a dict with at least REQUIRED_COLUMNS) as one line to
    ``results_dir/runs.jsonl`` atomically; returns the file. Raises ``DuplicateRun`` (writing nothing) when a
    row with the same run_id is already there: the check and the append hold the lock together."""
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
        if _has_id(fd, size, row["run_id"]):
            raise DuplicateRun(f"{path} already holds a row with run_id={row['run_id']!r}")
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


STEPS = "steps"  # the per-step logs' folder
CLAIMS = ".claims"  # the runs' id claims and rank notes


def _probe(folder: Path, name_len: int) -> str | None:
    """Create, write and remove a file with a name ``name_len`` characters long in ``folder``; why not, or None."""
    stem = f".probe-{os.getpid()}-"
    name = stem + "x" * max(0, name_len - len(stem))
    try:
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"\n")
        finally:
            os.close(fd)
        os.unlink(folder / name)
    except OSError as exc:
        return f"cannot create a file in {folder}: {exc.strerror or exc}"
    return None


def write_problem(folder: str | Path, name_len: int, table: bool = True) -> str | None:
    """Why a run could not write what it writes into ``folder`` (with ``table``: a results folder, its
    ``runs.jsonl``, ``steps/`` and ``.claims/``), or None, found by doing it: a file named as long as the
    longest name the run will create (``name_len`` + the suffixes) is created and removed in every one of those
    folders that exists, else in the nearest folder that does (where the run's ``mkdir`` will make them), and an
    existing table is opened for appending. Leaves nothing behind."""
    root = Path(folder).expanduser().absolute()
    subs = [root, root / STEPS, root / CLAIMS] if table else [root]
    for f in subs:
        if f.exists() and not f.is_dir():
            return f"{'it' if f == root else f} exists and is not a folder"
    if table and (root / RUNS_FILE).is_dir():
        return f"holds a folder named {RUNS_FILE} where the table goes"
    for f in subs:
        target = f
        while not target.exists():
            target = target.parent
        if not target.is_dir():
            return f"{target} is not a folder"
        problem = _probe(target, name_len + 24)
        if problem:
            return problem
    if table and (root / RUNS_FILE).exists():
        try:
            os.close(os.open(root / RUNS_FILE, os.O_WRONLY | os.O_APPEND))
        except OSError as exc:
            return f"cannot append to {root / RUNS_FILE}: {exc.strerror or exc}"
    return None


def write_steps(results_dir: str | Path, run_id: str, steps: list[dict]) -> Path:
    """Write the per-step log (one JSON object per step) atomically via rename."""
    folder = Path(results_dir) / STEPS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{run_id}.jsonl"
    tmp = folder / f".{run_id}.{os.getpid()}.tmp"
    tmp.write_text("".join(json.dumps(_clean(s), allow_nan=False) + "\n" for s in steps))
    os.replace(tmp, path)
    return path


def run_ids(results_dir: str | Path) -> set[str]:
    """The run_ids already in ``results_dir/runs.jsonl``."""
    return {r.get("run_id") for r in read_rows(results_dir)}


def claim_folder(results_dir: str | Path, run_id: str) -> Path:
    """The run's own folder under ``.claims``: its id claim, and its ranks' notes (``register_rank``)."""
    return Path(results_dir) / CLAIMS / run_id


def claim_id(results_dir: str | Path, run_id: str) -> str | None:
    """Claim ``run_id`` for this process's run (``mkdir``: atomic, one winner on any local or NFS file system).
    Returns None when claimed, else one line saying who holds it. A claim is never released: an id names one
    run, finished or not."""
    folder = claim_folder(results_dir, run_id)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir()
    except FileExistsError:
        try:
            owner = (folder / "owner").read_text().strip() or "?"
        except OSError:
            owner = "?"
        return (f"run_id={run_id!r} is already claimed by another run (host pid: {owner}; "
                f"{folder}); run ids are unique: choose another")
    (folder / "owner").write_text(f"{socket.gethostname()} {os.getpid()}\n")
    return None


def register_rank(results_dir: str | Path, run_id: str, rank: int) -> None:
    """Note this rank's host and pid for the run, so a survivor can name a rank that died (``dead_ranks``)."""
    folder = claim_folder(results_dir, run_id) / "ranks"
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
        dead = _dead_now(claim_folder(results_dir, run_id) / "ranks")
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
