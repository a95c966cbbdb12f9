"""The timed training loop: build on meta -> strategies -> materialise/init -> optimizer -> steps.

``train`` runs on every rank and returns the same combined metrics on every rank. Inside the
timed window the only host syncs are the ones the measurement needs: none per step on CUDA
(events are read after the loop) and one small all-reduce of the recent losses every
``log_every`` steps (progress + NaN check), which falls *between* timed steps.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from bench.harness.config import ConfigError, RunConfig
from bench.harness.data import build_data
from bench.harness.dist import DistInfo, broadcast_object, gather_objects
from bench.harness.turn import get_turnstile
from bench.measure import memory, metrics
from bench.measure.comm import CommCounter
from bench.measure.contention import ContentionMeter, combine_contention
from bench.measure.nvml import NvmlSampler, combine_nvml
from bench.measure.peak_flops import get_peak_flops
from bench.plan.costmodel import predict_comm, predict_memory
from models import build_model, count_params, recompute_flops_per_token, train_flops_per_token
from reports.record import implausible
from strategies import apply_strategies, get_autocast, get_grad_scaler, maybe_no_sync
from strategies.config import StrategyError


class InjectedFailure(RuntimeError):
    """Raised by ``debug_fail_step`` to test the failure path."""


@dataclass
class TrainOutcome:
    status: str  # 'ok', 'nan', or 'suspect' (finished, but a number cannot be true: metrics.implausible)
    metrics: dict
    losses: list[float] = field(default_factory=list)  # global mean loss per step (warm-up included)
    step_times_s: list[float] = field(default_factory=list)  # combined timed step times


def _elapsed_since(t0: float, device: torch.device) -> float:
    """Host seconds since ``t0`` with the device's queued work finished (DEBUG paths only: it syncs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _spin(seconds: float) -> None:
    """Busy-wait (not sleep): an injected slowdown that competes for the CPU like real work."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def plan_batch(cfg: RunConfig, info: DistInfo) -> dict:
    """Batch arithmetic, once: dp size, grad_accum, global batch in sequences and tokens."""
    dp = info.world_size if cfg.strategy.dp != "none" else 1
    ga = cfg.resolve_grad_accum(dp)
    seqs = cfg.micro_batch * ga * dp
    return {"dp_size": dp, "grad_accum": ga, "global_batch_seqs": seqs, "global_batch_tokens": seqs * cfg.seq_len}


def _mean_over_ranks(values: list[torch.Tensor], dp_size: int) -> list[float]:
    stacked = torch.stack(values)
    if dist.is_initialized() and dp_size > 1:
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked = stacked / dist.get_world_size()
    return stacked.cpu().tolist()


class _Profiler:
    """torch.profiler over timed steps 2..4 of rank 0 (``profile_dir``); a no-op otherwise."""

    def __init__(self, cfg: RunConfig, info: DistInfo, run_id: str):
        self.prof = None
        if not (cfg.profile_dir and info.is_main):
            return
        from torch.profiler import ProfilerActivity, profile, schedule

        self.out = Path(cfg.profile_dir)
        self.run_id = run_id
        self.cuda = info.device.type == "cuda"
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.prof = profile(activities=acts, schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
                            record_shapes=False, with_stack=False)

    def start(self):
        if self.prof:
            self.prof.__enter__()

    def step(self):
        if self.prof:
            self.prof.step()

    def stop(self):
        if not self.prof:
            return
        self.prof.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        raw = self.out / f"{self.run_id}.json"
        self.prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
        key = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        with contextlib.suppress(Exception):
            (self.out / f"{self.run_id}.txt").write_text(self.prof.key_averages().table(sort_by=key, row_limit=40))


def train(cfg: RunConfig, info: DistInfo, progress: Callable[[str], None] | None = None,
          run_id: str = "run") -> TrainOutcome:
    s, device = cfg.strategy, info.device
    try:
        s.validate_for(device.type, info.world_size)
    except StrategyError as exc:
        raise ConfigError(str(exc)) from exc
    batch = plan_batch(cfg, info)
    dp, ga = batch["dp_size"], batch["grad_accum"]
    dtype_name = s.compute_dtype_name(device.type)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if s.tf32 else "highest")  # high = TF32 matmuls
        torch.backends.cudnn.allow_tf32 = s.tf32

    # Peak FLOP/s first, on rank 0 alone (a probe must not compete with training), then shared.
    peak, peak_source, probe_stats = broadcast_object(get_peak_flops(device, dtype_name) if info.is_main else None,
                                                      info)

    # What the process holds before the model exists (CPU: interpreter + libraries; CUDA: ~0):
    # the predicted peak is compared with peak_mem_bytes - mem_baseline_bytes.
    mem_baseline = (torch.cuda.memory_allocated(device) if device.type == "cuda" else memory.current_rss_bytes())
    pred_mem = predict_memory(cfg.model, s, info.world_size, cfg.micro_batch, cfg.seq_len)
    pred_comm = predict_comm(cfg.model, s, dp, ga)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, "meta")
    n_params = count_params(model)
    model = apply_strategies(model, s, device, cfg.seed)
    # Fused AdamW on CUDA (one kernel for all params; a GPT-2-small step spends ~10% in foreach AdamW);
    # foreach on CPU and for FSDP's DTensor shards (torchtitan's default there).
    fused = device.type == "cuda" and s.dp != "fsdp"
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=fused or None, foreach=None if fused else True)
    scaler = get_grad_scaler(s.amp, device.type)
    data = build_data(cfg.data, cfg.model.vocab_size, cfg.micro_batch, cfg.seq_len, cfg.seed, device, dp * ga)
    dp_rank = info.rank if dp > 1 else 0
    sampler = NvmlSampler(device.index if device.type == "cuda" else None)
    timer = metrics.StepTimer(device)
    meter = ContentionMeter()
    profiler = _Profiler(cfg, info, run_id)

    def run_step(step: int) -> torch.Tensor:
        """One optimizer step over ``ga`` micro-batches; returns the step's mean loss (on the device)."""
        step_loss = None
        for micro in range(ga):
            x, y = data.batch(step, dp_rank * ga + micro)
            with maybe_no_sync(model, s, micro == ga - 1):
                with get_autocast(s.amp, s.dp, device.type):
                    loss = model(x, y)
                if 0 <= cfg.debug_nan_step <= step:
                    loss = loss * float("nan")
                scaled = loss / ga
                (scaler.scale(scaled) if scaler else scaled).backward()
            part = loss.detach() / ga
            step_loss = part if step_loss is None else step_loss + part
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return step_loss

    total = cfg.warmup + cfg.steps
    step_losses: list[torch.Tensor] = []
    losses: list[float] = []
    status = "ok"
    wall_mark, steps_mark = time.perf_counter(), 0
    turn = get_turnstile(info.rank, cfg.timeout_s)
    try:
        for step in range(total):
            if step == cfg.warmup:
                memory.reset_peak(device)
                sampler.start()
                meter.start()
                profiler.start()
            turn.wait(step)  # A/B gate only (bench/harness/turn.py): the other version's step first; untimed
            timer.start()
            t_step = time.perf_counter() if cfg.debug_slow_pct else 0.0
            step_loss = run_step(step)
            if cfg.debug_delay_s and step >= cfg.warmup:
                time.sleep(cfg.debug_delay_s)  # DEBUG only: an injected, deliberate slowdown
            if cfg.debug_slow_pct and step >= cfg.warmup:  # DEBUG only: busy-wait pct% of this step's time
                _spin(cfg.debug_slow_pct / 100 * _elapsed_since(t_step, device))
            timer.stop()
            turn.done(step)
            if step >= cfg.warmup:
                profiler.step()
            step_losses.append(step_loss)
            if cfg.debug_fail_step == step and cfg.debug_fail_rank in (-1, info.rank):
                raise InjectedFailure(f"injected failure at step {step} on rank {info.rank} (debug_fail_step)")
            if cfg.debug_hang_step == step and cfg.debug_fail_rank in (-1, info.rank):
                # DEBUG only: a rank that stops answering. Peers waiting in a collective fail at timeout_s; a rank
                # hanging outside one (or every rank) gives up after timeout_s too, so no run hangs for ever.
                time.sleep(cfg.timeout_s)
                raise TimeoutError(f"rank {info.rank} hung at step {step} (debug_hang_step) for timeout_s="
                                   f"{cfg.timeout_s}s: timed out")
            if (cfg.log_every and (step + 1) % cfg.log_every == 0) or step == total - 1:
                new = _mean_over_ranks(step_losses[len(losses):], dp)
                losses.extend(new)
                if not all(math.isfinite(v) for v in new):
                    status = "nan"
                    break
                if progress:
                    now = time.perf_counter()
                    per_step = (now - wall_mark) / (step + 1 - steps_mark)
                    tps = batch["global_batch_tokens"] / per_step
                    phase = " (warm-up)" if step < cfg.warmup else ""
                    progress(f"step {step + 1}/{total}{phase} | loss {new[-1]:.4f} | {tps:,.0f} tok/s | "
                             f"ETA {per_step * (total - step - 1):.0f}s")
                    wall_mark, steps_mark = now, step + 1
    except BaseException:
        turn.release()  # never leave the other A/B job waiting for us
        raise
    if status == "ok":
        turn.finish(total)
    else:
        turn.release()

    contention = meter.stop() if total > cfg.warmup and len(step_losses) > cfg.warmup else {}
    profiler.stop()
    nvml_stats = sampler.stop()
    durations = timer.durations_s()
    mine = {"times": durations[cfg.warmup:], "first": durations[0] if durations else None,
            "peak": memory.read_peak(device), "nvml": nvml_stats, "baseline": mem_baseline, "contention": contention}
    if status == "ok" and cfg.measure_comm and dp > 1:
        counter = CommCounter()  # one extra, untimed step: a dispatch mode slows every op
        try:
            with counter:
                run_step(total)
            mine["comm"] = counter.summary()
        except Exception as exc:  # the timed numbers stand; only the comm measurement is lost
            warnings.warn(f"communication measurement failed, comm_bytes_per_step left empty: {exc!r}",
                          stacklevel=1)
    ranks = gather_objects(mine, info)
    times = metrics.combine_step_times([r["times"] for r in ranks]) if mine["times"] else []
    out = {
        "params": n_params,
        "flops_per_token": train_flops_per_token(cfg.model, cfg.seq_len),
        "recompute_flops_per_token": recompute_flops_per_token(cfg.model, cfg.seq_len, s.ac, s.ac_every),
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        **probe_stats,
        "dtype": dtype_name,
        "first_step_time_s": max(r["first"] for r in ranks) if mine["first"] is not None else None,
        "peak_mem_bytes": max(r["peak"]["peak_mem_bytes"] or 0 for r in ranks),
        "peak_reserved_bytes": (max(r["peak"]["peak_reserved_bytes"] for r in ranks)
                                if ranks[0]["peak"]["peak_reserved_bytes"] is not None else None),
        "peak_mem_bytes_per_rank": [r["peak"]["peak_mem_bytes"] for r in ranks],
        "timed_steps": len(times),
        **batch,
    }
    if times:
        out.update(metrics.step_time_stats(times))
        out.update(metrics.throughput(times, batch["global_batch_tokens"], info.world_size))
        out["mfu"] = metrics.flops_utilisation(out["flops_per_token"], out["tokens_per_sec_per_device"], peak)
        out["hfu"] = metrics.flops_utilisation(out["flops_per_token"] + out["recompute_flops_per_token"],
                                               out["tokens_per_sec_per_device"], peak)
        out.update(combine_nvml([r["nvml"] for r in ranks], len(times) * batch["global_batch_tokens"]))
        out.update(combine_contention([r["contention"] for r in ranks]))
        reason = implausible(out)
        if reason and status == "ok":
            status, out["suspect_reason"] = "suspect", reason
    out["loss"] = losses[-1] if losses else None
    out["mem_baseline_bytes"] = max(r["baseline"] or 0 for r in ranks)
    out["pred_peak_mem_bytes"] = pred_mem["total"]
    out["pred_mem_breakdown"] = {k: v for k, v in pred_mem.items() if k != "total"}
    out["pred_comm_bytes_per_step"] = pred_comm["total"]
    out["pred_comm_breakdown"] = {k: v for k, v in pred_comm.items() if k != "total"}
    comms = [r.get("comm") for r in ranks if r.get("comm")]
    out["comm_bytes_per_step"] = max(c["total"] for c in comms) if comms else (0 if dp == 1 else None)
    out["comm_breakdown"] = comms[0]["bytes"] if comms else {}
    out["comm_calls_per_step"] = comms[0]["calls"] if comms else {}
    return TrainOutcome(status=status, metrics=out, losses=losses, step_times_s=times)
