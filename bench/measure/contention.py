"""How contended a run was, measured over its timed window (no work in the loop: two reads at its edges).

- ``cpu_util``: process CPU seconds (all threads, ``time.process_time``) / (wall seconds x torch threads),
  a fraction. 1.0: every compute thread ran the whole window. Less: the process waited -- for a core (a
  neighbour, the CPU contention this column is for), for a peer in a collective, or for the GPU -- so
  compare it between runs of the same setup, not across setups. Across ranks: **min** (the most starved
  rank sets a synchronous step's pace). In the A/B gate's turn-taking runs (bench/harness/turn.py) the window
  includes the waits for the other job's steps, so there it is about half and says nothing.
- ``host_load_per_core``: /proc/loadavg's 1-minute load at the window's end / logical CPUs. Across ranks: max.
- ``steal_pct``: CPU time the hypervisor gave to other guests over the window, percent of all CPU time
  (/proc/stat ``steal`` jiffies delta / total jiffies delta x 100). Across ranks: max.
Values that cannot be read (not Linux) are None. GPU clocks and throttling: bench/measure/nvml.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch


def _proc_stat() -> tuple[int, int] | None:
    """(steal jiffies, total jiffies) of the host's aggregate 'cpu' line."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if fields[0] != "cpu" or len(fields) < 9:
        return None
    vals = [int(v) for v in fields[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already inside user/nice]
    return vals[7], sum(vals[:8])


def _load_per_core() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0]) / (os.cpu_count() or 1)
    except (OSError, ValueError, IndexError):
        return None


class ContentionMeter:
    """``start()`` at the window's first step, ``stop() -> dict`` after its last."""

    def start(self) -> None:
        self._cpu, self._wall, self._stat = time.process_time(), time.perf_counter(), _proc_stat()

    def stop(self) -> dict:
        wall = time.perf_counter() - self._wall
        cpu = time.process_time() - self._cpu
        stat = _proc_stat()
        steal = None
        if stat and self._stat and stat[1] > self._stat[1]:
            steal = 100.0 * (stat[0] - self._stat[0]) / (stat[1] - self._stat[1])
        return {"cpu_util": cpu / (wall * torch.get_num_threads()) if wall > 0 else None,
                "host_load_per_core": _load_per_core(), "steal_pct": steal}
