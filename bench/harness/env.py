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
    }
