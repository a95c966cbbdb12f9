"""Run one benchmark and append its row to ``<results_dir>/runs.jsonl``.

    torchrun --standalone --nproc_per_node=2 bench/run.py strategy=fsdp            # 2 CPU/GPU ranks
    torchrun --nproc_per_node=8 bench/run.py strategy=fsdp_bf16_compile model=gpt2-medium
    python bench/run.py model=tiny steps=10                                         # one process
    python bench/run.py --help                                                      # groups and options

Exit codes: 0 ok; 1 the run failed (error, oom, nan, timeout: a row with that status is written);
2 invalid configuration (nothing is run, no row is written); 3 the run finished but a number cannot be
true (status suspect, e.g. mfu > 1: the row is written with the reason); 4 the run finished without reaching
its target_loss (status not_reached: the row is written, with its held-out loss).
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import time
import traceback
import uuid
from pathlib import Path

if __name__ == "__main__" and os.environ.get("RANK", "0") == "0":
    # Under torchrun every rank checks the configuration and only rank 0 prints the error; when another rank
    # exits 2 first, torchrun SIGTERMs rank 0 -- which must still get to print it (precheck, main). main()
    # installs its own SIGTERM handler once the run is valid.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

if __package__ in (None, ""):  # `python bench/run.py` from a clone without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from bench.harness.config import ConfigError, RunConfig, register_configs, to_run_config  # noqa: E402
from bench.harness.dist import DistInfo, broadcast_object, die_with_parent, init_distributed  # noqa: E402
from bench.harness.env import environment  # noqa: E402
from bench.harness.loop import TrainOutcome, plan_batch, train  # noqa: E402
from bench.harness.precheck import precheck  # noqa: E402
from bench.harness.progress import Progress  # noqa: E402
from bench.harness.rates import probe_rates  # noqa: E402
from bench.harness.table import DuplicateRun, append_row, claim_id, dead_ranks, register_rank, write_steps  # noqa: E402
from bench.harness.tensorboard import write_events  # noqa: E402
from bench.plan.annotate import annotate  # noqa: E402
from bench.plan.steptime import Rates, can_overlap  # noqa: E402
from reports.record import FINISHED, RunRecord  # noqa: E402
from strategies.config import StrategyError  # noqa: E402
from strategies.mesh import layout_columns  # noqa: E402

register_configs()

def say(info: DistInfo | None, msg: str) -> None:
    if info is None or info.is_main:
        print(f"[n00bGPT] {msg}", flush=True)


def build_row(cfg: RunConfig, raw: DictConfig, info: DistInfo, run_id: str, status: str, error: str | None,
              outcome: TrainOutcome | None, preset: str | None, batch: dict, predicted: dict) -> RunRecord:
    """The run's record: identity, setup, predictions, metrics (None when the run failed before measuring),
    provenance."""
    setup = {
        "run_id": run_id,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": cfg.model.name, "arch": cfg.model.arch, "model_source": cfg.model.source,
        "strategy": cfg.strategy.canonical_name, "strategy_preset": preset,
        "world_size": info.world_size, "nnodes": info.nnodes, "device": info.device.type,
        "dtype": cfg.strategy.compute_dtype_name(info.device.type),
        "seq_len": cfg.seq_len, "micro_batch": cfg.micro_batch, **batch,
        **layout_columns(cfg.strategy, info.world_size),
        "steps": cfg.steps, "warmup": cfg.warmup, "data": cfg.data, "seed": cfg.seed, "tag": cfg.tag,
        "status": status, "error": error,
    }
    metrics = outcome.metrics if outcome is not None else {}
    # predictions last: they own only their pred_* and rate columns, never a measured one (tests/test_row_wiring.py)
    return RunRecord(**{**setup, **metrics, **predicted, **environment(info.device),
                        "config": OmegaConf.to_container(raw, resolve=True)})


def predictions(cfg: RunConfig, info: DistInfo, batch: dict, outcome: TrainOutcome | None) -> dict:
    """The row's prediction columns (bench/plan/annotate.py), after training. A run that finished (every rank here
    together) probes its rates first (bench/harness/rates.py) -- all of them when it ended ok, the two cheap
    bandwidths after a NaN -- and predicts its step time too (a probe that fails fails the run, as any
    measurement would); a failed run (``outcome`` None: ranks may be gone) gets the predictions that need no
    probe, or none if even those fail (the failure's own row matters more)."""
    shape = (cfg.model, cfg.strategy, info.world_size, cfg.micro_batch, cfg.seq_len, batch["grad_accum"])
    if outcome is None:
        try:
            return annotate(*shape)
        except Exception as exc:
            print(f"[n00bGPT] predictions left empty: {type(exc).__name__}: {exc}", file=sys.stderr)
            return {}
    local_ranks = max(1, info.world_size // max(1, info.nnodes))
    overlap = can_overlap(info.device.type, local_ranks, torch.get_num_threads(), len(os.sched_getaffinity(0)))
    probed = probe_rates(cfg, info, outcome.mesh, full=outcome.status in FINISHED, contended=not overlap)
    peak = outcome.metrics.get("peak_flops")
    rates = Rates(peak, probed.mem_bw, probed.link_bw, probed.parts, probed.by_kind) if peak else None
    return annotate(*shape, rates, probed.columns, overlap)


class Terminated(BaseException):
    """SIGTERM received (torchrun stopping the survivors of a failed rank, or a scheduler)."""


def _raise_terminated(signum, frame):
    raise Terminated("terminated by SIGTERM (another rank failed, or the job was cancelled)")


def _is_cpu_oom(exc: BaseException) -> bool:
    """The CPU allocator's out-of-memory (a RuntimeError; CUDA raises torch.OutOfMemoryError)."""
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def _is_timeout(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return "timed out" in text or "timeout" in text


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(raw: DictConfig) -> None:
    die_with_parent()  # a killed torchrun takes its ranks with it (SIGTERM: an error row, below)
    try:
        cfg = to_run_config(raw)
        info = init_distributed(cfg.device, cfg.backend, cfg.timeout_s)
        cfg.validate_world(info.world_size)  # checks that need the world size ...
        cfg.strategy.validate_for(info.device.type, info.world_size)
        batch = plan_batch(cfg, info)  # ... and the batch arithmetic (once): before anything is printed or run
    except (ConfigError, StrategyError) as exc:
        stop_invalid(str(exc))
    preset = HydraConfig.get().runtime.choices.get("strategy")
    # The run's id, claimed before any work by rank 0 (table.claim_id): of two runs started with one id, one
    # stops here with exit 2. Every rank learns the id and the verdict.
    run_id = cfg.run_id or f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"
    run_id, refused = broadcast_object((run_id, claim_id(cfg.results_dir, run_id)) if info.is_main else None, info)
    if refused:
        stop_invalid(refused)
    # torchrun answers a dead rank by SIGTERM-ing the others: turn that into an exception so a
    # surviving rank still writes the run's (single) error row before it exits.
    signal.signal(signal.SIGTERM, _raise_terminated)
    if info.world_size > 1:
        register_rank(cfg.results_dir, run_id, info.rank)
    say(info, f"run {run_id}: model={cfg.model.name} strategy={cfg.strategy.canonical_name} "
              f"world_size={info.world_size} device={info.device.type} steps={cfg.steps}+{cfg.warmup} warm-up")

    outcome, error, started = None, None, time.time()
    try:
        progress = Progress(cfg.warmup + cfg.steps, cfg.warmup, info.is_main, say=lambda m: say(info, m))
        outcome = train(cfg, info, progress=progress, run_id=run_id, batch=batch)
        status = outcome.status
        predicted = predictions(cfg, info, batch, outcome)  # every rank together, outside the timed loop
        if status == "nan":
            error = "non-finite loss: " + ", ".join(f"{v}" for v in outcome.losses[-3:])
        elif status == "suspect":
            error = outcome.metrics["suspect_reason"]
        elif status == "not_reached":
            error = (f"held-out loss {outcome.metrics['eval_loss']:.4f} > target_loss={cfg.target_loss} after "
                     f"{len(outcome.losses)} steps, {outcome.metrics['train_time_s']:.1f} s of training")
    except ConfigError as exc:  # found only once the process group exists (e.g. world size vs strategy)
        if dist.is_initialized():
            dist.destroy_process_group()
        stop_invalid(str(exc))
    except torch.OutOfMemoryError as exc:
        status, error = "oom", f"rank {info.rank}: {exc}".strip()[:2000]
    except (Exception, Terminated) as exc:  # any rank's crash still leaves a row
        # A second SIGTERM (torchrun stopping us after a peer died, while we handle the peer's gloo error) must
        # not interrupt the writing of the row: from here on this rank only reports.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        error = f"rank {info.rank}: {type(exc).__name__}: {exc}"[:2000]
        dead = dead_ranks(cfg.results_dir, run_id) if info.world_size > 1 else []
        if dead:  # name the rank that died, not only the survivor that writes the row
            error = f"rank {', '.join(map(str, dead))} died (its process is gone: killed or crashed); {error}"[:2000]
        status = "timeout" if _is_timeout(exc) else ("oom" if _is_cpu_oom(exc) else "error")
        traceback.print_exc()

    collective = status in ("ok", "nan", *FINISHED)  # decided together on every rank: rank 0 writes
    if not collective:
        predicted = predictions(cfg, info, batch, None)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the run is over: nothing may cut the row in half
    row = build_row(cfg, raw, info, run_id, status, error, outcome, preset, batch, predicted)
    path = None
    if info.is_main or not collective:  # after a failure every rank tries: the first append writes the row
        try:
            path = append_row(cfg.results_dir, row)
        except DuplicateRun:  # another rank of this run wrote it
            pass
    if path is not None:
        if outcome is not None:
            log = step_log(cfg, batch, outcome)
            write_steps(cfg.results_dir, run_id, log)
            if cfg.tensorboard:
                say(None, f"TensorBoard event files in {write_events(cfg.tensorboard, run_id, log, started)}")
        if status in FINISHED:
            m = {**predicted, **outcome.metrics}
            mfu = f"{m['mfu']:.1%}" if m.get("mfu") is not None else "n/a"
            comm = (f", comm {m['comm_bytes_per_step'] / 1e6:,.1f} MB/step (predicted "
                    f"{m['pred_comm_bytes_per_step'] / 1e6:,.1f})" if m.get("comm_bytes_per_step") else "")
            say(None, f"done: {m['tokens_per_sec']:,.0f} tok/s ({m['tokens_per_sec_per_device']:,.0f}/device), "
                      f"step {m['step_time_median_s'] * 1e3:.1f} ms median, MFU {mfu} "
                      f"({m['peak_flops_source'].split(' (')[0]}), peak mem {m['peak_mem_bytes'] / 2**30:.2f} GiB "
                      f"(before the model {(m['mem_baseline_bytes'] or 0) / 2**30:.2f} + predicted "
                      f"{m['pred_peak_mem_bytes'] / 2**30:.2f}){comm}, "
                      f"loss {m['loss']:.4f} -> {path}")
            if m.get("time_to_target_s") is not None:
                say(None, f"target_loss {cfg.target_loss} reached at step {m['steps_to_target']}: "
                          f"{m['time_to_target_s']:.1f} s of training ({m['wall_to_target_s']:.1f} s wall), "
                          f"{m['tokens_to_target']:,} tokens, held-out loss {m['eval_loss']:.4f}")
            if status in ("suspect", "not_reached"):
                say(None, f"{status.upper().replace('_', ' ')}: {error}")
        else:
            say(None, f"FAILED ({status}): {error} -> row in {path}")
    if collective and dist.is_initialized():
        dist.destroy_process_group()
    # Leave without interpreter teardown: after a failure other ranks may be stuck in a collective, and
    # even after success gloo's worker threads can abort the process during finalization ("terminate
    # called without an active exception"), which would turn a finished run into a failed exit code.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit({"ok": 0, "suspect": 3, "not_reached": 4}.get(status, 1))


def step_log(cfg: RunConfig, batch: dict, outcome: TrainOutcome) -> list[dict]:
    """The per-step log (steps/<run_id>.jsonl): per step its phase, global mean training loss, timed step time
    (timed steps only), tokens trained through it, training time through it (loop.py Target's definition), and
    at evaluation steps the held-out loss and the wall clock."""
    evals = {e["step"]: e for e in outcome.evals}
    times = outcome.all_step_times_s
    rows, spent = [], 0.0
    for i, loss in enumerate(outcome.losses):
        spent += times[i] if i < len(times) else 0.0
        timed = cfg.warmup <= i < cfg.warmup + len(outcome.step_times_s)
        row = {"step": i, "phase": "warmup" if i < cfg.warmup else "timed", "loss": loss,
               "step_time_s": outcome.step_times_s[i - cfg.warmup] if timed else None,
               "tokens": (i + 1) * batch["global_batch_tokens"], "train_time_s": spent}
        if i in evals:
            row.update(eval_loss=evals[i]["eval_loss"], wall_s=evals[i]["wall_s"])
        rows.append(row)
    return rows


def stop_invalid(problem: str) -> None:
    """Exit 2 with one line; under torchrun only global rank 0 prints it (every rank finds the same problem)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"[n00bGPT] error: invalid configuration: {problem}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2)


if __name__ == "__main__":
    problem = precheck(sys.argv[1:])
    if problem:
        stop_invalid(problem)
    main()  # rank 0 ignores SIGTERM until main() has checked what needs the process group too
