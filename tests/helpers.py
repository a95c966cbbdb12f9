"""Launch the real CLI (python or torchrun) in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from bench.launch.suite import launcher

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], nproc: int = 0, timeout: int = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """``python bench/run.py ARGS`` (nproc=0) or ``torchrun --standalone --nproc_per_node=N bench/run.py ARGS``."""
    cmd = [*launcher(nproc), "bench/run.py", *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def md_rows(text: str) -> list[list[str]]:
    """The body rows of every markdown table in ``text``, as stripped cell strings."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.lstrip().startswith("|") and not set(line.strip()) <= set("|-: ")]


def copy_tree(dest: Path, with_results: tuple[str, ...] = ()) -> Path:
    """This tree's files as git sees them (uncommitted edits included) copied to ``dest``, without results/
    except the named sub-folders: a scratch copy to add or break files in."""
    import shutil

    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file() and not f.startswith("results/"):
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    for sub in with_results:
        shutil.copytree(ROOT / "results" / sub, dest / "results" / sub)
    return dest


# A repetitive text whose loss falls clearly within a few steps (parity and gradient tests train on it).
CORPUS_TEXT = ("the quick brown fox jumps over the lazy dog. " * 40
               + "pack my box with five dozen liquor jugs! " * 40) * 4
