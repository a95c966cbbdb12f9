"""Every number in a result row is defined here (formula, unit, rule for combining ranks).

Timing
- ``step_time_s[i]``: wall time of timed step i (forward+backward of all micro-batches and the
  optimizer step), seconds. CUDA: events recorded on the current stream at step start/end and
  read once after the run (no per-step host sync). CPU: ``time.perf_counter`` (CPU ops are
  synchronous). Warm-up steps are excluded. Across ranks: per step, the **max** over ranks (a
  synchronous step is as slow as its slowest rank).
- ``step_time_median_s``, ``step_time_p10_s``, ``step_time_p90_s``: percentiles of those
  (numpy.percentile, linear interpolation between order statistics), seconds.
- ``tokens_per_sec`` = timed_steps * global_batch_tokens / sum(step_time_s)   [tokens/s, global]
- ``tokens_per_sec_per_device`` = tokens_per_sec / world_size                  [tokens/s/device]

FLOPs utilisation
- ``mfu`` = train_flops_per_token * tokens_per_sec_per_device / peak_flops   [fraction 0..1]
  with train_flops_per_token from models/flops.py (3 x forward matmul FLOPs) and
  ``peak_flops`` the per-device peak for the run's compute dtype (bench/measure/peak_flops.py).
- ``hfu`` = (train_flops_per_token + recompute_flops_per_token) * tokens_per_sec_per_device
  / peak_flops: hardware FLOPs, counting activation-checkpoint recomputation.

Plausibility: a row whose ``mfu`` or ``hfu`` exceeds 1 reports more FLOP/s than the peak, which cannot
be true (the peak was measured too low, e.g. a contended probe, or the FLOP count is wrong): such a run
gets status ``suspect`` with the reason (``reports.record.implausible``), never ``ok``.

Memory (memory.py), GPU telemetry (nvml.py) and contention (contention.py) are defined in their modules
of bench/measure/.
"""

from __future__ import annotations

import time

import numpy as np
import torch


class StepTimer:
    """Per-step durations without a host sync in the loop; ``durations_s()`` syncs once at the end."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._starts: list = []
        self._ends: list = []

    def _mark(self):
        """A recorded CUDA event (read later) or the host clock."""
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def start(self) -> None:
        self._starts.append(self._mark())

    def stop(self) -> None:
        self._ends.append(self._mark())

    def durations_s(self) -> list[float]:
        """Seconds per recorded step."""
        if self.cuda:
            torch.cuda.synchronize()
            return [s.elapsed_time(e) / 1e3 for s, e in zip(self._starts, self._ends)]
        return [e - s for s, e in zip(self._starts, self._ends)]


def combine_step_times(per_rank: list[list[float]]) -> list[float]:
    """Per-step max over ranks: ``per_rank[r][i]`` -> ``[max_r per_rank[r][i] for i]``."""
    return [max(ts) for ts in zip(*per_rank)]


def throughput(step_times_s: list[float], global_batch_tokens: int, world_size: int) -> dict:
    """tokens_per_sec (global) and tokens_per_sec_per_device from the combined step times."""
    total = sum(step_times_s)
    tps = len(step_times_s) * global_batch_tokens / total
    return {"tokens_per_sec": tps, "tokens_per_sec_per_device": tps / world_size}


def step_time_stats(step_times_s: list[float]) -> dict:
    """Median, p10, p90 and mean of the combined step times, seconds."""
    return {
        "step_time_median_s": float(np.percentile(step_times_s, 50)),
        "step_time_p10_s": float(np.percentile(step_times_s, 10)),
        "step_time_p90_s": float(np.percentile(step_times_s, 90)),
        "step_time_mean_s": sum(step_times_s) / len(step_times_s),
    }


def flops_utilisation(flops_per_token: float, tokens_per_sec_per_device: float,
                      peak_flops: float | None) -> float | None:
    """Achieved FLOP/s per device / peak FLOP/s per device (fraction), or None without a peak."""
    if not peak_flops:
        return None
    return flops_per_token * tokens_per_sec_per_device / peak_flops
