"""Counters of a run that no neighbour can move: what it computes, holds and compiles, counted, not timed.

A timing on a shared host moves from second to second; these do not, so the A/B gate judges them exactly, before
any timing (bench/gate/ab.py, docs/gate.md), and they can be judged where no timing can be trusted. Each is a
record column (reports/record.py: unit, cross-rank rule), measured after the timed window, never inside it:

- ``flops_counted_per_step``: the FLOPs of one optimizer step on this rank as ``torch.utils.flop_counter.
  FlopCounterMode`` counts them (matmuls 2mnk; attention where its registry has the kernel's formula -- on a CPU
  it has none for the CPU flash-attention kernel, so there attention counts 0; elementwise ops, norms, the loss
  and the optimizer count 0), in one extra, untimed step (a dispatch mode slows every op); summed over ranks, so
  it is the job's FLOPs per step -- except under tensor parallelism, where the mode sees each matmul at its
  DTensor's global shape, before DTensor splits it, so every rank of a tp group counts the whole matmul and the
  sum is tp x the work (measured: tiny tp2+sp sums to twice one process's count). A count, not a model: it
  changes exactly when the executed work does. Left empty under torch.compile: the compiled code's kernels are
  not dispatched one by one, so what the mode would see is not the step's work (the compile counters below speak
  for it).
- ``param_bytes``: bytes of the parameters this rank's optimizer updates (its shards under FSDP, its slices under
  tensor parallelism, its stages under pipelining: ``numel x element size`` of each local tensor), summed over
  ranks (a replica counts once per rank).
- ``optimizer_state_bytes``: bytes of every tensor in the optimizer's state on this rank after the run (AdamW:
  both moments and the step counters), summed over ranks.
- ``graphs_compiled``, ``graph_breaks``: what TorchDynamo compiled during the run, from its own process counters
  (``torch._dynamo.utils.counters``: ``stats/unique_graphs``, the sum of ``graph_break``) at the end of the timed
  window less their values when the run started (a process that trained before, as the tests and the tuner's
  probes do, does not count); 0 without compile; the largest over ranks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch

from models.weights import local_part


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Sum of ``numel x element size`` over the tensors' local parts (a DTensor counts its local shard)."""
    return sum(local_part(t).numel() * local_part(t).element_size() for t in tensors)


def state_bytes(opt: torch.optim.Optimizer) -> dict:
    """``param_bytes`` and ``optimizer_state_bytes`` of this rank (module docstring)."""
    params = [p for group in opt.param_groups for p in group["params"]]
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {"param_bytes": tensor_bytes(params), "optimizer_state_bytes": tensor_bytes(state)}


def compile_counts(since: dict | None = None) -> dict:
    """``graphs_compiled`` and ``graph_breaks`` of this process so far, less ``since`` (an earlier reading)."""
    from torch._dynamo.utils import counters

    now = {"graphs_compiled": int(counters["stats"]["unique_graphs"]),
           "graph_breaks": int(sum(counters["graph_break"].values()))}
    return {k: v - (since or {}).get(k, 0) for k, v in now.items()}


def observed_step(step_fn: Callable[[int], torch.Tensor], step: int, mode, columns: str) -> bool:
    """One extra, untimed step under a dispatch ``mode`` (it slows every op, so never a timed one): True, or False
    with a warning that ``columns`` are left empty when the step fails under it (the timed numbers stand)."""
    try:
        with mode:
            step_fn(step)
    except Exception as exc:
        warnings.warn(f"measurement failed, {columns} left empty: {exc!r}", stacklevel=2)
        return False
    return True


def count_step_flops(step_fn: Callable[[int], torch.Tensor], step: int) -> dict:
    """``flops_counted_per_step`` of this rank from one ``observed_step`` under FlopCounterMode, or {}."""
    from torch.utils.flop_counter import FlopCounterMode

    mode = FlopCounterMode(display=False)
    if not observed_step(step_fn, step, mode, "flops_counted_per_step"):
        return {}
    return {"flops_counted_per_step": int(mode.get_total_flops())}
