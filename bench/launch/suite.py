"""Run a declarative matrix of benchmark entries, one process (group) per entry, one after another.

Shared by bench/launch/gpu_suite.py, bench/gate/ci_suite.py and bench/gate/ab.py. An ``Entry`` is (label,
model, strategy preset, extra overrides, nproc): nproc 0 runs ``python bench/run.py``, nproc >= 1 runs
``torchrun --standalone --nproc_per_node=nproc bench/run.py`` (``launcher``: the one place that command line
is built; the sweep and the tests use it too). Each entry has a timeout; a failing
entry never stops the rest (its row, with its status, lands in the results folder anyway).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[2]


class Entry(NamedTuple):
    """One benchmark of a suite: ``nproc`` 0 = one plain process, N = torchrun with N local ranks."""

    label: str
    model: str
    strategy: str
    overrides: list[str] = []
    nproc: int = 0


def launcher(nproc: int) -> list[str]:
    """How bench/run.py is started: this interpreter alone (nproc 0) or torchrun on this host with nproc ranks."""
    if not nproc:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def command(entry: Entry, results: Path, common: list[str], tag_prefix: str, extra: list[str] = (),
            root: Path = ROOT) -> list[str]:
    """The command line of one entry, running ``root``'s bench/run.py (another tree for the A/B gate)."""
    args = [f"model={entry.model}", f"strategy={entry.strategy}", *common, *entry.overrides,
            f"results_dir={results}", f"tag={tag_prefix}:{entry.label}", *extra]
    return [*launcher(entry.nproc), str(Path(root) / "bench" / "run.py"), *args]


def run_plan(plan: list[tuple[str, list[str]]], timeout_s: float, budget_s: float, env: dict | None = None,
             quiet: bool = False) -> int:
    """Run (label, command) pairs in order; returns how many failed or timed out. Entries that would
    start with under 30 s of the budget left are skipped (and counted as failed)."""
    start = time.perf_counter()
    failures = 0
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for label, cmd in plan:
        left = budget_s - (time.perf_counter() - start)
        if left < 30:
            print(f"[suite] skip {label}: {left:.0f}s of the budget left", flush=True)
            failures += 1
            continue
        print(f"[suite] {label}: {shlex.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        try:
            out = subprocess.DEVNULL if quiet else None
            rc = subprocess.run(cmd, cwd=ROOT, env=full_env, timeout=min(timeout_s, left), stdout=out).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        failures += rc != 0
        print(f"[suite] {label}: rc={rc} in {time.perf_counter() - t0:.0f}s", flush=True)
    print(f"[suite] done in {time.perf_counter() - start:.0f}s, {failures} failed", flush=True)
    return failures
