"""Measured bandwidths for the step-time model (bench/plan/steptime.py), probed and cached like the matmul peak
(bench/measure/peak_flops.py: best of several trials; a probe whose trials spread by more than 15 % was
contended and is used for this run only, never cached).

- ``memory_bandwidth``: bytes/s of an elementwise kernel, ``c = a + b`` over 32 Mi fp32 elements (read 2,
  write 1: 3 x 128 MiB per call), on this device with this process's threads -- the rate the model's
  non-matmul operators (norms, activations, residual adds, the loss's softmax, the optimizer) run at.
- ``link_bandwidth``: bus bandwidth of the run's process group (backend, world size), NCCL-tests' definition:
  an all-reduce of S bytes taking t s moves ``2 (n - 1) / n x S / t`` per rank. Every rank takes part; the
  slowest rank's time counts (the collective ends when the last rank's does).
"""

from __future__ import annotations

import platform
import time

import torch

from bench.measure.host import cpu_model
from bench.measure.peak_flops import CONTENDED_SPREAD, cache_get, cache_put


def _best(trial, repeats: int) -> tuple[float, float]:
    """(best, spread) of ``repeats`` rates from ``trial()``."""
    trial()  # warm-up
    rates = [trial() for _ in range(repeats)]
    best = max(rates)
    return best, (best - min(rates)) / best


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def memory_bandwidth(device: torch.device, numel: int = 32 * 2**20, repeats: int = 5) -> tuple[float, str]:
    """(bytes/s, source) of ``c = a + b`` on ``device`` (see the module docstring)."""
    key = f"membw|{platform.node()}|{device.type}|{_device_name(device)}|threads={torch.get_num_threads()}"
    hit = cache_get(key)
    if hit is not None:
        return hit, "probe:cached add"
    a, b = torch.rand(numel, device=device), torch.rand(numel, device=device)
    c = torch.empty_like(a)

    def trial() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.add(a, b, out=c)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return 3 * numel * 4 / (time.perf_counter() - t0)

    best, spread = _best(trial, repeats)
    if spread <= CONTENDED_SPREAD:
        cache_put(key, best)
    return best, "probe:measured add" + ("" if spread <= CONTENDED_SPREAD else " (contended: not cached)")


def link_bandwidth(device: torch.device, nbytes: int = 16 * 2**20, repeats: int = 5) -> tuple[float, str]:
    """(bus bytes/s, source) of an all-reduce over the default process group; call on every rank."""
    import torch.distributed as dist

    n, backend = dist.get_world_size(), dist.get_backend()
    key = f"link|{platform.node()}|{backend}|world={n}|{_device_name(device)}"
    hit = torch.tensor([cache_get(key) or 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(hit, op=dist.ReduceOp.MIN)  # every rank must agree to skip the probe
    if hit.item() > 0:
        return hit.item(), "probe:cached all_reduce"
    x = torch.ones(nbytes // 4, device=device)
    slowest = torch.zeros(1, dtype=torch.float64, device=device)

    def trial() -> float:
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        slowest[0] = time.perf_counter() - t0
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        return 2 * (n - 1) / n * nbytes / slowest.item()

    best, spread = _best(trial, repeats)
    if spread <= CONTENDED_SPREAD:
        cache_put(key, best)
    return best, "probe:measured all_reduce" + ("" if spread <= CONTENDED_SPREAD else " (contended: not cached)")


def main() -> None:
    """``torchrun --nproc_per_node=N -m bench.measure.bandwidth``: probe (and cache) this group's all-reduce bus
    bandwidth and the elementwise memory bandwidth; rank 0 prints them as JSON (bench.tune runs this)."""
    import json
    import os

    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        link = link_bandwidth(device) if dist.get_world_size() > 1 else (None, None)
        mem = memory_bandwidth(device) if dist.get_rank() == 0 else None
        if dist.get_rank() == 0:
            print(json.dumps({"link_bw": link[0], "link_source": link[1], "mem_bw": mem[0], "mem_source": mem[1]}))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
