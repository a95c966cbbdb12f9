"""Launch the real CLI (python or torchrun) in a subprocess, as a user would."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from bench.launch.suite import launcher

ROOT = Path(__file__).resolve().parents[2]

# The Hugging Face tests need the [hf] extra (make setup installs it). Without it they do not skip quietly: they
# stop with a collection error naming the missing modules, unless N00BGPT_ALLOW_NO_HF=1 says to run without them.
HF_MISSING = [m for m in ("transformers", "safetensors", "tokenizers", "datasets")
              if importlib.util.find_spec(m) is None]
HF_SKIP_ALLOWED = os.environ.get("N00BGPT_ALLOW_NO_HF") == "1"
HF_ABSENT = f"the [hf] extra is not installed ({', '.join(HF_MISSING)}): pip install -e '.[hf]'"


def run_cli(args: list[str], nproc: int = 0, timeout: int = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """``python bench/run.py ARGS`` (nproc=0) or ``torchrun --standalone --nproc_per_node=N bench/run.py ARGS``."""
    cmd = [*launcher(nproc), "bench/run.py", *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def run_cli_forked(argvs: list[list[str]], tmp_path: Path, env: dict | None = None,
                   timeout: int = 900) -> list[subprocess.CompletedProcess]:
    """``python bench/run.py ARGS`` for each argument list, each in its own process forked from one interpreter
    that imported torch and the harness once (tests/cli_fork.py), one after another: each ~3 s cheaper than
    ``run_cli`` on this class of machine. Results in order, as ``CompletedProcess`` (returncode, stdout, stderr)."""
    import json

    tmp = Path(tmp_path) / f"fork-{len(list(Path(tmp_path).iterdir()))}"
    tmp.mkdir()
    (tmp / "cases.json").write_text(json.dumps(argvs))
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    driver = [sys.executable, str(ROOT / "tests" / "cli_fork.py"), str(tmp / "cases.json"), str(tmp / "out.json")]
    subprocess.run(driver, cwd=ROOT, check=True, timeout=timeout, env=full_env)
    return [subprocess.CompletedProcess(argv, r["returncode"], r["stdout"], r["stderr"])
            for argv, r in zip(argvs, json.loads((tmp / "out.json").read_text()))]


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


def cache_peak(cache_dir: Path, flops: float) -> dict:
    """Set the matmul peak (fp32, CPU) that runs launched with the returned environment read from their probe
    cache (``N00BGPT_CACHE_DIR``), instead of probing: a number the test chooses, not one that depends on what
    else the host is doing. The key names the compute threads: the CLI helpers run with OMP_NUM_THREADS=1."""
    import torch

    from bench.measure.probe import cache_put, probe_key

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        key = probe_key("matmul", torch.device("cpu"), "fp32")
    finally:
        torch.set_num_threads(threads)
    env = {"N00BGPT_CACHE_DIR": str(cache_dir)}
    before = os.environ.get("N00BGPT_CACHE_DIR")
    os.environ.update(env)
    try:
        cache_put(key, flops)
    finally:
        if before is None:
            del os.environ["N00BGPT_CACHE_DIR"]
        else:
            os.environ["N00BGPT_CACHE_DIR"] = before
    return env

