"""Data parallelism, one of: none (one process), DDP (strategies/ddp.py) or FSDP2 (strategies/fsdp.py).

Here: the checks and the name part (single, ddp, fsdp, fsdp(no-reshard)); the wrapping is ``apply_ddp`` /
``apply_fsdp``, called by the composer (strategies/__init__.py); the cost terms live in bench/plan/terms.py:
DDP keeps fp32 gradients in its all-reduce buckets (4 P, alive all run) and all-reduces 4 P bytes per step;
FSDP shards parameters and optimizer state over the ranks, holds the root plus two blocks
(one with resharding off: all blocks) unsharded in the parameter dtype, and all-gathers every unit in
forward (and every block again in backward when resharding) and reduce-scatters fp32 gradients once.
"""

from __future__ import annotations

from strategies.base import StrategyError

MODES = ("none", "ddp", "fsdp")


def validate(s) -> None:
    if s.dp == "fsdp" and s.amp == "fp16":
        raise StrategyError("strategy amp=fp16 with dp=fsdp is not supported (FSDP2 has no sharded gradient "
                            "scaler here); use amp=bf16")


def validate_for(s, device_type: str, world_size: int) -> None:
    model_par = s.tp * s.pp
    if s.dp == "none" and world_size > model_par:
        what = f" of tp={s.tp} x pp={s.pp} ranks" if model_par > 1 else " (one process)"
        raise StrategyError(f"strategy dp='none' runs one model replica{what} but world_size={world_size}; "
                            f"use strategy=ddp or strategy=fsdp, or launch {model_par} process(es)")


def name_part(s) -> str | None:
    if s.dp == "none":
        return None if s.tp * s.pp > 1 else "single"
    return "fsdp(no-reshard)" if s.dp == "fsdp" and not s.reshard_after_forward else s.dp
