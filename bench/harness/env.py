"""Provenance recorded with every row: code version, library versions, hardware."""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
from pathlib import Path

import torch

from bench.measure.host import cpu_model

REPO = Path(__file__).resolve().parents[2]


def git_sha() -> str | None:
    """HEAD's SHA, suffixed '-dirty' when tracked files differ; None outside a git checkout or in one without
    commits (where ``git rev-parse HEAD`` prints the literal 'HEAD'). ``N00BGPT_GIT_SHA`` names it for a copy
    of the tree that has no history (e.g. a GPU machine the tree was copied to)."""
    if os.environ.get("N00BGPT_GIT_SHA"):
        return os.environ["N00BGPT_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not re.fullmatch(r"[0-9a-f]{40}", sha):
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


_PRELOADED = ("jemalloc", "tcmalloc", "mimalloc")
# glibc's malloc tunables that change how freed memory goes back to the OS (and so CPU step times and RSS)
_GLIBC_KNOBS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX",
                "GLIBC_TUNABLES")


def allocator(device: torch.device, maps: str | None = None, env: dict | None = None) -> str:
    """Which allocator served the run's tensors, with the settings that change its behaviour: on a GPU torch's
    caching allocator and ``PYTORCH_CUDA_ALLOC_CONF`` (or ``PYTORCH_ALLOC_CONF``); on a CPU the malloc mapped
    into this process -- jemalloc, tcmalloc or mimalloc when one is loaded (``/proc/self/maps``, e.g. through
    ``LD_PRELOAD``), else glibc -- with glibc's tunables that are set (``MALLOC_MMAP_THRESHOLD_=65536``...).
    On a CPU a small model's step can spend a third of its time faulting in pages glibc returned to the OS,
    so a CPU number is read with its allocator. ``maps``/``env``: this process's by default."""
    env = os.environ if env is None else env
    if device.type == "cuda":
        conf = env.get("PYTORCH_CUDA_ALLOC_CONF") or env.get("PYTORCH_ALLOC_CONF")
        return "cuda caching" + (f" ({conf})" if conf else "")
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            maps = ""
    libs = {Path(line.split()[-1]).name for line in maps.splitlines() if "/" in line}
    for name in _PRELOADED:
        if any(lib.startswith(f"lib{name}") for lib in libs):
            return name
    knobs = [f"{k}={env[k]}" for k in _GLIBC_KNOBS if env.get(k)]
    return "glibc" + (f" ({', '.join(knobs)})" if knobs else "")


def environment(device: torch.device) -> dict:
    """Columns describing where the run happened."""
    cuda = device.type == "cuda"
    nccl = None
    if cuda:
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:
            nccl = None
    return {
        "git_sha": git_sha(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda if cuda else None,
        "nccl_version": nccl,
        "python_version": platform.python_version(),
        "hostname": socket.gethostname(),
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_model(),
        "device_count": torch.cuda.device_count() if cuda else 1,
        "cpu_threads": torch.get_num_threads(),
        "allocator": allocator(device),
    }
