"""Data parallelism, one of: none (one process), DDP (strategies/ddp.py) or FSDP2 (strategies/fsdp.py).

Its facts: the ``dp`` and ``reshard_after_forward`` fields, the checks, the name part (single, ddp, fsdp,
fsdp(no-reshard)), the wrapping, and the cost terms (bench/plan/costmodel.py's docstring has the formulas):
DDP keeps fp32 gradients in its all-reduce buckets (4 P, alive all run) and all-reduces 4 P bytes per step;
FSDP shards parameters and optimizer state over the ranks (the setup hook), holds the root plus two blocks
(one with resharding off: all blocks) unsharded in the parameter dtype, and all-gathers every unit in
forward (and every block again in backward when resharding) and reduce-scatters fp32 gradients once.
"""

from __future__ import annotations

from strategies.base import Field, StrategyError, Technique
from strategies.ddp import apply_ddp
from strategies.fsdp import apply_fsdp
from strategies.pp import n_microbatches as n_pipeline_microbatches

MODES = ("none", "ddp", "fsdp")
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def _validate(s) -> None:
    if s.dp == "fsdp" and s.amp == "fp16":
        raise StrategyError("strategy amp=fp16 with dp=fsdp is not supported (FSDP2 has no sharded gradient "
                            "scaler here); use amp=bf16")


def _validate_for(s, device_type: str, world_size: int) -> None:
    model_par = s.tp * s.pp
    if s.dp == "none" and world_size > model_par:
        what = f" of tp={s.tp} x pp={s.pp} ranks" if model_par > 1 else " (one process)"
        raise StrategyError(f"strategy dp='none' runs one model replica{what} but world_size={world_size}; "
                            f"use strategy=ddp or strategy=fsdp, or launch {model_par} process(es)")


def _name(s) -> str | None:
    if s.dp == "none":
        return None if s.tp * s.pp > 1 else "single"
    return "fsdp(no-reshard)" if s.dp == "fsdp" and not s.reshard_after_forward else s.dp


def _apply(model, s, ctx):
    dp_mesh = ctx.mesh["dp"] if ctx.mesh is not None else None
    if s.dp == "fsdp":  # shards the still-meta model; the composer materialises the shards afterwards
        return apply_fsdp(model, ctx.device.type, s.reshard_after_forward, s.amp, dp_mesh)
    if s.dp == "ddp":  # DDP broadcasts rank 0's weights at construction: materialise first
        ctx.materialise()
        return apply_ddp(model, ctx.device, dp_mesh)
    return model


def _cost_setup(ctx) -> None:
    if ctx.s.dp == "fsdp":  # FSDP2 shards (and pads) even on one rank
        ctx.shard_world = ctx.dp
        ctx.param_bytes = BYTES[ctx.s.amp]
        if ctx.s.amp != "fp32":
            ctx.mode = "half"  # MixedPrecisionPolicy: parameters and activations in the 16-bit dtype


def _memory(parts: dict, ctx) -> None:
    if ctx.s.dp == "ddp":
        parts["grads"] = 4 * ctx.P  # bucket views, alive all run
    elif ctx.s.dp == "fsdp":
        W = ctx.dp
        # a pipeline schedule keeps its stages' blocks unsharded from the first backward to the last
        inflight = ctx.L if (not ctx.s.reshard_after_forward or ctx.pp > 1) else min(2, ctx.L)
        parts["fsdp_unsharded"] = ctx.param_bytes * (ctx.root_padded(W) + sum(ctx.block_padded(i, W)
                                                                              for i in range(inflight)))
        parts["grads"] = 0  # sharded grads appear after reduce-scatter, when activations are gone


def _comm(ctx) -> dict:
    if ctx.world <= 1 or ctx.s.dp == "none":
        return {}
    if ctx.s.dp == "ddp":
        # DDP all-reduces even over a one-rank group (dp = 1 beside tp). (Its one-time broadcast of the
        # rebuilt bucket order on the second iteration is not part of a step.)
        return {"all_reduce": 4 * ctx.P}
    if ctx.dp <= 1:  # FSDP2 issues nothing on a one-rank data-parallel dimension
        return {}
    W = ctx.dp
    padded = ctx.padded(W)
    blocks = sum(ctx.block_padded(i, W) for i in range(ctx.L))
    # Under a pipeline schedule every pipeline micro-batch's forward gathers the (resharded) blocks again,
    # and backward gathers them once (the schedule keeps them unsharded until the last backward).
    forwards = n_pipeline_microbatches(ctx.s) if ctx.pp > 1 else 1
    per_micro = padded + (forwards - 1) * blocks if ctx.s.reshard_after_forward else padded
    gather = ctx.grad_accum * BYTES[ctx.s.amp] * (per_micro + (blocks if ctx.s.reshard_after_forward else 0))
    return {"all_gather": gather, "reduce_scatter": 4 * padded}  # reduce dtype fp32


TECHNIQUE = Technique(
    name="dp", order=30, name_order=0,
    fields=(Field("dp", str, "none", "Data parallelism: 'none' (single process), 'ddp' (DistributedDataParallel) "
                  "or 'fsdp' (FSDP2 fully_shard).", MODES),
            Field("reshard_after_forward", bool, True, "FSDP only: free unsharded params after forward (ZeRO-3) "
                  "or keep them until backward (ZeRO-2-like).")),
    apply=_apply, validate=_validate, validate_for=_validate_for, name_part=_name,
    cost_setup=_cost_setup, memory=_memory, comm=_comm,
    comm_group=lambda ctx: ctx.dp,  # beside tp on one data-parallel rank nothing crosses a link
    plan_axes=lambda world: {"dp": ["none", "ddp", "fsdp"],  # none: one process, or one model-parallel replica
                             "reshard_after_forward": [True, False]},
)
