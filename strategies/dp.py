"""Data parallelism, one of: none (one process), DDP (strategies/ddp.py) or FSDP2 (strategies/fsdp.py).

Here: the checks and the name part (single, ddp, fsdp, fsdp(no-reshard)); the wrapping is ``apply_ddp`` /
``apply_fsdp``, called by the composer (strategies/__init__.py); the cost terms live in bench/plan/terms.py:
DDP keeps fp32 gradients in its all-reduce buckets (4 P, alive all run) and all-reduces 4 P bytes per step;
FSDP shards parameters and optimizer state over the ranks, holds the root plus two blocks
(one with resharding off: all blocks) unsharded in the parameter dtype, and all-gathers every unit in
forward (and every block again in backward when resharding) and reduce-scatters fp32 gradients once; HSDP does
all of that within its shard group and then all-reduces the gradient shard across the replicas.
"""

from __future__ import annotations

from strategies.base import StrategyError

MODES = ("none", "ddp", "fsdp")


def validate(s) -> None:
    if s.dp_replicate < 1:
        raise StrategyError(f"strategy.dp_replicate={s.dp_replicate} is invalid; must be >= 1 (1: no replicas)")
    if s.dp_replicate > 1 and s.dp != "fsdp":
        raise StrategyError(f"strategy.dp_replicate={s.dp_replicate} (HSDP) needs strategy.dp=fsdp, not "
                            f"dp={s.dp!r} (DDP replicates over every data-parallel rank already)")
    if s.dp == "fsdp" and s.amp == "fp16":
        raise StrategyError("strategy amp=fp16 with dp=fsdp is not supported (FSDP2 has no sharded gradient "
                            "scaler here); use amp=bf16")


def validate_for(s, device_type: str, world_size: int) -> None:
    model_par = s.tp * s.pp
    if s.dp == "none" and world_size > model_par:
        what = f" of tp={s.tp} x pp={s.pp} ranks" if model_par > 1 else " (one process)"
        raise StrategyError(f"strategy dp='none' runs one model replica{what} but world_size={world_size}; "
                            f"use strategy=ddp or strategy=fsdp, or launch {model_par} process(es)")
    dp = max(1, world_size // model_par)
    if s.dp_replicate > 1 and dp % s.dp_replicate:
        raise StrategyError(f"strategy.dp_replicate={s.dp_replicate} does not divide the data-parallel degree {dp} "
                            f"(world_size={world_size} / (tp={s.tp} x pp={s.pp})); valid: "
                            + ", ".join(str(r) for r in range(1, dp + 1) if dp % r == 0))


def shard_degree(s, dp: int) -> int:
    """Ranks one parameter is sharded over: dp under FSDP, dp / dp_replicate under HSDP, 1 otherwise."""
    return dp // s.dp_replicate if s.dp == "fsdp" else 1


def name_part(s) -> str | None:
    if s.dp == "none":
        return None if s.tp * s.pp > 1 else "single"
    name = f"hsdp{s.dp_replicate}" if s.dp_replicate > 1 else s.dp
    return f"{name}(no-reshard)" if s.dp == "fsdp" and not s.reshard_after_forward else name
