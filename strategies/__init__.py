"""Strategies: plain functions over a model, applied by ``apply_strategies`` in one fixed order.

Each technique is a module with a ``TECHNIQUE`` (strategies/base.py) whose ``order`` places it
(torchtitan's order, and why):

1. **activation checkpointing** wraps blocks first, so that compile sees (and can optimise
   around) the checkpoint boundary and FSDP shards the wrapped block as one unit;
2. **compile** next, per block (or whole model), before any data-parallel wrapper, so the
   compiled region contains model code only, never FSDP/DDP hooks;
3. **FSDP** shards the still-meta model (no rank ever holds a full copy), then the shards are
   materialised and initialised; or **DDP**, which needs materialised weights (it broadcasts
   rank 0's at construction), so the model is materialised and initialised just before it;
4. **mixed precision** is not a wrapper: FSDP takes a MixedPrecisionPolicy in step 3, otherwise
   the training step enters ``get_autocast`` (and a GradScaler for fp16).

(``order`` 10, 20, 30, 40; a new technique picks the slot its reasons give it.) The model is
materialised and initialised once: when a technique asks (DDP), else after the last one.

Every step is deterministic and keeps no module-level state, so applying the same strategy in
a fresh process twice gives the same model.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from strategies.ac import apply_ac
from strategies.amp import get_autocast, get_grad_scaler, get_mp_policy
from strategies.base import ApplyContext
from strategies.compile import apply_compile
from strategies.config import TECHNIQUES, StrategyConfig, StrategyError
from strategies.ddp import apply_ddp
from strategies.fsdp import apply_fsdp
from strategies.mesh import build_mesh
from strategies.pp import Pipeline
from strategies.tp import finalize_grads, maybe_loss_parallel

__all__ = [
    "StrategyConfig", "StrategyError", "TECHNIQUES", "apply_strategies", "apply_ac", "apply_compile", "apply_ddp",
    "apply_fsdp", "finalize_grads", "get_autocast", "get_grad_scaler", "get_mp_policy", "maybe_loss_parallel",
    "maybe_no_sync", "recompute_flops_per_token", "unwrap",
]


def apply_strategies(model: nn.Module, cfg: StrategyConfig, device: torch.device, seed: int,
                     mesh=None, grad_accum: int = 1) -> nn.Module:
    """Turn a meta-device model into the trained module: every technique in order, materialised and
    initialised from ``seed``. ``mesh``: the (pp, dp, tp) DeviceMesh (strategies/mesh.py; built from the
    process group when omitted). Once the pipeline split has made a ``Pipeline``, every later technique
    is applied to each of its stage modules, and the schedule is built last (``grad_accum`` scales its
    loss). Returns the module to train (its ``parameters()`` go to the optimizer)."""
    if mesh is None:
        mesh = build_mesh(cfg, device.type)
    bases, done = [model], []  # the bare GPT modules to materialise (a pipeline's stages once split)

    def materialise() -> None:
        if not done:
            for base in bases:
                base.to_empty(device=device)
                base.init_weights(seed)
            done.append(True)

    ctx = ApplyContext(device=device, seed=seed, materialise=materialise, mesh=mesh)
    for technique in TECHNIQUES:
        if isinstance(model, Pipeline):
            for i, stage in enumerate(model.stages):
                model.stages[i] = technique.apply(stage, cfg, ctx)
        else:
            model = technique.apply(model, cfg, ctx)
            if isinstance(model, Pipeline):
                bases[:] = list(model.stages)
    materialise()
    if isinstance(model, Pipeline):
        model.finish(cfg, mesh["pp"].get_group(), device, 1.0 / grad_accum)
    return model


def recompute_flops_per_token(model_cfg, seq_len: int, cfg: StrategyConfig) -> int:
    """Forward FLOPs per token that the strategy re-runs in backward (every technique's FLOP effect; HFU)."""
    return sum(t.recompute_flops(model_cfg, seq_len, cfg) for t in TECHNIQUES)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2, AC and in-place compile keep the model object itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def maybe_no_sync(model: nn.Module, cfg: StrategyConfig, is_last_micro_step: bool):
    """Skip gradient communication on all but the last gradient-accumulation micro-step (a pipeline's
    schedule manages its stages' gradient synchronisation itself)."""
    if isinstance(model, Pipeline):
        return contextlib.nullcontext()
    if cfg.dp == "ddp" and not is_last_micro_step:
        return model.no_sync()
    if cfg.dp == "fsdp":
        model.set_requires_gradient_sync(is_last_micro_step)
    return contextlib.nullcontext()
