"""Exposed communication: the time a rank communicates while it computes nothing.

Interval arithmetic over one rank's timeline (seconds), from a profiler trace of a few untimed steps
(``trace_intervals``) or any other source of (start, end) pairs:

- ``comm``: intervals when a collective runs (GPU: NCCL kernels, any stream; CPU gloo: the collective's own
  work, on whichever thread runs it);
- ``compute``: intervals when anything else runs (GPU: every other kernel; CPU: the training thread's
  operators outside collectives and waits).

Per step, over ``n_steps`` profiled steps (each column divided by ``n_steps``):

- ``comm_time_s``     = |U comm|: time with at least one collective in flight;
- ``compute_time_s``  = |U compute|;
- ``exposed_comm_s``  = |U comm - U compute|: communication with no compute anywhere on the rank, the part of
  the step communication adds when nothing hides it;
- ``overlap_pct``     = 100 x (comm_time_s - exposed_comm_s) / comm_time_s (None without communication);
- ``matmul_time_s``   = |U matmul|: the part of compute in matrix multiplies and attention (the rest of
  ``compute_time_s`` is elementwise, memory-bound work): the step-time model's two compute components.

Unions are taken over all streams and threads, never sums of per-kernel times: two collectives in flight
at once count once, and compute on another stream hides communication. Cross-rank rule: max (the slowest
rank's exposure sets the step).
"""

from __future__ import annotations

Interval = tuple[float, float]


def union(intervals) -> list[Interval]:
    """The sorted, disjoint union of (start, end) intervals (empty ones dropped)."""
    out: list[list[float]] = []
    for start, end in sorted((float(s), float(e)) for s, e in intervals if e > s):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


def length(intervals) -> float:
    """Total length of the union of ``intervals``."""
    return sum(e - s for s, e in union(intervals))


def subtract(a, b) -> list[Interval]:
    """The parts of U ``a`` that lie outside U ``b``."""
    out, cover = [], union(b)
    for start, end in union(a):
        cursor = start
        for s, e in cover:
            if e <= cursor:
                continue
            if s >= end:
                break
            if s > cursor:
                out.append((cursor, s))
            cursor = max(cursor, e)
            if cursor >= end:
                break
        if cursor < end:
            out.append((cursor, end))
    return out


def exposure(comm, compute, n_steps: int = 1) -> dict:
    """The record columns (per step) for one rank's ``comm`` and ``compute`` intervals over ``n_steps`` steps."""
    if n_steps < 1:
        raise ValueError(f"n_steps={n_steps} must be >= 1")
    c, k = length(comm), length(compute)
    exposed = length(subtract(comm, compute))
    return {"comm_time_s": c / n_steps, "compute_time_s": k / n_steps, "exposed_comm_s": exposed / n_steps,
            "overlap_pct": 100.0 * (c - exposed) / c if c > 0 else None}


# Names of the events that are communication: NCCL kernels, gloo's collectives (the record_function gloo
# opens when a collective is issued and closes when it completes, on whichever thread), c10d's ops.
_COMM_MARKS = ("nccl", "gloo:", "c10d::", "record_param_comms")
# Host events that are neither compute nor communication: waiting, and annotations that enclose both.
_NOT_COMPUTE = ("wait", "synchronize", "profilerstep", "fsdp::", "ddp", "cudaStreamWaitEvent", "cudaEventSynchronize")


# Matrix multiplies (the FLOPs models/flops.py counts): host operators and GPU kernel name fragments.
_MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product")
_MATMUL_KERNELS = ("gemm", "cutlass", "xmma", "flash", "fmha", "cublas")


def trace_intervals(events, device_type: str) -> tuple[list[Interval], list[Interval], list[Interval]]:
    """(comm, compute, matmul) intervals in seconds from torch.profiler's ``prof.events()``; matmul is the part
    of compute spent in matrix multiplies and attention (the rest of compute is elementwise, memory-bound).

    CUDA: device events only (kernels, copies, sets); comm = NCCL kernels, compute = all others, any stream.
    CPU: comm = gloo's collective events (issue to completion), on any thread; compute = ``aten::`` operators
    of every thread, outside the waits and annotations above."""
    comm, compute, matmul = [], [], []
    for e in events:
        name = e.name.lower()
        span = (e.time_range.start / 1e6, e.time_range.end / 1e6)
        on_device = "cuda" in str(e.device_type).lower()
        if device_type == "cuda":
            if on_device:
                if "nccl" in name:
                    comm.append(span)
                else:
                    compute.append(span)
                    if any(k in name for k in _MATMUL_KERNELS):
                        matmul.append(span)
        elif any(m in name for m in _COMM_MARKS):
            comm.append(span)
        elif name.startswith("aten::") and not any(m.lower() in name for m in _NOT_COMPUTE):
            compute.append(span)
            if name.startswith(_MATMUL_OPS):
                matmul.append(span)
    return comm, compute, matmul


def profiled_exposure(run_steps, device_type: str, n_steps: int) -> dict:
    """Run ``run_steps()`` (``n_steps`` training steps) under torch.profiler (host, and CUDA kernels on a GPU)
    and return this rank's ``exposure`` columns per step. The profiler slows every operator a little, so the
    harness calls this after the timed window, never inside it."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    with profile(activities=acts, record_shapes=False, with_stack=False) as prof:
        run_steps()
    comm, compute, matmul = trace_intervals(prof.events(), device_type)
    return {**exposure(comm, compute, n_steps), "matmul_time_s": length(matmul) / n_steps}
