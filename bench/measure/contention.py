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

A probe (bench/measure/bandwidth.py) asks a different question -- did other work share the host while it
ran? -- answered by ``NeighbourMeter`` and ``neighbour_share``: the host's busy CPU time over the probe (steal
counted: another guest ran on our cores) minus the CPU time of the probing processes, as a fraction of all
the host's CPU time.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch


def _cpu_line() -> list[int] | None:
    """The host's aggregate /proc/stat 'cpu' line: user nice system idle iowait irq softirq steal (jiffies)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if fields[0] != "cpu" or len(fields) < 9:
        return None
    return [int(v) for v in fields[1:9]]  # [guest guest_nice follow: already inside user and nice]


def _proc_stat() -> tuple[int, int] | None:
    """(steal jiffies, total jiffies) of the host's aggregate 'cpu' line."""
    vals = _cpu_line()
    return None if vals is None else (vals[7], sum(vals))


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


NEIGHBOURS_MAX = 0.2  # above this share of the host's CPU taken by other work, a probe is not cached


def neighbours_max() -> float:
    """The share of a host other work may take while a probe that is cached runs: ``N00BGPT_NEIGHBOURS_MAX``
    (1 caches every probe: the test suite sets it so that tests of caching do not depend on the CI host's
    neighbours), else ``NEIGHBOURS_MAX``."""
    return float(os.environ.get("N00BGPT_NEIGHBOURS_MAX", NEIGHBOURS_MAX))


class NeighbourMeter:
    """What a probe needs to tell whether other work shared the host while it ran: ``start()`` before its
    trials, ``stop() -> (host busy s, host total s, this process's CPU s)`` after them (host figures None where
    /proc/stat cannot be read). Busy: user + nice + system + irq + softirq + steal (every state but idle and
    iowait); this process's CPU: all its threads' (``time.process_time``), collective threads included."""

    def start(self) -> NeighbourMeter:
        self._cpu, self._line = time.process_time(), _cpu_line()
        return self

    def stop(self) -> tuple[float | None, float | None, float]:
        ours, line = time.process_time() - self._cpu, _cpu_line()
        if line is None or self._line is None:
            return None, None, ours
        hz = os.sysconf("SC_CLK_TCK")
        delta = [b - a for a, b in zip(self._line, line)]
        return (sum(delta) - delta[3] - delta[4]) / hz, sum(delta) / hz, ours

    def sample(self) -> tuple[str, float | None, float | None, float]:
        """``(host name, *stop())``: one rank's entry for ``neighbour_share``."""
        import socket

        return (socket.gethostname(), *self.stop())


def neighbour_share(samples: list[tuple[str, float | None, float | None, float]]) -> float | None:
    """The largest fraction of a host's CPU time that other work took while a probe ran, from every probing
    rank's ``(host name, *NeighbourMeter.stop())``: per host ``(busy - sum of its ranks' CPU) / total`` (its
    ranks read the same host counters; the first one's are used), clipped to [0, 1]; None if no host could be
    read. A fraction of the whole host: one busy neighbour process on a 2-core host is about 0.5."""
    hosts: dict[str, list] = {}
    for host, busy, total, ours in samples:
        if busy is None or not total:
            continue
        h = hosts.setdefault(host, [busy, total, 0.0])
        h[2] += ours
    shares = [min(max((busy - ours) / total, 0.0), 1.0) for busy, total, ours in hosts.values()]
    return max(shares) if shares else None
