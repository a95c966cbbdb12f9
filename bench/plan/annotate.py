"""Predictions beside a run's measurements: one call, outside the timed loop, that annotates a row.

bench/run.py calls ``annotate_run`` before the row is written: ``probe_rates`` (every rank, after the timed window
and its untimed measurements, so no probe competes with training and no probe buffer sits in the measured peak),
then ``annotate`` (pure: the config, the strategy and the rates). The loop (bench/harness/loop.py) imports nothing from
here: it trains, times and records.

- predicted memory and communication (bench/plan/costmodel.py) need the config alone: every row has them,
  a failed run's too (an out-of-memory row says what the model predicted);
- predicted step time (bench/plan/steptime.py) needs rates: the run's measured peak FLOP/s (the MFU
  denominator, measured by the run itself), and the probes below.

The probes (bench/measure/bandwidth.py, bench/measure/parts.py; each cached per host, and not cached when the
host was busy: bench/measure/contention.py) are optional inputs: ``probe_rates(full=False)`` takes only the two cheap
bandwidths (memory, all-reduce), ``full=True`` also each collective's bandwidth and, with ``probe_parts=true``,
the model's own parts at the run's shapes.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.distributed as dist

from bench.harness.config import RunConfig
from bench.harness.dist import DistInfo, broadcast_object, gather_objects
from bench.harness.loop import TrainOutcome
from bench.measure.bandwidth import collective_bandwidths, link_bandwidth, memory_bandwidth
from bench.measure.parts import Parts, Sharding, get_parts
from bench.plan.costmodel import predict_comm, predict_memory
from bench.plan.steptime import Rates, can_overlap, parts_micro_batch, predict_step
from strategies import maybe_loss_parallel
from strategies.pp import bubble_fraction
from strategies.tp import apply_tp


@dataclass
class ProbedRates:
    """What the probes measured for this run, and the row columns that record it (rates and their sources)."""

    mem_bw: float | None = None
    link_bw: float | None = None
    by_kind: dict | None = None
    parts: Parts | None = None
    columns: dict = field(default_factory=dict)


def can_overlap_here(info: DistInfo) -> bool:
    """Whether this run's communication can run beside its compute (bench/plan/steptime.py ``can_overlap``)."""
    local_ranks = max(1, info.world_size // max(1, info.nnodes))
    return can_overlap(info.device.type, local_ranks, torch.get_num_threads(), len(os.sched_getaffinity(0)))


def parts_sharding(s, mesh) -> Sharding | None:
    """How strategy ``s`` splits the model's parts (bench/measure/parts.py times them so): tensor parallelism on
    ``mesh``'s tp dimension, forward and backward in loss_parallel; None without it."""
    if s.tp == 1:
        return None
    return Sharding(s.tp, s.sp, partial(apply_tp, tp_mesh=mesh["tp"], sp=s.sp), lambda: maybe_loss_parallel(s))


def probe_rates(cfg: RunConfig, info: DistInfo, mesh, full: bool = True) -> ProbedRates:
    """Call on every rank at once. Memory bandwidth on rank 0 alone (then shared), the all-reduce's bus bandwidth
    on every rank together; with ``full`` each collective's bus bandwidth (on a CPU host with no spare core with
    the ranks' compute threads busy, which is how the run's collectives ran) and, with ``cfg.probe_parts``, the
    model's parts (cached for this shape and host, or timed on every rank at once now, the slowest rank's)."""
    device, world = info.device, info.world_size
    mem_bw, mem_src = broadcast_object(memory_bandwidth(device) if info.is_main else None, info)
    link_bw, link_src = link_bandwidth(device) if world > 1 else (None, None)
    out = ProbedRates(mem_bw, link_bw, columns={"mem_bw_bytes_per_s": mem_bw, "mem_bw_source": mem_src,
                                                "link_bw_bytes_per_s": link_bw, "link_bw_source": link_src})
    if not full:
        return out
    if world > 1:
        out.by_kind, source = collective_bandwidths(device, contended=not can_overlap_here(info))
        out.columns.update(link_bw_by_kind=out.by_kind, link_bw_by_kind_source=source)
    if cfg.probe_parts:
        local_ranks = max(1, world // max(1, info.nnodes))
        out.parts, source = get_parts(cfg.model, parts_micro_batch(cfg.strategy, cfg.micro_batch), cfg.seq_len,
                                      device, local_ranks, gather=lambda obj: gather_objects(obj, info),
                                      barrier=dist.barrier if world > 1 else (lambda: None), is_main=info.is_main,
                                      dtype=cfg.strategy.compute_dtype_name(device.type),
                                      shard=parts_sharding(cfg.strategy, mesh))
        out.columns["pred_parts"] = {**asdict(out.parts), "source": source}
    return out


def annotate(cfg: RunConfig, world_size: int, batch: dict, peak_flops: float | None = None,
             rates: ProbedRates | None = None, overlap: bool = False) -> dict:
    """The prediction columns of a row (reports/record.py defines each) from the config, the strategy and,
    when given, the run's peak FLOP/s and probed rates. Pure: no probe, no collective."""
    s = cfg.strategy
    mem = predict_memory(cfg.model, s, world_size, cfg.micro_batch, cfg.seq_len)
    comm = predict_comm(cfg.model, s, world_size, batch["grad_accum"], micro_batch=cfg.micro_batch,
                        seq_len=cfg.seq_len)
    out = {"pred_peak_mem_bytes": mem["total"],
           "pred_mem_breakdown": {k: v for k, v in mem.items() if k != "total"},
           "pred_comm_bytes_per_step": comm["total"],
           "pred_comm_breakdown": {k: v for k, v in comm.items() if k != "total"},
           "pred_bubble_fraction": bubble_fraction(s)}
    if rates is None:
        return out
    out.update(rates.columns)
    if peak_flops:
        p = predict_step(cfg.model, s, world_size, cfg.micro_batch, cfg.seq_len, batch["grad_accum"],
                         Rates(peak_flops, rates.mem_bw, rates.link_bw, rates.parts, rates.by_kind), overlap)
        out.update(pred_step_time_s=p["step_s"], pred_tokens_per_sec=p["tokens_per_sec"],
                   pred_step_breakdown={k: v for k, v in p.items() if k not in ("step_s", "tokens_per_sec")})
    return out


def annotate_run(cfg: RunConfig, info: DistInfo, batch: dict, outcome: TrainOutcome | None) -> dict:
    """The row's prediction columns, after training (what bench/run.py calls). A run that finished (every rank
    here together) probes the rates first -- all of them when it ended ok, the two cheap bandwidths after a
    NaN -- and predicts its step time too (a probe that fails fails the run, as any measurement would); a
    failed run (``outcome`` None: ranks may be gone) gets the predictions that need no probe, or none if even
    those fail (the failure's own row matters more)."""
    if outcome is None:
        try:
            return annotate(cfg, info.world_size, batch)
        except Exception as exc:
            print(f"[n00bGPT] predictions left empty: {type(exc).__name__}: {exc}", file=sys.stderr)
            return {}
    rates = probe_rates(cfg, info, outcome.mesh, full=outcome.status in ("ok", "suspect"))
    return annotate(cfg, info.world_size, batch, outcome.metrics.get("peak_flops"), rates, can_overlap_here(info))
