"""The training run in three parts: ``build`` (meta model -> strategies -> materialise/init -> optimizer),
``run_steps`` (warm-up and timed steps) and ``combine`` (every rank's measurements -> one set of record
columns, by the rules in reports/record.py). ``train`` chains them.

``train`` runs on every rank and returns the same combined metrics on every rank. Inside the timed
window the only host syncs are the ones the measurement needs: none per step on CUDA (events are read
after the loop) and one small all-reduce of the recent losses every ``log_every`` steps (progress + NaN
check), which falls *between* timed steps. With ``eval_every`` the held-out loss (bench/harness/evaluate.py) is
computed between steps too, outside their timing (its syncs and its time are its own: ``eval_time_s``), and a
run with ``target_loss`` stops at the first evaluation that reaches it (``Target``). Fault injection
(bench/harness/faults.py) is one hook: the step itself unless a ``debug_*`` option is set.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from bench.harness.config import ConfigError, RunConfig
from bench.harness.data import build_data, markov_floor
from bench.harness.dist import DistInfo, broadcast_object, gather_objects
from bench.harness.evaluate import held_out_loss
from bench.harness.faults import Faults
from bench.harness.progress import Progress
from bench.harness.schedule import lr_scheduler
from bench.harness.turn import get_turnstile
from bench.measure import memory, metrics
from bench.measure.combine import combine_ranks
from bench.measure.comm import CommCounter
from bench.measure.contention import ContentionMeter
from bench.measure.counters import compile_counts, count_step_flops, observed_step, state_bytes
from bench.measure.nvml import NvmlSampler, energy_per_token
from bench.measure.overlap import profiled_exposure
from bench.measure.peak_flops import get_peak_flops
from bench.measure.profile import StepProfiler
from models import build_model, count_params, train_flops_per_token
from models.weights import local_part
from reports.record import implausible
from strategies import (
    apply_strategies,
    finalize_grads,
    get_autocast,
    get_grad_scaler,
    maybe_loss_parallel,
    maybe_no_sync,
    recompute_flops_per_token,
)
from strategies.config import StrategyError
from strategies.mesh import build_mesh, dp_coordinate, dp_degree
from strategies.pp import Pipeline


@dataclass
class TrainOutcome:
    status: str  # 'ok', 'nan', 'not_reached' (target_loss not reached) or 'suspect' (record.implausible)
    metrics: dict  # RunRecord columns
    losses: list[float] = field(default_factory=list)  # global mean loss per step (warm-up included)
    step_times_s: list[float] = field(default_factory=list)  # combined timed step times
    mesh: object = None  # the run's DeviceMesh (bench/harness/rates.py times the model's parts on it)
    all_step_times_s: list[float] = field(default_factory=list)  # combined times of every step, warm-up included
    evals: list[dict] = field(default_factory=list)  # Target.evals: the held-out curve


def plan_batch(cfg: RunConfig, info: DistInfo) -> dict:
    """Batch arithmetic, once: dp size (world / tp: ranks of one tensor-parallel group share their
    micro-batches), grad_accum, global batch in sequences and tokens."""
    dp = dp_degree(cfg.strategy, info.world_size)
    ga = cfg.resolve_grad_accum(dp)
    seqs = cfg.micro_batch * ga * dp
    return {"dp_size": dp, "grad_accum": ga, "global_batch_seqs": seqs, "global_batch_tokens": seqs * cfg.seq_len}


@dataclass
class Built:
    """What ``build`` made: the wrapped model, its optimizer and data, and the numbers known before step 0."""

    model: torch.nn.Module
    mesh: object  # the (dp, tp) DeviceMesh, None in one process
    opt: torch.optim.Optimizer
    scaler: object
    data: object
    batch: dict
    static: dict  # record columns known before training (params, FLOPs per token, peak FLOP/s, batch)
    mem_baseline_bytes: int  # what this process held before the model existed
    sched: object = None  # the learning-rate scheduler (bench/harness/schedule.py), None for a constant lr
    eval_data: object = None  # the held-out split (eval_every > 0), else None


def build(cfg: RunConfig, info: DistInfo, batch: dict) -> Built:
    s, device = cfg.strategy, info.device
    dtype_name = s.compute_dtype_name(device.type)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if s.tf32 else "highest")  # high = TF32 matmuls
        torch.backends.cudnn.allow_tf32 = s.tf32

    # Peak FLOP/s (MFU's denominator) first, on rank 0 alone (a probe must not compete with training), then shared.
    peak, peak_source, probe_stats = broadcast_object(get_peak_flops(device, dtype_name) if info.is_main else None,
                                                      info)
    # What the process holds before the model exists (CPU: interpreter + libraries, warmed up first so their
    # lazily created state counts here; CUDA: ~0): the predicted peak is compared with peak - baseline.
    memory.warm_runtime(device)
    model = build_model(cfg.model, "meta")  # meta: no memory, but a library it needs (transformers) is loaded now
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else memory.current_rss_bytes()
    torch.manual_seed(cfg.seed)
    n_params = count_params(model)
    mesh = build_mesh(s, device.type)
    model = apply_strategies(model, s, device, cfg.seed, mesh, batch["grad_accum"])
    # Fused AdamW for plain parameters (CUDA: one kernel for all params, a GPT-2-small step spent ~10% in
    # foreach AdamW; CPU: 89 vs 684 ms per step for gpt2-small's parameters, 2 threads, measured); foreach
    # for DTensor parameters (FSDP shards, TP splits: torchtitan's default there).
    has_dtensor = any(isinstance(p, DTensor) for p in model.parameters())
    fused = not has_dtensor
    opt = torch.optim.AdamW(param_groups(model), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=fused or None, foreach=None if fused else True)
    n_micro, held_out = batch["dp_size"] * batch["grad_accum"], cfg.eval_every > 0
    data = build_data(cfg.data, cfg.model.vocab_size, cfg.micro_batch, cfg.seq_len, cfg.seed, device, n_micro,
                      tokenizer_dir=cfg.model.hf_path, split="train" if held_out else "all")
    eval_data = build_data(cfg.data, cfg.model.vocab_size, cfg.micro_batch, cfg.seq_len, cfg.seed, device, n_micro,
                           tokenizer_dir=cfg.model.hf_path, split="eval") if held_out else None
    static = {
        "params": n_params,
        "flops_per_token": train_flops_per_token(cfg.model, cfg.seq_len),
        "recompute_flops_per_token": recompute_flops_per_token(cfg.model, cfg.seq_len, s),
        "peak_flops": peak, "peak_flops_source": peak_source, **probe_stats,
        "dtype": dtype_name,
        "loss_floor": markov_floor(cfg.model.vocab_size, cfg.seq_len) if cfg.data == "markov" else None,
        "eval_tokens": cfg.eval_batches * batch["global_batch_tokens"] if held_out else None,
        "target_loss": cfg.target_loss or None,
        **batch,
    }
    sched = lr_scheduler(opt, cfg.warmup + cfg.steps, cfg.lr_schedule, cfg.lr_warmup, cfg.lr_min_ratio)
    return Built(model, mesh, opt, get_grad_scaler(s.amp, device.type), data, batch, static, baseline, sched,
                 eval_data)


def param_groups(model: torch.nn.Module) -> list[dict]:
    """The parameters in one group per kind (plain tensors, DTensors): a foreach optimizer step cannot mix
    the two, which tensor parallelism alone (split matrices beside replicated norms) would."""
    plain = [p for p in model.parameters() if not isinstance(p, DTensor)]
    dtensors = [p for p in model.parameters() if isinstance(p, DTensor)]
    return [{"params": group} for group in (plain, dtensors) if group]


def data_rank(b: Built) -> int:
    """This rank's coordinate on the data-parallel dimension: which share of each global batch it reads (training
    and held-out alike; ranks of one tensor- or pipeline-parallel group share it)."""
    return dp_coordinate(b.mesh) if b.batch["dp_size"] > 1 else 0


def make_step(cfg: RunConfig, info: DistInfo, b: Built) -> Callable[[int], torch.Tensor]:
    """One optimizer step over ``grad_accum`` micro-batches; returns the step's mean loss (on the device)."""
    s, ga = cfg.strategy, b.batch["grad_accum"]
    dp_rank = data_rank(b)
    pipelined = isinstance(b.model, Pipeline)

    def step_fn(step: int) -> torch.Tensor:
        step_loss = None
        for micro in range(ga):
            x, y = b.data.batch(step, dp_rank * ga + micro)
            if pipelined:  # the schedule runs forward and backward; its loss is already scaled by 1/ga
                with maybe_loss_parallel(s), get_autocast(s.amp, s.dp, info.device.type):
                    part = b.model.step(x, y)
            else:
                with maybe_no_sync(b.model, s, micro == ga - 1), maybe_loss_parallel(s):
                    with get_autocast(s.amp, s.dp, info.device.type):
                        loss = b.model(x, y)
                    scaled = loss / ga
                    (b.scaler.scale(scaled) if b.scaler else scaled).backward()
                part = local_part(loss.detach()) / ga
            step_loss = part if step_loss is None else step_loss + part
        if s.tp > 1:
            finalize_grads(b.model)
        if b.scaler:
            b.scaler.step(b.opt)
            b.scaler.update()
        else:
            b.opt.step()
        b.opt.zero_grad(set_to_none=True)
        if b.sched is not None:
            b.sched.step()  # host-side arithmetic on the groups' lr: no device work, no sync
        return step_loss

    return step_fn


def _mean_over_ranks(values: list[torch.Tensor], holders: int) -> list[float]:
    """The global mean loss per step: the sum over ranks divided by the ``holders`` ranks that hold a loss
    (all of them, except under pipelining, where only the last stage's ranks do and the others hold 0)."""
    stacked = torch.stack(values)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked = stacked / holders
    return stacked.cpu().tolist()


class Target:
    """The held-out evaluations of a run and its stopping rule: after step ``step`` (0-based), when it is an
    evaluation step, ``after(step)`` measures the held-out loss and says whether the run stops there -- the loss
    reached ``target_loss``, or ``max_time_s`` of training time is spent. Every number it decides on is the same
    on every rank (all-reduced), so every rank stops at the same step.

    Training time through step n: ``sum_{i <= n} max over ranks of step i's duration`` (warm-up steps included:
    they train too), eval excluded. Each evaluation appends to ``evals``: step, eval_loss, train_time_s, and
    wall_s (rank 0's clock from the start of step 0 to the end of the evaluation, eval included)."""

    def __init__(self, cfg: RunConfig, info: DistInfo, b: Built, timer: metrics.StepTimer):
        self.cfg, self.info, self.b, self.timer = cfg, info, b, timer
        self.on = cfg.eval_every > 0
        self.dp_rank = data_rank(b)
        self.evals: list[dict] = []
        self.eval_time_s = 0.0
        self.reached: dict | None = None
        self.t0 = time.perf_counter()

    def due(self, step: int) -> bool:
        total = self.cfg.warmup + self.cfg.steps
        return self.on and ((step + 1) % self.cfg.eval_every == 0 or step == total - 1)

    def after(self, step: int) -> bool:
        """Evaluate after ``step``; True when the run stops here."""
        c, device = self.cfg, self.info.device
        t = time.perf_counter()
        loss = held_out_loss(self.b.model, self.b.eval_data, c.strategy, device, self.dp_rank,
                             self.b.batch["grad_accum"], c.eval_batches, self.info.world_size // c.strategy.pp)
        durations = torch.tensor(self.timer.durations_s(), dtype=torch.float64)  # syncs (CUDA): not a timed step
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(durations, op=dist.ReduceOp.MAX)
        self.eval_time_s += time.perf_counter() - t
        train_s = float(durations.sum())
        self.evals.append({"step": step, "eval_loss": loss, "train_time_s": train_s,
                           "wall_s": time.perf_counter() - self.t0})
        if c.target_loss and loss <= c.target_loss and self.reached is None:
            self.reached = {"steps_to_target": step + 1,
                            "tokens_to_target": (step + 1) * self.b.batch["global_batch_tokens"],
                            "time_to_target_s": train_s, "wall_to_target_s": self.evals[-1]["wall_s"]}
            return True
        return bool(c.target_loss and c.max_time_s and train_s >= c.max_time_s)

    def columns(self) -> dict:
        """The run's record columns (reports/record.py), identical on every rank."""
        if not self.on:
            return {}
        return {"eval_loss": self.evals[-1]["eval_loss"] if self.evals else None, "evals": len(self.evals),
                "eval_time_s": self.eval_time_s, **(self.reached or {})}


def run_steps(cfg: RunConfig, info: DistInfo, b: Built, step_fn: Callable[[int], torch.Tensor],
              progress: Progress | None, run_id: str) -> tuple[str, list[float], dict, Target]:
    """Warm-up then timed steps, with held-out evaluations between them (``Target``). Returns (status 'ok',
    'nan' or 'not_reached', global mean loss per step, this rank's measurements as record columns plus ``times``:
    its timed step durations, ``all_times``: every step's, and ``target``: the Target)."""
    device, total = info.device, cfg.warmup + cfg.steps
    faults = Faults(cfg, info.rank, device)
    step_fn = faults.wrap(step_fn)
    sampler = NvmlSampler(device.index if device.type == "cuda" else None)
    timer = metrics.StepTimer(device)
    meter = ContentionMeter()
    profiler = StepProfiler(cfg.profile_dir, info.is_main, device, run_id)
    turn = get_turnstile(info.rank, cfg.timeout_s)
    target = Target(cfg, info, b, timer)
    step_losses: list[torch.Tensor] = []
    losses: list[float] = []
    status = "ok"
    wall_mark, steps_mark = time.perf_counter(), 0
    try:
        for step in range(total):
            if step == cfg.warmup:
                memory.reset_peak(device)
                sampler.start()
                meter.start()
                profiler.start()
            turn.wait(step)  # A/B gate only (bench/harness/turn.py): the other version's step first; untimed
            timer.start()
            step_loss = step_fn(step)
            timer.stop()
            turn.done(step)
            if progress:
                progress.step(step)  # host-side only, between timed steps
            if step >= cfg.warmup:
                profiler.step()
            step_losses.append(step_loss)
            faults.after_step(step)
            stop = step < total - 1 and target.due(step) and target.after(step)  # between steps: not timed
            if (cfg.log_every and (step + 1) % cfg.log_every == 0) or step == total - 1 or stop:
                new = _mean_over_ranks(step_losses[len(losses):], info.world_size // cfg.strategy.pp)
                losses.extend(new)
                if not all(math.isfinite(v) for v in new):
                    status = "nan"
                    break
                if progress:
                    now = time.perf_counter()
                    per_step = (now - wall_mark) / (step + 1 - steps_mark)
                    progress.log(step, new[-1], b.batch["global_batch_tokens"] / per_step,
                                 per_step * (total - step - 1))
                    wall_mark, steps_mark = now, step + 1
            if stop:
                break
    except BaseException:
        turn.release()  # never leave the other A/B job waiting for us
        raise
    finally:
        if progress:
            progress.close()
    if status == "ok" and len(step_losses) == total:
        turn.finish(total)
    else:
        turn.release()
    if status == "ok" and target.on and len(step_losses) == total:
        target.after(total - 1)  # the last evaluation, after the A/B gate's turns: never beside the other's step
    if status == "ok" and cfg.target_loss and target.reached is None:
        status = "not_reached"

    contention = meter.stop() if total > cfg.warmup and len(step_losses) > cfg.warmup else {}
    profiler.stop()
    durations = timer.durations_s()
    peak = memory.read_peak(device)
    mine = {"times": durations[cfg.warmup:], "all_times": durations,
            "first_step_time_s": durations[0] if durations else None,
            **peak, "peak_mem_bytes_per_rank": peak["peak_mem_bytes"], **sampler.stop(), **contention,
            **target.columns()}
    return status, losses, mine, target


def measure_comm(step_fn: Callable[[int], torch.Tensor], step: int) -> dict:
    """One extra, untimed step under a CommCounter (a dispatch mode slows every op): this rank's collectives
    as record columns, or {} when the measurement fails (the timed numbers stand)."""
    counter = CommCounter()
    if not observed_step(step_fn, step, counter, "comm_bytes_per_step"):
        return {}
    c = counter.summary()
    return {"comm_bytes_per_step": c["total"], "comm_breakdown": c["bytes"], "comm_calls_per_step": c["calls"]}


OVERLAP_STEPS = 2  # profiled steps after the timed window (bench/measure/overlap.py)


def measure_overlap(step_fn: Callable[[int], torch.Tensor], step: int, device: torch.device) -> dict:
    """``OVERLAP_STEPS`` extra, untimed steps under torch.profiler: this rank's compute, communication and
    exposed-communication time per step (bench/measure/overlap.py), or {} when the measurement fails."""
    def run() -> None:
        for i in range(OVERLAP_STEPS):
            step_fn(step + i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    try:
        return profiled_exposure(run, device.type, OVERLAP_STEPS)
    except Exception as exc:
        warnings.warn(f"overlap measurement failed, exposed_comm_s left empty: {exc!r}", stacklevel=1)
        return {}


def combine(per_rank: list[dict], static: dict, losses: list[float], world_size: int) -> tuple[dict, list[float]]:
    """Every rank's measurements -> the run's metric columns (rules: reports/record.py) and the combined
    per-step times (per step, the max over ranks)."""
    times = metrics.combine_step_times([r.pop("times") for r in per_rank]) if per_rank[0]["times"] else []
    all_times = metrics.combine_step_times([r.pop("all_times") for r in per_rank])
    out = {**static, **combine_ranks(per_rank), "timed_steps": len(times), "all_times": all_times,
           "train_time_s": sum(all_times) if all_times else None}
    out["peak_mem_bytes"] = out.get("peak_mem_bytes") or 0
    if world_size == 1 and out.get("comm_bytes_per_step") is None:
        out.update(comm_bytes_per_step=0, comm_breakdown={}, comm_calls_per_step={})  # nothing to communicate
    if times:
        out.update(metrics.step_time_stats(times))
        out.update(metrics.throughput(times, static["global_batch_tokens"], world_size))
        out["mfu"] = metrics.flops_utilisation(out["flops_per_token"], out["tokens_per_sec_per_device"],
                                               out["peak_flops"])
        out["hfu"] = metrics.flops_utilisation(out["flops_per_token"] + out["recompute_flops_per_token"],
                                               out["tokens_per_sec_per_device"], out["peak_flops"])
        tokens = len(times) * static["global_batch_tokens"]
        out["energy_per_token_j"] = energy_per_token(out.get("gpu_energy_j"), tokens)
    out["loss"] = losses[-1] if losses else None
    return out, times


def train(cfg: RunConfig, info: DistInfo, progress: Progress | None = None,
          run_id: str = "run", batch: dict | None = None) -> TrainOutcome:
    """build -> run_steps -> combine on every rank. ``batch``: plan_batch's result when the caller has it."""
    try:
        cfg.strategy.validate_for(info.device.type, info.world_size)
    except StrategyError as exc:
        raise ConfigError(str(exc)) from exc
    batch = batch or plan_batch(cfg, info)
    compiled_before = compile_counts()  # TorchDynamo's counters are the process's: the run's are the difference
    b = build(cfg, info, batch)
    step_fn = make_step(cfg, info, b)
    status, losses, mine, target = run_steps(cfg, info, b, step_fn, progress, run_id)
    mine["mem_baseline_bytes"] = b.mem_baseline_bytes
    finished = status in ("ok", "not_reached")  # every step ran as configured: the measurements after it apply
    if finished and cfg.measure_counters:  # what the timed run held and compiled, before any extra step
        mine.update(**state_bytes(b.opt), **compile_counts(since=compiled_before))
    extra = cfg.warmup + cfg.steps  # the untimed steps after the timed window, each on the next step's data
    if finished and cfg.measure_comm and info.world_size > 1:
        mine.update(measure_comm(step_fn, extra))
    if finished and cfg.measure_overlap and info.world_size > 1:
        mine.update(measure_overlap(step_fn, extra + 1, info.device))
    if finished and cfg.measure_counters and not cfg.strategy.compile:
        mine.update(count_step_flops(step_fn, extra + 1 + OVERLAP_STEPS))
    out, times = combine(gather_objects(mine, info), b.static, losses, info.world_size)
    all_times = out.pop("all_times")
    reason = implausible(out) if times else None
    if reason and status in ("ok", "not_reached"):
        status, out["suspect_reason"] = "suspect", reason
    return TrainOutcome(status=status, metrics=out, losses=losses, step_times_s=times, mesh=b.mesh,
                        all_step_times_s=all_times, evals=target.evals)
