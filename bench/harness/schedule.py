"""The learning-rate schedule: linear warm-up, then constant, cosine or linear decay (the usual for GPT training).

``lr_factor(k)`` multiplies ``lr`` at optimizer step k (0-based) of a run of ``total`` steps (its warm-up steps
included: they train too):

- warm-up, k < ``lr_warmup``: (k + 1) / lr_warmup, reaching 1 at its last step;
- then ``constant``: 1; ``cosine``: r + (1 - r) (1 + cos(pi p)) / 2; ``linear``: r + (1 - r) (1 - p), with
  p = (k - lr_warmup) / (total - lr_warmup - 1), from 0 at the first step after warm-up to 1 at the last step
  (later steps, such as a measurement's extra step, stay at p = 1), and r = ``lr_min_ratio``.

A constant schedule without warm-up makes no scheduler at all: the step is what it was.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(step: int, total: int, schedule: str, warmup: int = 0, min_ratio: float = 0.0) -> float:
    """The multiplier of lr at optimizer step ``step`` (module docstring)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    p = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    shape = 0.5 * (1 + math.cos(math.pi * p)) if schedule == "cosine" else 1.0 - p
    return min_ratio + (1.0 - min_ratio) * shape


def lr_scheduler(opt: torch.optim.Optimizer, total: int, schedule: str, warmup: int,
                 min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR | None:
    """A scheduler to step after every optimizer step, or None for a constant lr without warm-up."""
    if schedule == "constant" and warmup == 0:
        return None
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, total, schedule, warmup, min_ratio))
