"""Read result tables written by bench/run.py into one pandas DataFrame.

``load(paths)`` takes files, folders (their ``*.jsonl`` files; the ``steps/`` sub-folder is the
per-step log, read by ``load_steps``) or glob patterns, one or many. Problems are errors that
name the file (and line): a missing path, an empty selection, a malformed or truncated line,
a table missing required columns.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from bench.results import REQUIRED_COLUMNS


class ResultsError(ValueError):
    """Unusable result input; the message names the file and the problem."""


def _expand(paths) -> list[Path]:
    if isinstance(paths, str | Path):
        paths = [paths]
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(p.glob("*.jsonl"))
            if not found:
                raise ResultsError(f"{p}: folder holds no result tables (*.jsonl)")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(p)))
            if not matches:
                raise ResultsError(f"{p}: no such file, folder or glob match")
            files.extend(_expand(matches))
    return files


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    text = path.read_text()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            last = lineno == len(text.splitlines()) and not text.endswith("\n")
            hint = " (truncated: the last line has no newline)" if last else ""
            raise ResultsError(f"{path}:{lineno}: malformed JSON{hint}: {exc.msg}") from None
        if not isinstance(obj, dict):
            raise ResultsError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
        rows.append(obj)
    return rows


def load(paths: str | Path | Iterable[str | Path], required: list[str] | None = None) -> pd.DataFrame:
    """All rows of the given result tables; adds ``source_file`` (and ``device_name`` from ``device`` where a
    row lacks it). Raises ResultsError on bad input."""
    required = REQUIRED_COLUMNS if required is None else required
    frames = []
    for path in _expand(paths):
        rows = _read_jsonl(path)
        if not rows:
            raise ResultsError(f"{path}: no result rows")
        df = pd.DataFrame(rows)
        missing = [c for c in required if c not in df.columns]
        if missing:
            raise ResultsError(f"{path}: missing required columns {missing}")
        df["source_file"] = str(path)
        frames.append(df)
    if not frames:
        raise ResultsError(f"{paths}: no result files")
    df = pd.concat(frames, ignore_index=True)
    # Rows written by a launcher (a sweep's failed job) have no device_name: fall back to the device type,
    # so grouping by device never drops them.
    if "device_name" not in df.columns:
        df["device_name"] = df["device"]
    df["device_name"] = df["device_name"].fillna(df["device"])
    return df


def load_steps(results_dir: str | Path, run_id: str) -> pd.DataFrame:
    """The per-step log of one run: columns step, phase, loss, step_time_s."""
    path = Path(results_dir) / "steps" / f"{run_id}.jsonl"
    if not path.is_file():
        raise ResultsError(f"{path}: no per-step log for run {run_id}")
    return pd.DataFrame(_read_jsonl(path))
