"""Peak FLOP/s per device for MFU: a datasheet table for known GPUs, a matmul probe otherwise.

Table values are the dense datasheet peaks of bench/hardware.py (sources there).

On a CPU or a GPU not in the table, ``probe_peak_flops`` times a square matmul in the run's
dtype and takes the best of several trials (the highest throughput this process can reach), and
records the trials' spread, (best - worst) / best, and the probe's own CPU share, process CPU
seconds / (wall seconds x threads). A probe that was itself contended (CPU share < 0.9 or spread
> 0.15: a neighbour took the core during some trials, so even the best may be low) is used for
this run but never cached; a clean one is cached per machine/threads/dtype/torch version (the probe engine,
bench/measure/probe.py, which also judges the host's neighbours); ``N00BGPT_PEAK_CACHE=0`` probes in every run
instead. A peak that came out too low shows as mfu > 1, which bench/harness/loop.py turns into status
``suspect``. Never a silent fallback to another GPU's numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from bench.hardware import GPU_TABLE, lookup_gpu_peak  # noqa: F401 - the datasheet table (re-exported)
from bench.measure.probe import Trial, cache_path, get_or_probe, probe_key

_TORCH_DTYPE = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


CONTENDED_CPU_UTIL = 0.9
CONTENDED_SPREAD = 0.15


@dataclass
class Probe:
    """A matmul probe: best FLOP/s over trials, their spread (best - worst) / best, the probe's CPU share."""

    flops: float
    spread: float
    cpu_util: float | None

    @property
    def contended(self) -> bool:
        return self.spread > CONTENDED_SPREAD or (self.cpu_util is not None and self.cpu_util < CONTENDED_CPU_UTIL)


def probe_peak_flops(device: torch.device, dtype: str, n: int | None = None, repeats: int = 7,
                     min_time_s: float = 0.05) -> Probe:
    """Best observed FLOP/s of an n x n @ n x n matmul (2 n^3 FLOPs) on ``device`` in ``dtype``, over
    ``repeats`` trials, with their spread and (CPU only) the probe's CPU share."""
    if n is None:
        n = 8192 if device.type == "cuda" else (256 if dtype in ("bf16", "fp16") else 1024)
    td = _TORCH_DTYPE[dtype]
    a = torch.randn(n, n, device=device, dtype=td)
    b = torch.randn(n, n, device=device, dtype=td)
    flops = 2.0 * n**3

    def timed(iters: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    timed(2)  # warm-up (kernel selection, page faults)
    iters = 1
    while timed(iters) < min_time_s:  # grow until one repeat lasts long enough to time
        iters *= 2
    cpu0, wall0 = time.process_time(), time.perf_counter()
    rates = [iters * flops / timed(iters) for _ in range(repeats)]
    cpu_util = None
    if device.type == "cpu":
        cpu_util = (time.process_time() - cpu0) / ((time.perf_counter() - wall0) * torch.get_num_threads())
    best = max(rates)
    return Probe(best, (best - min(rates)) / best, cpu_util)


def _probe_key(device: torch.device, dtype: str) -> str:
    return probe_key("matmul", device, dtype)


def get_peak_flops(device: torch.device, dtype: str, allow_probe: bool = True) -> tuple[float | None, str, dict]:
    """Per-device peak FLOP/s for ``dtype``, where it came from ('table:...', 'probe:...' or 'none'), and the
    probe's statistics when one ran now (``peak_probe_spread``, ``peak_probe_cpu_util``; else empty)."""
    if device.type == "cuda":
        hit = lookup_gpu_peak(torch.cuda.get_device_name(device), dtype)
        if hit:
            return *hit, {}
    if not allow_probe:
        return None, "none", {}

    def measure() -> Trial:
        p = probe_peak_flops(device, dtype)
        return Trial({None: p.flops}, ["contended"] if p.contended else [],
                     {"peak_probe_spread": p.spread, "peak_probe_cpu_util": p.cpu_util})

    trial, source = get_or_probe(f"matmul {dtype}", _probe_key(device, dtype), measure,
                                 cached_source=f"probe:cached matmul {dtype} ({cache_path()})")
    return trial.values[None], source, trial.stats
