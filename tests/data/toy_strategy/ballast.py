"""A toy technique that holds ``ballast_mib`` MiB of extra fp32 memory on every rank for the whole run.

Not part of the product: tests/test_add_strategy.py copies this file into strategies/ (and ballast.yaml into
bench/conf/strategy/) of a fresh copy of the tree and makes the four one-place edits of docs/strategies.md's
checklist, to prove that adding a strategy is that short: the harness runs it, the cost model predicts it, the
planner lists it, the report shows it.
"""

from __future__ import annotations

import torch
from torch import nn

from strategies.base import StrategyError

MIB = 2**20


def apply_ballast(model: nn.Module, mib: int, device: torch.device) -> nn.Module:
    """Hold ``mib`` MiB on ``device`` as a plain attribute of the (materialised) model: touched, so resident."""
    model.ballast = torch.ones(mib * MIB // 4, device=device)
    return model


def validate(s) -> None:
    if s.ballast_mib < 0:
        raise StrategyError(f"strategy.ballast_mib={s.ballast_mib} is invalid; must be >= 0")


def name_part(s) -> str | None:
    return f"ballast({s.ballast_mib})" if s.ballast_mib else None
