"""Strategies: plain functions over a model, applied by ``apply_strategies`` in one fixed order.

The order (torchtitan's ``parallelize_llama``), and why:

1. **pipeline split** first: the meta-device model is cut into this rank's stages, and every later technique
   is applied to each stage module (strategies/pp.py);
2. **tensor / sequence parallelism** next, on the unsharded meta model, so that the techniques after it see
   the DTensor-parallel modules (strategies/tp.py);
3. **activation checkpointing** wraps blocks, so that compile sees (and can optimise around) the checkpoint
   boundary and FSDP shards the wrapped block as one unit (strategies/ac.py);
4. **compile** per block (or whole model), before any data-parallel wrapper, so the compiled region contains
   model code only, never FSDP/DDP hooks (strategies/compile.py);
5. **FSDP** shards the still-meta model over the mesh's dp dimension (HSDP: over dp_shard, replicated across
   dp_replicate; no rank ever holds a full copy), then
   the shards are materialised and initialised; or **DDP**, which needs materialised weights (it broadcasts
   rank 0's at construction), so the model is materialised and initialised just before it (strategies/dp.py,
   fsdp.py, ddp.py);
6. **mixed precision** is not a wrapper: FSDP takes a MixedPrecisionPolicy in step 5, otherwise the training
   step enters ``get_autocast`` (and a GradScaler for fp16) (strategies/amp.py).

The model is materialised and initialised once: when DDP asks, else after the last step. Every step is
deterministic and keeps no module-level state, so applying the same strategy in a fresh process twice gives
the same model. Each field a technique reads is in strategies/config.py (``StrategyConfig``); its cost terms,
for the planner, in bench/plan/terms.py.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from strategies.ac import apply_ac
from strategies.ac import recompute_flops_per_token as ac_recompute_flops
from strategies.amp import get_autocast, get_grad_scaler, get_mp_policy
from strategies.compile import apply_compile
from strategies.config import StrategyConfig, StrategyError
from strategies.ddp import apply_ddp
from strategies.fsdp import apply_fsdp
from strategies.mesh import build_mesh, dp_mesh
from strategies.pp import Pipeline, split_pipeline
from strategies.tp import apply_tp, finalize_grads, maybe_loss_parallel

__all__ = [
    "StrategyConfig", "StrategyError", "apply_strategies", "apply_ac", "apply_compile", "apply_ddp",
    "apply_fsdp", "apply_tp", "finalize_grads", "get_autocast", "get_grad_scaler", "get_mp_policy",
    "maybe_loss_parallel", "maybe_no_sync", "recompute_flops_per_token", "unwrap",
]


def apply_strategies(model: nn.Module, cfg: StrategyConfig, device: torch.device, seed: int,
                     mesh=None, grad_accum: int = 1) -> nn.Module:
    """Turn a meta-device model into the trained module: every technique in the order above, materialised and
    initialised from ``seed``. ``mesh``: the (pp, dp, tp) DeviceMesh (strategies/mesh.py; built from the process
    group when omitted). Under a pipeline every technique after the split is applied to each of this rank's
    stages, and the schedule is built last (``grad_accum`` scales its loss). Returns the module to train (its
    ``parameters()`` go to the optimizer)."""
    if mesh is None:
        mesh = build_mesh(cfg, device.type)
    data_mesh = dp_mesh(mesh)  # the dp dimension, or HSDP's (dp_replicate, dp_shard)
    pipeline = split_pipeline(model, cfg, mesh["pp"]) if cfg.pp > 1 else None  # 1. pipeline split
    parts = list(pipeline.stages) if pipeline is not None else [model]
    bases = list(parts)  # the bare modules to materialise and initialise
    materialised = []

    def materialise() -> None:
        if not materialised:
            for base in bases:
                base.to_empty(device=device)
                base.init_weights(seed)
            materialised.append(True)

    if cfg.tp > 1:  # 2. tensor (and sequence) parallelism on the mesh's tp dimension
        parts = [apply_tp(m, mesh["tp"], cfg.sp) for m in parts]
    if cfg.ac != "none":  # 3. activation checkpointing, per block
        parts = [apply_ac(m, cfg.ac, cfg.ac_every) for m in parts]
    if cfg.compile:  # 4. compile, per block or whole model
        parts = [apply_compile(m, cfg.compile_mode) for m in parts]
    if cfg.dp == "fsdp":  # 5. FSDP shards the meta model, materialised below ...
        parts = [apply_fsdp(m, device.type, cfg.reshard_after_forward, cfg.amp, data_mesh) for m in parts]
    elif cfg.dp == "ddp":  # ... or DDP, which broadcasts rank 0's materialised weights
        materialise()
        parts = [apply_ddp(m, device, data_mesh) for m in parts]
    materialise()  # (6. mixed precision: FSDP's policy above, else the training step's autocast)
    if pipeline is None:
        return parts[0]
    for i, m in enumerate(parts):
        pipeline.stages[i] = m
    pipeline.finish(cfg, mesh["pp"].get_group(), device, 1.0 / grad_accum)
    return pipeline


def recompute_flops_per_token(model_cfg, seq_len: int, cfg: StrategyConfig) -> int:
    """Forward FLOPs per token that the strategy re-runs in backward (HFU): activation checkpointing's."""
    return ac_recompute_flops(model_cfg, seq_len, cfg.ac, cfg.ac_every)


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
