"""Result tables: one JSON object per line in ``<results_dir>/runs.jsonl``, pandas-readable
(``reports.load`` or ``pandas.read_json(path, lines=True)``), plus a per-step log per run in
``<results_dir>/steps/<run_id>.jsonl``.

Appends are atomic: the row is serialised first, then written with a single ``write`` to a
file opened with O_APPEND under an exclusive ``flock``, then fsync'd. Concurrent runs never
interleave, and a run killed at any point leaves either its whole row or none. The per-step
log is written to a temporary file and renamed into place.

``claim_run`` makes sure one run writes one row even when several ranks fail at once.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from pathlib import Path

RUNS_FILE = "runs.jsonl"

# The columns every row has (reports.load checks them). Definitions: bench/metrics.py,
# bench/memory.py, bench/nvml.py, bench/peak_flops.py; config fields: bench/config.py.
REQUIRED_COLUMNS = [
    "run_id", "timestamp", "model", "strategy", "world_size", "nnodes", "device", "dtype", "seq_len",
    "micro_batch", "grad_accum", "global_batch_tokens", "steps", "warmup", "tokens_per_sec",
    "tokens_per_sec_per_device", "step_time_median_s", "step_time_p10_s", "step_time_p90_s", "mfu", "hfu",
    "peak_flops", "peak_flops_source", "peak_mem_bytes", "peak_reserved_bytes", "loss", "status", "error",
    "git_sha", "torch_version", "hostname",
]


def _clean(value):
    """JSON has no NaN/Inf: store them as null (a NaN loss is told by status='nan')."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def append_row(results_dir: str | Path, row: dict) -> Path:
    """Append ``row`` as one line to ``results_dir/runs.jsonl`` atomically; returns the file."""
    missing = [c for c in REQUIRED_COLUMNS if c not in row]
    if missing:
        raise ValueError(f"result row lacks required columns: {missing}")
    path = Path(results_dir) / RUNS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(_clean(row), allow_nan=False, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
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


def claim_run(results_dir: str | Path, run_id: str) -> bool:
    """True for the first caller per run_id (any process), False after: decides who writes an error row."""
    folder = Path(results_dir) / ".claims"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(folder / run_id, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except FileExistsError:
        return False
