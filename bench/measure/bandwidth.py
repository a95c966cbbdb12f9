"""Measured bandwidths for the step-time model (bench/plan/steptime.py), probed and cached like the matmul peak
(bench/measure/peak_flops.py: best of several trials; a memory probe whose trials spread by more than 15 % was
contended and is used for this run only, never cached).

- ``memory_bandwidth``: bytes/s of an elementwise kernel, ``c = a + b`` over 32 Mi fp32 elements (read 2,
  write 1: 3 x 128 MiB per call), on this device with this process's threads -- the rate the model's
  non-matmul operators (norms, activations, residual adds, the loss's softmax, the optimizer) run at.
- ``link_bandwidth``: bus bandwidth of the run's process group (backend, world size), NCCL-tests' definition:
  an all-reduce of S bytes taking t s moves ``2 (n - 1) / n x S / t`` per rank. Every rank takes part; the
  slowest rank's time counts (the collective ends when the last rank's does). Best of 5 trials, cached unless
  other work shared the host (below) -- not judged by its trials' spread, for the reason given next.
- ``collective_bandwidths``: the same bus bandwidth for each collective the strategies issue -- all-reduce,
  all-gather, reduce-scatter (``(n - 1) / n x S / t`` for the last two) -- median of the trials: a backend's
  collectives differ (gloo on this class of host: all-reduce 0.63, all-gather 0.34, reduce-scatter 0.21 GB/s
  of bus bandwidth). ``contended=True`` times them while every rank keeps a matmul thread busy: a CPU host
  with no spare core runs its collectives' threads beside the ranks' compute (measured here: all-reduce
  0.72 -> 0.37 GB/s), which is how a run without a spare core communicates. Gloo's collectives are noisy even
  on a quiet host (trials of one probe spread 20-60 %, medians of back-to-back probes up to 2x apart): the
  median of 9 trials, and never a spread test (it would never cache). So a value cached at a busy moment
  would stay: ``fresh=True`` (``N00BGPT_FRESH_PROBES=1`` for ``main``) probes now and replaces the cached
  value -- python -m bench.tune does, so that every run of its sweep predicts from rates measured with it.

Each is a measurement function handed to the probe engine (bench/measure/probe.py), which reads back, judges the
host's neighbours (over every rank's host for the collectives), caches a clean value and says why it did not:
"probe:measured add (neighbours 48% of the host: not cached)", so that a bandwidth probed beside someone else's
job is not reused on a quiet host.
"""

from __future__ import annotations

import time

import torch

from bench.measure.peak_flops import CONTENDED_SPREAD
from bench.measure.probe import Trial, gather_group, get_or_probe, probe_key


def _best(trial, repeats: int) -> tuple[float, float]:
    """(best, spread) of ``repeats`` rates from ``trial()``."""
    trial()  # warm-up
    rates = [trial() for _ in range(repeats)]
    best = max(rates)
    return best, (best - min(rates)) / best


def memory_bandwidth(device: torch.device, numel: int = 32 * 2**20, repeats: int = 5,
                     fresh: bool = False, neighbours_limit: float | None = None) -> tuple[float, str]:
    """(bytes/s, source) of ``c = a + b`` on ``device`` (see the module docstring; ``fresh``: not from the
    cache; ``neighbours_limit``: the share of the host other work may take while a probe that is cached runs,
    default bench/measure/contention.py ``neighbours_max()``)."""
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

    def measure() -> Trial:
        best, spread = _best(trial, repeats)
        return Trial({None: best}, [f"contended: trials spread {spread:.0%}"] if spread > CONTENDED_SPREAD else [])

    out, source = get_or_probe("add", probe_key("membw", device), measure, fresh=fresh, cache=True,
                               neighbours_limit=neighbours_limit)
    return out.values[None], source


def link_bandwidth(device: torch.device, nbytes: int = 16 * 2**20, repeats: int = 5,
                   fresh: bool = False, neighbours_limit: float | None = None) -> tuple[float, str]:
    """(bus bytes/s, source) of an all-reduce over the default process group; call on every rank (``fresh``:
    not from the cache; ``neighbours_limit`` as for ``memory_bandwidth``, over every rank's host)."""
    import torch.distributed as dist

    n, backend = dist.get_world_size(), dist.get_backend()
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

    # judged by its neighbours only: gloo's trials spread 20-60 % on a quiet host (module docstring), so a
    # spread test flagged three probes in a row here and never cached
    out, source = get_or_probe("all_reduce", probe_key("link", device, backend, f"world={n}"),
                               lambda: Trial({None: _best(trial, repeats)[0]}), fresh=fresh, cache=True,
                               gather=gather_group, neighbours_limit=neighbours_limit)  # every rank caches on its host
    return out.values[None], source


COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")


def collective_bandwidths(device: torch.device, contended: bool = False, nbytes: int = 16 * 2**20,
                          repeats: int = 9, fresh: bool = False,
                          neighbours_limit: float | None = None) -> tuple[dict[str, float], str]:
    """({collective: bus bytes/s}, source) over the default process group (module docstring); call on every
    rank. Cached per host, backend, world size, device, threads and ``contended``; ``fresh``: probed now;
    ``neighbours_limit`` as for ``memory_bandwidth``, over every rank's host (the busy thread of ``contended`` is
    the probe's own CPU, not a neighbour's)."""
    import threading

    import torch.distributed as dist

    n, backend = dist.get_world_size(), dist.get_backend()
    how = "contended " if contended else ""
    full = torch.ones(nbytes // 4, device=device)
    shard = torch.ones(nbytes // 4 // n, device=device)
    ops = {"all_reduce": (lambda: dist.all_reduce(full), 2 * (n - 1) / n),
           "all_gather": (lambda: dist.all_gather_into_tensor(full, shard), (n - 1) / n),
           "reduce_scatter": (lambda: dist.reduce_scatter_tensor(shard, full), (n - 1) / n)}
    slowest = torch.zeros(1, dtype=torch.float64, device=device)

    def measure() -> Trial:
        stop = threading.Event()

        def busy():  # the other compute thread of a rank without a spare core (matmuls release the GIL)
            a = torch.randn(512, 512, device=device)
            while not stop.is_set():
                torch.mm(a, a)

        thread = threading.Thread(target=busy, daemon=True) if contended else None
        if thread:
            thread.start()
        out = {}
        try:
            for kind, (op, factor) in ops.items():
                op()  # warm-up
                rates = []
                for _ in range(repeats):
                    dist.barrier()
                    t0 = time.perf_counter()
                    op()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    slowest[0] = time.perf_counter() - t0
                    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                    rates.append(factor * nbytes / slowest.item())
                out[kind] = sorted(rates)[len(rates) // 2]
        finally:
            stop.set()
            if thread:
                thread.join()
        return Trial(out)

    key = probe_key("coll", device, backend, f"world={n}", f"contended={contended}")
    out, source = get_or_probe(f"{how}collectives", key, measure, COLLECTIVES, fresh=fresh, cache=True,
                               gather=gather_group, neighbours_limit=neighbours_limit)  # every rank caches on its host
    return out.values, source


def main() -> None:
    """``torchrun --nproc_per_node=N -m bench.measure.bandwidth``: probe (and cache) this group's all-reduce bus
    bandwidth, each collective's and the elementwise memory bandwidth (``N00BGPT_CONTENDED=1``: the collectives
    beside busy compute; ``N00BGPT_FRESH_PROBES=1``: measured now whatever is cached); rank 0 prints them as
    JSON (bench.tune runs this)."""
    import json
    import os

    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        multi = dist.get_world_size() > 1
        fresh = os.environ.get("N00BGPT_FRESH_PROBES", "0") == "1"
        link = link_bandwidth(device, fresh=fresh) if multi else (None, None)
        contended = os.environ.get("N00BGPT_CONTENDED", "0") == "1"  # python -m bench.tune: a host without a spare core
        kinds = collective_bandwidths(device, contended, fresh=fresh) if multi else (None, None)
        mem = memory_bandwidth(device, fresh=fresh) if dist.get_rank() == 0 else None
        if dist.get_rank() == 0:
            print(json.dumps({"link_bw": link[0], "link_source": link[1], "mem_bw": mem[0], "mem_source": mem[1],
                              "link_bw_by_kind": kinds[0], "link_by_kind_source": kinds[1]}))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
