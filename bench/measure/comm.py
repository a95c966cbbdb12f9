"""Measured communication: observe the collectives that actually run, with their sizes.

``CommCounter`` is a TorchDispatchMode: every c10d collective (DDP's bucket all-reduces, FSDP2's
all-gathers and reduce-scatters, ours) reaches the dispatcher as a ``c10d::*`` op, whose tensor
arguments give the size. ``comm_bytes`` per op is the full tensor the collective operates on (the
same convention as bench/plan/costmodel.py's prediction): all-reduce and broadcast: the tensors; all-gather:
the gathered output; reduce-scatter: the full input; send / recv (pipeline stages): the tensor sent or
received. DTensor's own collectives (tensor parallelism, the vocabulary-parallel loss) are counted too.

The harness measures one extra training step after the timed window (a dispatch mode slows every op,
so it never runs while timing), on every rank.

``CommClock`` is its clock: the seconds a rank's thread spends inside collectives and their waits (the model's
parts under tensor parallelism, bench/measure/parts.py, split their time with it).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from torch.distributed._functional_collectives import AsyncCollectiveTensor
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


class CommClock(TorchDispatchMode):
    """Seconds (``seconds``) this thread spends inside c10d collectives and their waits (``wait_tensor``) while
    active: the time the rank's compute is held up by communication. A gloo collective runs while its caller
    waits, so on a CPU this is all of it -- for collectives that reach the dispatcher to their end: functional
    ones (DTensor's, compiled code's) are timed through their ``wait_tensor``, but a c10d op's ``Work.wait()``
    is not an op, so a direct ``dist.all_reduce`` counts only its launch (DDP's and FSDP's are not timed
    here). On a GPU each one is timed alone (``sync``: the device synchronised before and after, so a
    collective's kernel is not mistaken for the compute queued before it). Ops on tensor subclasses are
    declined -- DTensor's (as ``CommCounter`` does) and the async result of a functional collective, whose
    first use waits -- so the collectives and waits they desugar into are timed."""

    def __init__(self, sync=lambda: None):
        super().__init__()
        self.seconds = 0.0
        self.sync = sync

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, (DTensor, AsyncCollectiveTensor)) for t in types):
            return NotImplemented
        if func.namespace not in ("c10d", "_c10d_functional"):
            return func(*args, **(kwargs or {}))
        self.sync()
        t = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.sync()
        self.seconds += time.perf_counter() - t
        return out
