"""DistributedDataParallel: replicate the model, all-reduce (average) gradients in buckets during backward."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def apply_ddp(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """Wrap a *materialised* model (DDP broadcasts rank 0's weights at construction)."""
    device_ids = [device.index] if device.type == "cuda" else None
    # gradient_as_bucket_view: gradients live in the all-reduce buckets (no second copy of 4P bytes);
    # broadcast_buffers=False: the only buffers (RoPE tables) are identical constants on every rank.
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True,
                                   broadcast_buffers=False)
