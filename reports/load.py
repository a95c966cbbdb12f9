"""Read result tables written by bench/run.py into one pandas DataFrame.

The one reader of each file format: ``read_rows`` (a table's rows as dicts: what writers, launchers and the gate
use) and ``load(paths)`` (rows as a DataFrame: what reports use) for ``runs.jsonl``; ``read_steps`` and
``load_steps`` (and ``timed_step_times``) for the per-step logs in ``steps/<run_id>.jsonl``.

``load(paths)`` takes files, folders (their ``*.jsonl`` files; the ``steps/`` sub-folder is the
per-step log, read by ``load_steps``) or glob patterns, one or many. Problems are errors that
name the file (and line): a missing path, an empty selection, a table missing required columns.
A torn or unparsable line (a writer killed mid-line, a truncated copy) is skipped with a warning
naming file:line, so one bad line never hides the complete rows around it; ``strict=True`` makes
it an error instead.
"""

from __future__ import annotations

import glob
import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from reports.record import MEASURED, NUMERIC_COLUMNS, REQUIRED_COLUMNS, RUNS_FILE, implausible

if TYPE_CHECKING:  # pandas is imported on use: the harness imports reports.record without it
    import pandas as pd


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


class TornLineWarning(UserWarning):
    """A result-table line that is not a complete JSON object was skipped."""


class BadValueWarning(UserWarning):
    """A row's value that cannot be what its column holds (text in a numeric column: read as missing), or a
    run_id that an earlier row already has."""


def _checked(path: Path, rows: list[tuple[int, dict]], seen: dict) -> None:
    """Warn, naming file:line, about values a numeric column cannot hold (they are read as missing, so no
    report plots or ranks them as numbers) and about run ids met before (``seen``: run_id -> file:line)."""
    for lineno, row in rows:
        for c in NUMERIC_COLUMNS:
            v = row.get(c)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
                warnings.warn(f"{path}:{lineno}: column {c!r} holds {v!r}, not a number: read as missing",
                              BadValueWarning, stacklevel=3)
                row[c] = None
        rid = row.get("run_id")
        if isinstance(rid, str | int) and not isinstance(rid, bool):
            if rid in seen:
                warnings.warn(f"{path}:{lineno}: run_id {rid!r} is also the run at {seen[rid]}: run ids are unique, "
                              "so one of the two rows was copied or written by hand", BadValueWarning, stacklevel=3)
            else:
                seen[rid] = f"{path}:{lineno}"


def _read_jsonl(path: Path, strict: bool = False, warn: bool = True, numbered: bool = False) -> list:
    """The JSON objects of the file's lines (with ``numbered``: (line number, object) pairs)."""
    rows = []
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        problem = None
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                problem = f"expected a JSON object per line, got {type(obj).__name__}"
        except json.JSONDecodeError as exc:
            last = lineno == len(lines) and not text.endswith("\n")
            problem = f"malformed JSON{' (truncated: the last line has no newline)' if last else ''}: {exc.msg}"
        if problem:
            if strict:
                raise ResultsError(f"{path}:{lineno}: {problem}")
            if warn:
                warnings.warn(f"{path}:{lineno}: skipped: {problem}", TornLineWarning, stacklevel=3)
            continue
        rows.append((lineno, obj) if numbered else obj)
    return rows


def load(paths: str | Path | Iterable[str | Path], required: list[str] | None = None,
         strict: bool = False) -> pd.DataFrame:
    """All rows of the given result tables; adds ``source_file`` (and ``device_name`` from ``device`` where a
    row lacks it). Raises ResultsError on bad input; torn lines are skipped with a warning (``strict``: error)."""
    import pandas as pd

    required = REQUIRED_COLUMNS if required is None else required
    frames, seen = [], {}
    for path in _expand(paths):
        numbered = _read_jsonl(path, strict, numbered=True)
        if not numbered:
            raise ResultsError(f"{path}: no result rows")
        _checked(path, numbered, seen)
        df = pd.DataFrame([row for _, row in numbered])
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
    # Rows written before model.source existed ran the family's model.
    df["model_source"] = df["model_source"].fillna("native") if "model_source" in df.columns else "native"
    # A number that cannot be true is never 'ok' (reports/record.py: implausible). Rows written before that
    # rule existed are marked here, so no reader ranks or compares them.
    ok = df.status.isin(MEASURED)
    if ok.any():
        nums = df.loc[ok, ["mfu", "hfu", "peak_flops"]].apply(pd.to_numeric, errors="coerce")
        reasons = [implausible({"mfu": m, "hfu": h, "peak_flops": p, "peak_flops_source": src})
                   for (m, h, p), src in zip(nums.itertuples(False), df.loc[ok, "peak_flops_source"])]
        bad = pd.Series(reasons, index=df.index[ok]).dropna()
        if len(bad):
            df["error"] = df["error"].astype(object)
            df.loc[bad.index, "error"] = bad.values
            df.loc[bad.index, "status"] = "suspect"
    return df


def read_rows(results_dir: str | Path) -> list[dict]:
    """The complete rows of ``results_dir/runs.jsonl`` as dicts, in order (torn or unparsable lines skipped
    silently; [] without a table): what writers, launchers and the gate read. ``load`` says what it skips."""
    path = Path(results_dir) / RUNS_FILE
    try:
        return _read_jsonl(path, warn=False)
    except OSError:
        return []


def read_steps(results_dir: str | Path, run_id: str) -> list[dict]:
    """The per-step log of one run (``steps/<run_id>.jsonl``: step, phase, loss, step_time_s per line)."""
    path = Path(results_dir) / "steps" / f"{run_id}.jsonl"
    if not path.is_file():
        raise ResultsError(f"{path}: no per-step log for run {run_id}")
    return _read_jsonl(path)


def timed_step_times(results_dir: str | Path, run_id: str) -> list[float]:
    """The timed steps' times (max over ranks, as the run recorded them) in step order; [] without a log."""
    try:
        steps = read_steps(results_dir, run_id)
    except ResultsError:
        return []
    return [s["step_time_s"] for s in steps if s.get("phase") == "timed"]


def load_steps(results_dir: str | Path, run_id: str) -> pd.DataFrame:
    """The per-step log of one run as a DataFrame: columns step, phase, loss, step_time_s."""
    import pandas as pd

    return pd.DataFrame(read_steps(results_dir, run_id))
