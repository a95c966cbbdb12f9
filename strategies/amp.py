"""Mixed precision, resolved once per strategy (never stacked):

- under FSDP: FSDP2's ``MixedPrecisionPolicy`` (bf16 params/compute, fp32 gradient reduction);
- otherwise: a scoped ``torch.autocast`` around forward+loss;
- fp16 (not under FSDP): plus a ``GradScaler``.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from strategies.base import Field, StrategyError, Technique

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def get_mp_policy(amp: str):
    """FSDP2 mixed-precision policy for ``amp`` (params cast to the compute dtype, gradients reduced in fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if amp == "fp32":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=DTYPES[amp], reduce_dtype=torch.float32)


def get_autocast(amp: str, dp: str, device_type: str):
    """Context manager for forward+loss: autocast when amp != fp32 and FSDP is not handling precision."""
    if amp == "fp32" or dp == "fsdp":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[amp])


def get_grad_scaler(amp: str, device_type: str):
    """A GradScaler for fp16, else None."""
    if amp != "fp16":
        return None
    return torch.amp.GradScaler(device_type)


def compute_dtype_name(s, device_type: str) -> str:
    """The dtype matmuls run in: 'bf16', 'fp16', 'tf32' (CUDA fp32 with TF32 allowed) or 'fp32'."""
    if s.amp != "fp32":
        return s.amp
    return "tf32" if (device_type == "cuda" and s.tf32) else "fp32"


def _validate_for(s, device_type: str, world_size: int) -> None:
    if device_type == "cpu" and s.amp == "fp16":
        raise StrategyError("strategy amp=fp16 needs a CUDA device (fp16 autocast + GradScaler); "
                            "on CPU use amp=fp32 or amp=bf16")
    if device_type == "cpu" and s.amp == "bf16":
        warnings.warn("amp=bf16 on a CPU without native bf16 can be ~250x slower than fp32; "
                      "CPU benchmarks should use fp32", stacklevel=3)


def _cost_setup(ctx) -> None:
    """Autocast (when no sharding technique already set a 16-bit mode): 16-bit matmul inputs and outputs."""
    if ctx.s.amp != "fp32" and ctx.mode == "fp32":
        ctx.mode = "autocast"


def _memory(parts: dict, ctx) -> None:
    """Autocast keeps 16-bit copies of the matmul weights (made per forward, saved for backward): 2 n_mm; the
    fused loss (models/loss.py) casts the head inside its forward and keeps no copy: 2 (n_mm - V d) then."""
    if ctx.mode == "autocast":
        head = ctx.model.padded_vocab_size * ctx.model.n_embd if ctx.fused_head and ctx.has_head else 0
        parts["autocast_weights"] = 2 * (ctx.n_mm - head)


TECHNIQUE = Technique(
    name="amp", order=40, name_order=20,
    fields=(Field("amp", str, "fp32", "Compute dtype: 'fp32', 'bf16' or 'fp16' (fp16 adds a GradScaler; GPU only).",
                  tuple(DTYPES)),
            Field("tf32", bool, True, "CUDA fp32 runs: allow TF32 tensor-core matmuls "
                  "(torch.backends.cuda.matmul.allow_tf32).")),
    apply=lambda model, s, ctx: model,  # not a wrapper: FSDP takes a policy, else the step enters get_autocast
    validate_for=_validate_for, name_part=lambda s: None if s.amp == "fp32" else s.amp,
    cost_setup=_cost_setup, memory=_memory,
    plan_axes=lambda world: {"amp": ["fp32", "bf16"]},
)
