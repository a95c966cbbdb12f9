"""Mixed precision, resolved once per strategy (never stacked):

- under FSDP: FSDP2's ``MixedPrecisionPolicy`` (bf16 params/compute, fp32 gradient reduction);
- otherwise: a scoped ``torch.autocast`` around forward+loss;
- fp16 (not under FSDP): plus a ``GradScaler``.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from strategies.base import StrategyError

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


def validate_for(s, device_type: str, world_size: int) -> None:
    if device_type == "cpu" and s.amp == "fp16":
        raise StrategyError("strategy amp=fp16 needs a CUDA device (fp16 autocast + GradScaler); "
                            "on CPU use amp=fp32 or amp=bf16")
    if device_type == "cpu" and s.amp == "bf16":
        warnings.warn("amp=bf16 on a CPU without native bf16 can be ~250x slower than fp32; "
                      "CPU benchmarks should use fp32", stacklevel=3)


def name_part(s) -> str | None:
    return None if s.amp == "fp32" else s.amp
