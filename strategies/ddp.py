"""DistributedDataParallel: replicate the model, all-reduce (average) gradients in buckets during backward."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def apply_ddp(model: nn.Module, device: torch.device, dp_mesh=None) -> DistributedDataParallel:
    """Wrap a *materialised* model (DDP broadcasts rank 0's weights at construction) over ``dp_mesh`` (the
    mesh's data-parallel dimension; all ranks when omitted). Under tensor parallelism DDP cannot hold
    DTensor parameters: PyTorch's TP+DDP transform (``_pre_dp_module_transform``, behind this one helper)
    gives DDP the local shards and rebuilds the DTensors around each forward."""
    from torch.distributed.tensor import DTensor

    device_ids = [device.index] if device.type == "cuda" else None
    if any(isinstance(p, DTensor) for p in model.parameters()):
        from torch.distributed.tensor.parallel.ddp import _pre_dp_module_transform  # private: see docstring

        _pre_dp_module_transform(model)
    group = dp_mesh.get_group() if dp_mesh is not None else None
    # gradient_as_bucket_view: gradients live in the all-reduce buckets (no second copy of 4P bytes);
    # broadcast_buffers=False: the only buffers (RoPE tables) are identical constants on every rank. torch
    # 2.13 deprecates it with a warning on every rank; its replacement (forward_sync_buffers=False) still
    # syncs buffers at construction, and the warning itself says to keep broadcast_buffers=False until
    # init_sync_buffers exists.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.* is deprecated", category=FutureWarning)
        return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True,
                                       broadcast_buffers=False, process_group=group)
