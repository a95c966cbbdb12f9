"""A toy technique that holds ``ballast_mib`` MiB of extra fp32 memory on every rank for the whole run.

Not part of the product: tests/test_add_strategy.py copies this file into strategies/ (and ballast.yaml into
bench/conf/strategy/) of a fresh copy of the tree, to prove that a strategy is its module plus its preset --
the harness runs it, the cost model predicts it, the planner lists it, the report shows it.
"""

from __future__ import annotations

import torch

from strategies.base import Field, StrategyError, Technique

MIB = 2**20


def _validate(s) -> None:
    if s.ballast_mib < 0:
        raise StrategyError(f"strategy.ballast_mib={s.ballast_mib} is invalid; must be >= 0")


def _apply(model, s, ctx):
    if s.ballast_mib:
        ctx.materialise()  # after sharding (order 50 > data parallelism's 30): a real tensor on the device
        model.ballast = torch.ones(s.ballast_mib * MIB // 4, device=ctx.device)  # touched, so resident
    return model


def _memory(parts: dict, ctx) -> None:
    parts["ballast"] = ctx.s.ballast_mib * MIB


TECHNIQUE = Technique(
    name="ballast", order=50, name_order=50,
    fields=(Field("ballast_mib", int, 0, "Toy: MiB of extra memory held on every rank (tests only)."),),
    apply=_apply, validate=_validate,
    name_part=lambda s: f"ballast({s.ballast_mib})" if s.ballast_mib else None,
    memory=_memory,
    plan_axes=lambda world: {"ballast_mib": [0, 128]},
)
