"""Mixed precision, resolved once per strategy (never stacked):

- under FSDP: FSDP2's ``MixedPrecisionPolicy`` (bf16 params/compute, fp32 gradient reduction);
- otherwise: a scoped ``torch.autocast`` around forward+loss;
- fp16 (not under FSDP): plus a ``GradScaler``.
"""

from __future__ import annotations

import contextlib

import torch

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
