"""Peak FLOP/s per device for MFU: a datasheet table for known GPUs, a matmul probe otherwise.

Table values are **dense** (no 2:4 sparsity) tensor-core peaks per GPU, in FLOP/s, from NVIDIA's
datasheets (sparse figures halved): H100 SXM5/PCIe/NVL -- "NVIDIA H100 Tensor Core GPU" datasheet;
H200 SXM/NVL -- "NVIDIA H200 Tensor Core GPU" datasheet; A100 -- "NVIDIA A100 Tensor Core GPU"
datasheet; L4, L40S, A10 -- their product datasheets; V100 -- "NVIDIA V100" datasheet. A10G has
no NVIDIA datasheet: the figures are those AWS quotes for G5 instances, marked as such.
'fp32' is the non-tensor-core FP32 peak, 'tf32' the TF32 tensor-core peak.

On a CPU or a GPU not in the table, ``probe_peak_flops`` times a square matmul in the run's
dtype and takes the best of several trials (the highest throughput this process can reach), and
records the trials' spread, (best - worst) / best, and the probe's own CPU share, process CPU
seconds / (wall seconds x threads). A probe that was itself contended (CPU share < 0.9 or spread
> 0.15: a neighbour took the core during some trials, so even the best may be low) is used for
this run but never cached; a clean one is cached per machine/threads/dtype/torch version in
``$N00BGPT_CACHE_DIR`` (default ``~/.cache/n00bgpt``); ``N00BGPT_PEAK_CACHE=0`` probes in every run
instead. A peak that came out too low shows as mfu > 1, which bench/harness/loop.py turns into status
``suspect``. Never a silent fallback to another GPU's numbers.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.measure.host import cpu_model

T = 1e12
# (substring of torch.cuda.get_device_name(), label, {dtype: dense FLOP/s}, source). First match wins,
# so more specific names (NVL, PCIe, A10G) come before the generic ones.
GPU_TABLE: list[tuple[str, str, dict, str]] = [
    ("H100 NVL", "H100 NVL", {"fp32": 60 * T, "tf32": 417.5 * T, "bf16": 835.5 * T, "fp16": 835.5 * T},
     "NVIDIA H100 datasheet (NVL)"),
    ("H100 PCIe", "H100 PCIe", {"fp32": 51.2 * T, "tf32": 378 * T, "bf16": 756 * T, "fp16": 756 * T},
     "NVIDIA H100 datasheet (PCIe)"),
    ("H100", "H100 SXM5", {"fp32": 66.9 * T, "tf32": 494.7 * T, "bf16": 989.4 * T, "fp16": 989.4 * T},
     "NVIDIA H100 datasheet (SXM5)"),
    ("H200 NVL", "H200 NVL", {"fp32": 60 * T, "tf32": 417.5 * T, "bf16": 835.5 * T, "fp16": 835.5 * T},
     "NVIDIA H200 datasheet (NVL)"),
    ("H200", "H200 SXM", {"fp32": 66.9 * T, "tf32": 494.7 * T, "bf16": 989.4 * T, "fp16": 989.4 * T},
     "NVIDIA H200 datasheet (SXM)"),
    ("A100", "A100", {"fp32": 19.5 * T, "tf32": 156 * T, "bf16": 312 * T, "fp16": 312 * T},
     "NVIDIA A100 datasheet"),
    ("L40S", "L40S", {"fp32": 91.6 * T, "tf32": 183 * T, "bf16": 362.05 * T, "fp16": 362.05 * T},
     "NVIDIA L40S datasheet"),
    ("L4", "L4", {"fp32": 30.3 * T, "tf32": 60 * T, "bf16": 121 * T, "fp16": 121 * T}, "NVIDIA L4 datasheet"),
    ("A10G", "A10G", {"fp32": 31.2 * T, "tf32": 35 * T, "bf16": 70 * T, "fp16": 70 * T},
     "AWS G5 instance figures (no NVIDIA A10G datasheet)"),
    ("A10", "A10", {"fp32": 31.2 * T, "tf32": 62.5 * T, "bf16": 125 * T, "fp16": 125 * T}, "NVIDIA A10 datasheet"),
    ("V100", "V100", {"fp32": 15.7 * T, "fp16": 125 * T}, "NVIDIA V100 datasheet (SXM2)"),
]

_TORCH_DTYPE = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def lookup_gpu_peak(device_name: str, dtype: str) -> tuple[float, str] | None:
    """(FLOP/s, source) for a known GPU name and dtype, or None when the table has no entry."""
    for pattern, label, peaks, source in GPU_TABLE:
        if pattern in device_name:
            if dtype not in peaks:
                return None
            return peaks[dtype], f"table:{label} {dtype} ({source})"
    return None


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


def _cache_path() -> Path:
    return Path(os.environ.get("N00BGPT_CACHE_DIR", Path.home() / ".cache" / "n00bgpt")) / "peak_flops.json"


def _probe_key(device: torch.device, dtype: str) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return f"{platform.node()}|{device.type}|{name}|{dtype}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def get_peak_flops(device: torch.device, dtype: str, allow_probe: bool = True) -> tuple[float | None, str, dict]:
    """Per-device peak FLOP/s for ``dtype``, where it came from ('table:...', 'probe:...' or 'none'), and the
    probe's statistics when one ran now (``peak_probe_spread``, ``peak_probe_cpu_util``; else empty)."""
    if device.type == "cuda":
        hit = lookup_gpu_peak(torch.cuda.get_device_name(device), dtype)
        if hit:
            return *hit, {}
    if not allow_probe:
        return None, "none", {}

    def fresh(cache_note: str):
        p = probe_peak_flops(device, dtype)
        note = "contended: not cached" if p.contended else cache_note
        return p, f"probe:measured matmul {dtype}" + (f" ({note})" if note else ""), \
            {"peak_probe_spread": p.spread, "peak_probe_cpu_util": p.cpu_util}

    if os.environ.get("N00BGPT_PEAK_CACHE", "1") == "0":  # a peak measured in this very run
        p, source, stats = fresh("uncached")
        return p.flops, source, stats
    key = _probe_key(device, dtype)
    path = _cache_path()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return float(cache[key]), f"probe:cached matmul {dtype} ({path})", {}
    p, source, stats = fresh("")
    if p.contended:
        return p.flops, source, stats
    cache[key] = p.flops
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass
    return p.flops, source, stats
