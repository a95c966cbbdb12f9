"""FSDP2: ``fully_shard`` each transformer block, then the root (embeddings, final norm, head).

Parameters become DTensors sharded on dim 0 across the data-parallel ranks; each block is
all-gathered just before its forward/backward and its gradients reduce-scattered after.
``reshard_after_forward=False`` keeps blocks unsharded between forward and backward
(ZeRO-2-like: one all-gather per step instead of two, more memory). On a 2-D mesh FSDP2 is HSDP: each
parameter is sharded over the inner (dp_shard) dimension only and replicated over the outer (dp_replicate),
so the all-gathers and reduce-scatters stay within a node and only the reduced gradient shard crosses nodes
(an all-reduce across replicas).

Gloo note: gloo has no ReduceOp.AVG, and FSDP2 on gloo silently *summed* gradients in some
releases (pytorch/pytorch#162338). On gloo we force SUM reductions and let FSDP divide by the
data-parallel size itself (the fix that issue's PR takes), where the API exists. On torch 2.13
both paths give the averaged gradient; tests/test_parity.py compares FSDP with single-process
training and fails if either ever sums.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from strategies.amp import get_mp_policy


def apply_fsdp(model: nn.Module, device_type: str, reshard_after_forward: bool = True, amp: str = "fp32",
               mesh=None) -> nn.Module:
    """Shard ``model`` in place (blocks first, then root) over ``mesh`` (the data-parallel dimension of the
    run's mesh; all ranks when omitted; a 2-D (dp_replicate, dp_shard) mesh makes it HSDP: sharded along the
    second, replicated along the first, gradients reduce-scattered within a shard group and then all-reduced
    across the replicas); works on meta-device models. Parameters that tensor parallelism
    already made DTensors on the ``tp`` dimension are sharded on top of it (2-D, FSDP x TP)."""
    # imported here: the planner and the cost model load the strategies without needing FSDP's machinery
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = mesh if mesh is not None else init_device_mesh(device_type, (dist.get_world_size(),))
    mp = get_mp_policy(amp)
    for block in model.blocks.values():
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    # The root (embeddings, final norm, head) stays unsharded from forward to backward: backward starts
    # with the head, so resharding it would only buy a second all-gather of the largest matrix.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
    if dist.get_backend() == "gloo":
        _use_sum_then_divide(model)
    return model


def _use_sum_then_divide(model: nn.Module) -> None:
    """Make every FSDP module reduce with SUM and divide by world size afterwards (see module docstring)."""
    for module in model.modules():
        if hasattr(module, "set_force_sum_reduction_for_comms"):
            module.set_force_sum_reduction_for_comms(True)
