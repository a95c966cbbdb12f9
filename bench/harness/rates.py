"""The rates a run's prediction needs, probed after the run, every rank together: not steps of the run.

bench/run.py calls ``probe_rates`` once the timed window and its untimed measurements are over (so no probe
competes with training and no probe buffer sits in the measured peak), then hands the rates to
bench/plan/annotate.py. Each probe is bench/measure/'s (the probe engine, bench/measure/probe.py: cached per
host, not cached when the host was busy):

- memory bandwidth on rank 0 alone (then shared), the all-reduce's bus bandwidth on every rank together;
- with ``full``: each collective's bus bandwidth (``contended``: with the ranks' compute threads busy, which is how
  a CPU host without a spare core communicated) and, with ``probe_parts=true``, the model's own parts at the
  run's shapes, split as the run's tensor parallelism splits them (``parts_sharding``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial

import torch.distributed as dist

from bench.harness.config import RunConfig
from bench.harness.dist import DistInfo, broadcast_object, gather_objects
from bench.measure.bandwidth import collective_bandwidths, link_bandwidth, memory_bandwidth
from bench.measure.parts import Parts, Sharding, get_parts
from strategies.pp import pipeline_micro_batch
from strategies.tp import apply_tp, maybe_loss_parallel


@dataclass
class ProbedRates:
    """What the probes measured for this run, and the row columns that record it (rates and their sources)."""

    mem_bw: float | None = None
    link_bw: float | None = None
    by_kind: dict | None = None
    parts: Parts | None = None
    columns: dict = field(default_factory=dict)


def parts_sharding(s, mesh) -> Sharding | None:
    """How strategy ``s`` splits the model's parts (bench/measure/parts.py times them so): tensor parallelism on
    ``mesh``'s tp dimension, forward and backward in loss_parallel; None without it."""
    if s.tp == 1:
        return None
    return Sharding(s.tp, s.sp, partial(apply_tp, tp_mesh=mesh["tp"], sp=s.sp), lambda: maybe_loss_parallel(s))


def probe_rates(cfg: RunConfig, info: DistInfo, mesh, full: bool = True, contended: bool = False) -> ProbedRates:
    """Call on every rank at once (see the module docstring)."""
    device, world = info.device, info.world_size
    mem_bw, mem_src = broadcast_object(memory_bandwidth(device) if info.is_main else None, info)
    link_bw, link_src = link_bandwidth(device) if world > 1 else (None, None)
    out = ProbedRates(mem_bw, link_bw, columns={"mem_bw_bytes_per_s": mem_bw, "mem_bw_source": mem_src,
                                                "link_bw_bytes_per_s": link_bw, "link_bw_source": link_src})
    if not full:
        return out
    if world > 1:
        out.by_kind, source = collective_bandwidths(device, contended=contended)
        out.columns.update(link_bw_by_kind=out.by_kind, link_bw_by_kind_source=source)
    if cfg.probe_parts:
        local_ranks = max(1, world // max(1, info.nnodes))
        out.parts, source = get_parts(cfg.model, pipeline_micro_batch(cfg.strategy, cfg.micro_batch), cfg.seq_len,
                                      device, local_ranks, gather=lambda obj: gather_objects(obj, info),
                                      barrier=dist.barrier if world > 1 else (lambda: None), is_main=info.is_main,
                                      dtype=cfg.strategy.compute_dtype_name(device.type),
                                      shard=parts_sharding(cfg.strategy, mesh))
        out.columns["pred_parts"] = {**asdict(out.parts), "source": source}
    return out
