"""Measured communication: observe the collectives that actually run, with their sizes.

``CommCounter`` is a TorchDispatchMode: every c10d collective (DDP's bucket all-reduces, FSDP2's
all-gathers and reduce-scatters, ours) reaches the dispatcher as a ``c10d::*`` op, whose tensor
arguments give the size. ``comm_bytes`` per op is the full tensor the collective operates on (the
same convention as bench/plan/costmodel.py's prediction): all-reduce and broadcast: the tensors; all-gather:
the gathered output; reduce-scatter: the full input; send / recv (pipeline stages): the tensor sent or
received. DTensor's own collectives (tensor parallelism, the vocabulary-parallel loss) are counted too.

The harness measures one extra training step after the timed window (a dispatch mode slows every op,
so it never runs while timing), on every rank.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, list | tuple):
        return sum(_nbytes(t) for t in x)
    return 0


# op name -> (kind, index of the argument whose size counts)
_OPS = {
    "allreduce_": ("all_reduce", 0),
    "allreduce_coalesced_": ("all_reduce", 0),
    "broadcast_": ("broadcast", 0),
    "_allgather_base_": ("all_gather", 0),
    "allgather_": ("all_gather", 0),
    "allgather_into_tensor_coalesced_": ("all_gather", 0),
    "_reduce_scatter_base_": ("reduce_scatter", 1),
    "reduce_scatter_": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "all_reduce": ("all_reduce", 0),  # _c10d_functional (compiled code)
    "all_gather_into_tensor": ("all_gather", -1),
    "reduce_scatter_tensor": ("reduce_scatter", 0),
    "send": ("send", 0),  # point-to-point (pipeline stages): the tensor sent ...
    "recv_": ("recv", 0),  # ... or received
}


class CommCounter(TorchDispatchMode):
    """Counts collectives and their bytes while active: ``bytes_by_kind``, ``calls_by_kind``."""

    def __init__(self):
        super().__init__()
        self.bytes_by_kind: dict[str, int] = defaultdict(int)
        self.calls_by_kind: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            # A mode runs before tensor subclasses; declining here lets DTensor run its op and desugar it
            # into the collectives it needs (tensor parallelism, loss_parallel), which then reach this mode
            # as plain c10d ops (the approach of PyTorch's CommDebugMode).
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        ns = func.namespace
        name = func.__name__.split(".")[0]
        if ns in ("c10d", "_c10d_functional") and name in _OPS:
            kind, idx = _OPS[name]
            size = _nbytes(out) if idx == -1 else _nbytes(args[idx])
            self.bytes_by_kind[kind] += size
            self.calls_by_kind[kind] += 1
        return out

    def summary(self) -> dict:
        return {"bytes": dict(self.bytes_by_kind), "calls": dict(self.calls_by_kind),
                "total": sum(self.bytes_by_kind.values())}
