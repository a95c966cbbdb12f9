"""The one probe engine: measure, judge whether the host was busy, cache or not, read back.

A probe measures a rate of this host that a run or a prediction needs (the matmul peak for MFU,
bench/measure/peak_flops.py; memory and collective bandwidths, bench/measure/bandwidth.py; the model's own parts,
bench/measure/parts.py). Each of them is a plain measurement function returning a ``Trial``; ``get_or_probe``
does the rest, the same way for all:

1. **read back**: every value under the probe's key in the cache (``$N00BGPT_CACHE_DIR/probes.json``, default
   ``~/.cache/n00bgpt``) -- and, for a probe taken by several ranks together, on every rank (``gather``), or it
   is measured again by all of them;
2. **measure** (``measure()``), while a ``NeighbourMeter`` watches the host (bench/measure/contention.py);
   several ranks' values combine by ``combine`` (default ``max``: the slowest rank's time, or the rate every
   rank already agreed on);
3. **judge**: the measurement's own evidence of contention (``Trial.contended``: a spread of trials, a CPU share)
   and the share of the host other work took while it ran, over every rank's host (above ``neighbours_max()``,
   ``N00BGPT_NEIGHBOURS_MAX``, default a fifth);
4. **cache or not**: a clean value is cached (by every rank whose ``writer`` is true: each host keeps its own
   cache, so every rank of a multi-node group writes by default), a contended one serves this
   run only, and its source says why: ``probe:measured add (contended: trials spread 20%, neighbours 48% of the
   host: not cached)``. ``probe:cached <what>`` for a value read back.

Keys (``probe_key``) name the host, the device model, the compute threads and the torch version, then what
else the value depends on: a value measured on another host, CPU model, thread count or torch is never read
back as this one's. ``N00BGPT_PEAK_CACHE=0`` measures in every run (``use_cache=False``: "uncached");
``fresh=True`` measures now and replaces what is cached.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.measure.contention import NeighbourMeter, neighbour_share, neighbours_max
from bench.measure.host import cpu_model


@dataclass
class Trial:
    """What a measurement function returns: its values by name, the reasons its own evidence gives for a
    contended measurement (empty: clean), and extra row columns it wants recorded (e.g. a spread)."""

    values: dict[str, float]
    contended: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)


def cache_path() -> Path:
    return Path(os.environ.get("N00BGPT_CACHE_DIR", Path.home() / ".cache" / "n00bgpt")) / "probes.json"


def use_cache() -> bool:
    """False when ``N00BGPT_PEAK_CACHE=0``: every run measures its own rates."""
    return os.environ.get("N00BGPT_PEAK_CACHE", "1") != "0"


def probe_key(kind: str, device: torch.device, *fields) -> str:
    """The cache key of a probe of ``kind`` on this host: host name, device type and model (the CPU's or the
    GPU's), compute threads and torch version, then ``fields`` (what else the probe's value depends on)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return "|".join(map(str, (kind, platform.node(), device.type, name, f"threads={torch.get_num_threads()}",
                              f"torch={torch.__version__}", *fields)))


def cache_get(key: str) -> float | None:
    """A clean probe's cached value for ``key``, or None."""
    try:
        value = json.loads(cache_path().read_text()).get(key)
    except (OSError, ValueError):
        return None
    return None if value is None else float(value)


def cache_put(key: str, value: float) -> None:
    """Store a clean probe's value: read, update and atomically replace the file under an exclusive lock (the
    ranks of a group and parallel runs share one cache: without it, two writers that read the same file each
    drop the other's new key); a read-only home is not an error."""
    import fcntl

    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                cache = json.loads(path.read_text())
            except (OSError, ValueError):
                cache = {}
            cache[key] = value
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            os.replace(tmp, path)
    except OSError:
        pass


def gather_group(obj) -> list:
    """Every rank's ``obj`` over the default process group (a collective: every rank calls it)."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def get_or_probe(what: str, key: str, measure: Callable[[], Trial], names: Sequence[str | None] = (None,), *,
                 fresh: bool = False, cache: bool | None = None, gather: Callable[[object], list] | None = None,
                 combine: Callable = max, writer: bool = True, neighbours_limit: float | None = None,
                 cached_source: str | None = None) -> tuple[Trial, str]:
    """The probe's values (``Trial``) and their source, by the four steps of the module docstring. ``names``: the
    values it measures (``None``: one value, cached under ``key`` itself; else under ``key|name``). ``cache``:
    read and write the cache (default ``use_cache()``). ``gather``: every rank's object, for a probe all ranks
    take together (None: this process alone)."""
    cache = use_cache() if cache is None else cache
    gather = gather or (lambda obj: [obj])
    keys = [key if n is None else f"{key}|{n}" for n in names]
    if cache and not fresh:
        hits = [cache_get(k) for k in keys]
        if all(all(v is not None for v in h) for h in gather(hits)):  # every rank must agree to skip the probe
            return Trial(dict(zip(names, hits))), cached_source or f"probe:cached {what}"
    meter = NeighbourMeter().start()
    trial = measure()
    ranks = gather((trial.values, meter.sample()))
    values = {n: combine(v[n] for v, _ in ranks) for n in names}
    share = neighbour_share([s for _, s in ranks])
    limit = neighbours_max() if neighbours_limit is None else neighbours_limit
    why = list(trial.contended) + ([f"neighbours {share:.0%} of the host"] if share is not None and share > limit
                                   else [])
    if why:
        note = f"{', '.join(why)}: not cached"
    else:
        note = "" if cache else "uncached"
        if cache and writer:
            for k, n in zip(keys, names):
                cache_put(k, values[n])
    return Trial(values, why, trial.stats), f"probe:measured {what}" + (f" ({note})" if note else "")
