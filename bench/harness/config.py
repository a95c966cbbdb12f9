"""The run configuration: one typed dataclass per Hydra group, validated in ``__post_init__``.

Hydra composes ``bench/conf/config.yaml`` (training settings), a ``model`` (the presets of
models/config.py, registered here) and a ``strategy`` (bench/conf/strategy/*.yaml); ``to_run_config``
turns the result into these dataclasses so every check runs before anything starts.
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from bench.harness.data import BUILT_IN, data_problem
from bench.harness.schedule import SCHEDULES
from bench.harness.table import run_ids, write_problem
from bench.harness.tensorboard import missing as tb_missing
from models.config import PRESETS, GPTConfig
from models.weights import HF_EXTRA, config_from_pretrained, weights_problem
from reports.record import RUNS_FILE
from strategies.config import StrategyConfig, StrategyError


class ConfigError(ValueError):
    """A setting that can never work; reported before training, exit code 2, no row written."""


_RUN_ID = re.compile(r"[A-Za-z0-9._-]+")
MAX_RUN_ID = 200  # characters: the longest file the run names after it (steps/.<id>.<pid>.tmp) stays < 255
MAX_STEPS = 10**7  # steps or warm-up steps: far beyond any benchmark, and a run the code can still finish
MAX_SEED = 2**63 - 1  # the largest seed torch's generators and the data's seed mixing take


@dataclass
class RunConfig:
    """Everything one benchmark run needs. Fields are the CLI overrides (``steps=50``)."""

    model: GPTConfig = MISSING
    """Model preset (``model=mini``) with any field overridable (``model.n_layer=4``)."""
    strategy: StrategyConfig = MISSING
    """Strategy preset (``strategy=fsdp``) with any field overridable (``strategy.ac=full``)."""
    steps: int = 20
    """Timed steps (after warm-up)."""
    warmup: int = 5
    """Untimed steps first (allocator, compile, cuDNN/cuBLAS autotuning, gloo connections)."""
    micro_batch: int = 4
    """Sequences per micro-batch per data-parallel rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step per rank (ignored when global_batch > 0)."""
    global_batch: int = 0
    """If > 0: sequences per optimizer step over all ranks; grad_accum = global_batch / (micro_batch * dp)."""
    seq_len: int = 0
    """Tokens per sequence; 0 = the model's context length (block_size)."""
    seed: int = 0
    """Seeds weights (models/gpt.py init_weights) and data (bench/harness/data.py)."""
    data: str = "synthetic"
    """'synthetic' (random tokens), 'markov' (a learnable language with a known loss floor) or a path: a text
    file/folder, a nanoGPT train.bin, a saved Hugging Face dataset (bench/harness/data.py)."""
    results_dir: str = "results"
    """Folder for runs.jsonl (one row per run) and steps/<run_id>.jsonl (per-step log)."""
    device: str = "auto"
    """'auto' (cuda if available, else cpu), 'cuda' or 'cpu'."""
    backend: str = "auto"
    """torch.distributed backend: 'auto' (nccl on cuda, gloo on cpu), 'nccl' or 'gloo'."""
    lr: float = 3e-4
    """AdamW's learning rate (betas (0.9, 0.95), weight decay 0.1), at its peak when lr_schedule shapes it."""
    lr_schedule: str = "constant"
    """'constant', 'cosine' or 'linear': after lr_warmup steps, the decay to lr x lr_min_ratio at the run's last
    step (bench/harness/schedule.py)."""
    lr_warmup: int = 0
    """Optimizer steps of linear warm-up to lr (0: none)."""
    lr_min_ratio: float = 0.1
    """Where the cosine or linear decay ends, as a fraction of lr."""
    eval_every: int = 0
    """Held-out loss every N optimizer steps and after the last (0: none). The data's held-out split is then set
    aside (bench/harness/data.py); evaluation runs between steps, outside their timing (bench/harness/evaluate.py)."""
    eval_batches: int = 4
    """Global batches per evaluation (eval_tokens = eval_batches x global_batch_tokens)."""
    target_loss: float = 0.0
    """If > 0 (needs eval_every): stop at the first evaluation whose held-out loss is at or below it and record
    the time, tokens and steps to it; warmup + steps is then the most steps the run may take, and a run that ends
    without reaching it has status not_reached (exit 4)."""
    max_time_s: float = 0.0
    """With target_loss: also give up once this much training time is spent (checked at each evaluation)."""
    log_every: int = 10
    """Progress line (and NaN check, one small all-reduce) every N steps; 0 = only at the end."""
    timeout_s: int = 600
    """Collective timeout: a hung collective fails the run after this many seconds."""
    tag: str = ""
    """Free text stored in the row (e.g. a sweep or experiment name)."""
    tensorboard: str = ""
    """If set: after the run, rank 0 writes its curves (training and held-out loss, step and training time,
    tokens) as TensorBoard event files in ``<tensorboard>/<run_id>/`` (bench/harness/tensorboard.py; needs the
    optional tensorboard package)."""
    profile_dir: str = ""
    """If set: rank 0 records a torch.profiler trace of timed steps 2-4 into this folder (``<run_id>.json.gz``
    and ``<run_id>.txt``, the top ops). Profiling slows those steps: don't compare a profiled row's speed."""
    measure_comm: bool = True
    """After the timed window, run one extra step observing every collective (bench/measure/comm.py) to record
    comm_bytes_per_step (data-parallel runs only; never timed)."""
    measure_counters: bool = True
    """Record the counters no neighbour can move (bench/measure/counters.py): parameter and optimizer-state bytes
    and compile counts after the timed window, and the FLOPs of one extra, untimed step (not under compile)."""
    measure_overlap: bool = True
    """After the timed window (and the communication step), profile 2 more untimed steps on every rank to
    record compute_time_s, comm_time_s, exposed_comm_s and overlap_pct per step (bench/measure/overlap.py;
    multi-rank runs only)."""
    probe_parts: bool = False
    """After the timed window, time the model's own parts at the run's shapes on every rank (one block, the
    embeddings + head + loss, their matmuls alone, an AdamW step; bench/measure/parts.py) and predict the step
    from them instead of the generic rates (``pred_parts``; python -m bench.tune sets it). Costs about 10 x the
    head's forward + backward (~20 s for mini on a CPU)."""
    run_id: str = ""
    """Row identifier; empty = generated (timestamp + random). Launchers (bench/launch/sweep.py) set it to
    find the row."""
    debug_hang_step: int = -1
    """DEBUG (fault tests): at this step, rank ``debug_fail_rank`` (-1: every rank) stops answering for
    ``timeout_s``: the others wait in a collective until it times out; the hung rank gives up then too."""
    debug_delay_s: float = 0.0
    """DEBUG (regression-gate tests): sleep this long inside every timed step."""
    debug_slow_pct: float = 0.0
    """DEBUG (gate study): after every timed step, busy-wait for this percentage of the step's own duration,
    i.e. a slowdown of exactly this size that uses the CPU like real work (bench/gate/ab.py's study)."""
    debug_fail_step: int = -1
    """DEBUG (failure tests): raise an error at this step (-1 = never)."""
    debug_fail_rank: int = -1
    """DEBUG: which rank fails at debug_fail_step (-1 = all)."""
    debug_nan_step: int = -1
    """DEBUG: make the loss NaN from this step on (-1 = never)."""

    def __post_init__(self) -> None:
        def bad(name, why):
            return ConfigError(f"{name}={getattr(self, name)!r} is invalid: {why}")

        if self.model.hf_path:  # the checkpoint's config.json sets the shape (models/convert.py)
            try:
                self.model = config_from_pretrained(self.model.hf_path, self.model)
            except (OSError, ValueError) as exc:
                raise ConfigError(str(exc)) from exc
            problem = weights_problem(self.model.hf_path)
            if problem:
                raise ConfigError(problem)
        if self.model.source == "hf" or self.model.hf_path:
            needed = (["transformers"] if self.model.source == "hf" else []) + (["safetensors"] if self.model.hf_path
                                                                                else [])
            missing = [m for m in needed if importlib.util.find_spec(m) is None]
            if missing:
                raise ConfigError(f"model.source={self.model.source} model.hf_path={self.model.hf_path!r} needs "
                                  f"{', '.join(missing)}: the optional Hugging Face extra, {HF_EXTRA}")
        for name in ("steps", "micro_batch", "grad_accum"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        for name in ("warmup", "global_batch", "seq_len", "log_every"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        for name in ("steps", "warmup"):
            if getattr(self, name) > MAX_STEPS:
                raise bad(name, f"must be <= {MAX_STEPS:,} (a benchmark is a few hundred steps)")
        if not 0 <= self.seed <= MAX_SEED:
            raise bad("seed", f"must be within 0 .. 2**63-1 = {MAX_SEED}")
        for name in ("debug_nan_step", "debug_hang_step", "debug_fail_step"):
            if getattr(self, name) < -1:
                raise bad(name, "must be a step >= 0, or -1 for never")
        if self.seq_len > self.model.block_size:
            raise bad("seq_len", f"longer than model {self.model.name!r}'s context block_size={self.model.block_size}")
        if self.seq_len == 0:
            self.seq_len = self.model.block_size
        try:
            self.strategy.validate_run(self.model, self.seq_len, self.micro_batch)
        except StrategyError as exc:
            raise ConfigError(str(exc)) from exc
        if self.device not in ("auto", "cpu", "cuda"):
            raise bad("device", "valid values: auto, cpu, cuda")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise bad("backend", "valid values: auto, nccl, gloo")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", "must be a finite number > 0")
        if self.lr_schedule not in SCHEDULES:
            raise bad("lr_schedule", f"must be one of {', '.join(SCHEDULES)}")
        if not 0 <= self.lr_warmup <= MAX_STEPS:
            raise bad("lr_warmup", f"must be between 0 and {MAX_STEPS:,} steps")
        if not (math.isfinite(self.lr_min_ratio) and 0 <= self.lr_min_ratio <= 1):
            raise bad("lr_min_ratio", "must be a fraction of lr between 0 and 1")
        if self.eval_every < 0:
            raise bad("eval_every", "must be >= 0 (steps between evaluations; 0: none)")
        if self.eval_batches < 1:
            raise bad("eval_batches", "must be >= 1 (global batches per evaluation)")
        for name in ("target_loss", "max_time_s"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise bad(name, "must be a finite number >= 0 (0: off)")
        if self.target_loss and not self.eval_every:
            raise bad("target_loss", "needs eval_every > 0: the target is judged on the held-out loss")
        if self.max_time_s and not self.target_loss:
            raise bad("max_time_s", "needs target_loss > 0: it limits a run to a target")
        if self.timeout_s < 1:
            raise bad("timeout_s", "must be >= 1 (seconds)")
        if self.debug_fail_rank < -1:
            raise bad("debug_fail_rank", "must be a rank >= 0, or -1 for every rank")
        if not (math.isfinite(self.debug_slow_pct) and self.debug_slow_pct >= 0):
            raise bad("debug_slow_pct", "must be a finite number >= 0")
        if not (math.isfinite(self.debug_delay_s) and self.debug_delay_s >= 0):
            raise bad("debug_delay_s", "must be a finite number >= 0")
        if self.run_id:
            if not _RUN_ID.fullmatch(self.run_id) or set(self.run_id) == {"."}:
                raise bad("run_id", "use letters, digits, '.', '_' and '-' only, not only dots (it names a file)")
            if len(self.run_id) > MAX_RUN_ID:
                raise bad("run_id", f"{len(self.run_id)} characters; at most {MAX_RUN_ID} (it names files)")
        if self.tensorboard and tb_missing():
            raise bad("tensorboard", tb_missing())
        for name in ("results_dir", "profile_dir", "tensorboard"):
            value = getattr(self, name)
            if name == "results_dir" and not value.strip():
                raise bad(name, "empty: name a folder (the default is results)")
            problem = write_problem(value, len(self.run_id) or 32, table=name == "results_dir") if value else None
            if problem:
                raise bad(name, problem)
        if self.run_id and self.run_id in run_ids(self.results_dir):
            raise bad("run_id", f"already in {Path(self.results_dir) / RUNS_FILE}; run ids are unique")
        if self.data not in BUILT_IN:
            problem = data_problem(self.data, self.seq_len, self.micro_batch, self.model.vocab_size,
                                   self.model.hf_path, held_out=self.eval_every > 0)
            if problem:
                raise bad("data", problem)

    def validate_world(self, world_size: int) -> None:
        """The checks that need the number of ranks (every rank makes them after the process group exists)."""
        if self.debug_fail_rank >= world_size:
            raise ConfigError(f"debug_fail_rank={self.debug_fail_rank} is invalid: this run has ranks "
                              f"0..{world_size - 1} (or -1 for every rank)")

    def resolve_grad_accum(self, dp_size: int) -> int:
        """grad_accum from global_batch when given; checks the arithmetic, naming all three numbers."""
        if self.global_batch == 0:
            return self.grad_accum
        per_step = self.micro_batch * dp_size
        if self.global_batch % per_step:
            raise ConfigError(f"global_batch={self.global_batch} is not divisible by micro_batch={self.micro_batch}"
                              f" x data-parallel size={dp_size} (= {per_step} sequences per micro-step)")
        return self.global_batch // per_step


def register_configs() -> None:
    """Register the schema and the model presets with Hydra's ConfigStore."""
    cs = ConfigStore.instance()
    cs.store(name="base_run", node=RunConfig)
    for name, cfg in PRESETS.items():
        cs.store(group="model", name=name, node=cfg)


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Hydra's DictConfig -> RunConfig (runs every ``__post_init__``); ValueErrors become ConfigError."""
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as exc:  # StrategyError, model ValueError, OmegaConf validation errors
        cause = exc
        while cause.__cause__ is not None and isinstance(cause.__cause__, ValueError):
            cause = cause.__cause__
        raise ConfigError(str(cause).split("\n    full_key")[0]) from exc


