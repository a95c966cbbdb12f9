"""The run record: one row of a result table, typed, with each column's unit and cross-rank rule.

This is a leaf module (standard library only). The writer (bench/run.py) builds a ``RunRecord`` and
appends ``record.to_row()``; every reader (reports/, the gate in bench/gate/) takes its column lists
from here: ``REQUIRED_COLUMNS`` (what a table must have to be read), ``SETUP_KEYS`` (what must be equal
for two rows to be compared side by side), ``variant_label`` (the name of a row within a setup).

Every field carries metadata:
- ``kind``: identity, setup, metric, telemetry, prediction, outcome, provenance, config;
- ``unit``: s, tokens/s, bytes, FLOP/s, fraction, ... ('' for names and counts);
- ``rule`` for values measured on every rank, how ranks combine into the one row (executed by
  bench/measure/combine.py): ``max`` (a synchronous step is as slow as its slowest rank; memory is the
  worst rank's), ``min``, ``sum`` (energy), ``mean`` (losses, utilisation), ``union`` (sets of names),
  ``rank0`` (identical on every rank or rank 0's view), ``per_rank`` (the list, rank order);
  ``derived`` means computed from already-combined values (formula in the docstring);
- ``doc``: the definition. Formulas of the metrics: bench/measure/metrics.py.

Rows written by older versions may lack optional columns (they load as null) or carry extra ones
(kept as read).
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields

RUNS_FILE = "runs.jsonl"


def col(kind: str, unit: str = "", rule: str | None = None, doc: str = "", required: bool = False,
        setup: bool = False):
    """A record field (default None) with its metadata."""
    return field(default=None, metadata={"kind": kind, "unit": unit, "rule": rule, "doc": doc,
                                         "required": required, "setup": setup})


@dataclass
class RunRecord:
    """One benchmark run. Metrics are None when the run failed before measuring them."""

    # identity
    run_id: str = col("identity", doc="unique per run; the per-step log is steps/<run_id>.jsonl", required=True)
    timestamp: str = col("identity", "ISO 8601 UTC", doc="when the row was written", required=True)
    # setup: what was run
    model: str = col("setup", doc="model preset name", required=True, setup=True)
    arch: str = col("setup", doc="'gpt2' or 'llama'")
    model_source: str = col("setup", doc="which implementation: 'native' (models/gpt.py) or 'hf' (Hugging Face "
                                         "transformers, models/hf.py); rows written before the column = native")
    strategy: str = col("setup", doc="canonical strategy name, e.g. fsdp+ac(full)+bf16", required=True)
    strategy_preset: str = col("setup", doc="the strategy preset chosen on the command line")
    world_size: int = col("setup", "processes", required=True, setup=True)
    nnodes: int = col("setup", "hosts", required=True)
    dp_size: int = col("setup", "processes", doc="data-parallel degree: world_size / (tp x pp)")
    tp: int = col("setup", "processes", doc="tensor-parallel degree (1 = off)")
    pp: int = col("setup", "processes", doc="pipeline-parallel degree: stages across ranks (1 = off)")
    dp_shard: int = col("setup", "processes", doc="ranks parameters are sharded over (FSDP's dp_size, else 1)")
    dp_replicate: int = col("setup", "processes", doc="ranks holding whole replicas that all-reduce gradients "
                            "(DDP's dp_size, else 1)")
    pp_schedule: str = col("setup", doc="pipeline schedule: gpipe, 1f1b, interleaved1f1b (null without pp)")
    pp_microbatches: int = col("setup", "micro-batches", doc="pipeline micro-batches per training micro-batch "
                               "(null without pp)")
    mesh: str = col("setup", doc="device mesh shape, dimensions of size 1 left out: 'dp2xtp2', 'pp2xdp2', '1'")
    device: str = col("setup", doc="'cpu' or 'cuda'", required=True)
    dtype: str = col("setup", doc="the dtype matmuls run in: fp32, tf32, bf16, fp16", required=True)
    seq_len: int = col("setup", "tokens", required=True, setup=True)
    micro_batch: int = col("setup", "sequences per rank", required=True, setup=True)
    grad_accum: int = col("setup", "micro-batches per step", required=True, setup=True)
    global_batch_tokens: int = col("setup", "tokens", doc="micro_batch x grad_accum x dp_size x seq_len",
                                   required=True)
    global_batch_seqs: int = col("setup", "sequences", doc="micro_batch x grad_accum x dp_size")
    steps: int = col("setup", "steps", doc="timed steps", required=True)
    warmup: int = col("setup", "steps", doc="untimed steps first", required=True)
    data: str = col("setup", doc="'synthetic', 'markov' or a path to text or tokens")
    seed: int = col("setup")
    tag: str = col("setup", doc="free label (suites: <suite>:<entry>)")
    # the headline metrics
    tokens_per_sec: float = col("metric", "tokens/s", "derived", "timed_steps x global_batch_tokens / "
                                "sum(step_time_s), global", required=True)
    tokens_per_sec_per_device: float = col("metric", "tokens/s/device", "derived", "tokens_per_sec / world_size",
                                           required=True)
    step_time_median_s: float = col("metric", "s", "derived", "median of the per-step max over ranks",
                                    required=True)
    step_time_p10_s: float = col("metric", "s", "derived", "10th percentile, as the median", required=True)
    step_time_p90_s: float = col("metric", "s", "derived", "90th percentile, as the median", required=True)
    step_time_mean_s: float = col("metric", "s", "derived", "mean of the per-step max over ranks")
    mfu: float = col("metric", "fraction", "derived", "flops_per_token x tokens_per_sec_per_device / "
                     "peak_flops; above 1 cannot be true (status suspect)", required=True)
    hfu: float = col("metric", "fraction", "derived", "as mfu, counting recomputation FLOPs", required=True)
    peak_flops: float = col("metric", "FLOP/s per device", "rank0", "table value or measured probe",
                            required=True)
    peak_flops_source: str = col("metric", rule="rank0", doc="'table:<gpu>' or 'probe:...'", required=True)
    peak_probe_spread: float = col("metric", "fraction", "rank0", "(max - min) / max of the probe's repeats")
    peak_probe_cpu_util: float = col("metric", "fraction", "rank0", "CPU share the probe got (1 = uncontended)")
    peak_mem_bytes: int = col("metric", "bytes", "max", "allocator peak (CUDA) or RSS high-water mark (CPU) "
                              "during the timed steps", required=True)
    peak_reserved_bytes: int = col("metric", "bytes", "max", "CUDA caching allocator reserved peak",
                                   required=True)
    peak_mem_bytes_per_rank: list = col("metric", "bytes", "per_rank", "peak_mem_bytes of each rank")
    loss: float = col("metric", "nats/token", "mean", "last step's loss, mean over data-parallel ranks",
                      required=True)
    first_step_time_s: float = col("metric", "s", "max", "first (warm-up) step; includes compilation")
    timed_steps: int = col("metric", "steps", "rank0", "timed steps that ran (fewer than steps after a NaN)")
    params: int = col("metric", "parameters", "rank0", "parameter count of the unsharded model")
    flops_per_token: float = col("metric", "FLOP/token", "rank0", "6 x matmul params + attention (models/flops)")
    recompute_flops_per_token: float = col("metric", "FLOP/token", "rank0", "forward FLOPs re-run by checkpointing")
    loss_floor: float = col("metric", "nats/token", "rank0", "the lowest loss any model can reach on the data: "
                            "data=markov's exact floor (bench/harness/data.py markov_floor), else empty")
    # quality: the held-out loss and the run to a target (bench/harness/evaluate.py, loop.py Target)
    eval_loss: float = col("metric", "nats/token", "rank0", "held-out loss at the last evaluation (eval_every): the "
                           "strategy's own model on eval_tokens of the data's held-out split, mean over them")
    eval_tokens: int = col("setup", "tokens", doc="tokens per evaluation: eval_batches x global_batch_tokens")
    evals: int = col("metric", "evaluations", "rank0", "held-out evaluations that ran")
    eval_time_s: float = col("metric", "s", "max", "time spent evaluating, all evaluations (not in any step time)")
    train_time_s: float = col("metric", "s", "derived", "training time: sum over every step, warm-up included, of "
                              "the step's max over ranks; evaluation excluded")
    target_loss: float = col("setup", "nats/token", doc="the held-out loss the run trains to (target_loss)")
    steps_to_target: int = col("metric", "steps", "rank0", "optimizer steps, warm-up included, through the first "
                               "evaluation at or below target_loss")
    tokens_to_target: int = col("metric", "tokens", "rank0", "steps_to_target x global_batch_tokens")
    time_to_target_s: float = col("metric", "s", "rank0", "training time (as train_time_s) through that step")
    wall_to_target_s: float = col("metric", "s", "rank0", "rank 0's wall clock from step 0 to the end of that "
                                  "evaluation: evaluations and everything between steps included")
    # counters no neighbour can move (bench/measure/counters.py), judged exactly by the A/B gate
    flops_counted_per_step: int = col("metric", "FLOP/step", "sum", "FlopCounterMode's count of one extra, "
                                      "untimed step, all ranks (empty under compile)")
    param_bytes: int = col("metric", "bytes", "sum", "bytes of the parameters the ranks' optimizers update")
    optimizer_state_bytes: int = col("metric", "bytes", "sum", "bytes of the optimizers' state tensors")
    graphs_compiled: int = col("metric", "graphs", "max", "TorchDynamo's unique graphs (0 without compile)")
    graph_breaks: int = col("metric", "breaks", "max", "TorchDynamo's graph breaks (0 without compile)")
    # telemetry (bench/measure/nvml.py, contention.py)
    gpu_util_pct: float = col("telemetry", "%", "mean", "NVML utilisation, mean over samples and ranks")
    gpu_power_w: float = col("telemetry", "W", "mean", "NVML power draw, mean")
    gpu_energy_j: float = col("telemetry", "J", "sum", "energy over the timed steps, all GPUs")
    gpu_mem_used_bytes: int = col("telemetry", "bytes", "max", "NVML used memory (all processes)")
    gpu_sm_clock_mhz: float = col("telemetry", "MHz", "mean", "SM clock, mean over samples")
    gpu_sm_clock_min_mhz: float = col("telemetry", "MHz", "min", "lowest SM clock seen")
    gpu_throttle_reasons: list = col("telemetry", rule="union", doc="clock throttle reasons seen")
    energy_per_token_j: float = col("telemetry", "J/token", "derived", "gpu_energy_j / timed tokens")
    cpu_util: float = col("telemetry", "fraction", "min", "process CPU time / (wall x threads): 1 = no contention")
    host_load_per_core: float = col("telemetry", "load/core", "max", "1-minute load average / cores")
    steal_pct: float = col("telemetry", "%", "max", "hypervisor steal time share")
    # predictions next to measurements (bench/plan/costmodel.py)
    mem_baseline_bytes: int = col("prediction", "bytes", "max", "memory held before the model exists")
    pred_peak_mem_bytes: int = col("prediction", "bytes", "rank0", "predicted peak, above the baseline")
    pred_mem_breakdown: dict = col("prediction", "bytes", "rank0", "predicted peak by part")
    pred_comm_bytes_per_step: int = col("prediction", "bytes/step", "rank0", "predicted bytes sent per rank")
    pred_comm_breakdown: dict = col("prediction", "bytes/step", "rank0", "predicted bytes by collective")
    pred_bubble_fraction: float = col("prediction", "fraction", "rank0", "pipeline bubble: (pp - 1) / (m + pp - 1), "
                                      "interleaved (pp - 1) / (v m + pp - 1); 0 without a pipeline (counts "
                                      "against MFU)")
    pred_step_time_s: float = col("prediction", "s", "rank0", "predicted step time (bench/plan/steptime.py) from "
                                  "the measured rates below")
    pred_tokens_per_sec: float = col("prediction", "tokens/s", "rank0", "global batch tokens / pred_step_time_s")
    pred_step_breakdown: dict = col("prediction", "s", "rank0", "compute_s, memory_s, comm_s, exposed_comm_s, "
                                    "bubble_s")
    pred_parts: dict = col("prediction", "s", "rank0", "with probe_parts=true: the model's own parts timed at the "
                           "run's shapes on every rank after the timed window, the slowest rank's (bench/measure/"
                           "parts.py: block_s, block_matmul_s, rest_s, rest_matmul_s per micro-batch; "
                           "adamw_*_s_per_param); the prediction above then uses them")
    mem_bw_bytes_per_s: float = col("prediction", "bytes/s", "rank0", "elementwise add probe (rank 0)")
    mem_bw_source: str = col("prediction", rule="rank0", doc="probe:measured or probe:cached; a probe whose "
                             "trials spread > 15 % or that shared the host with other work (> 20 % of its CPU) "
                             "says so, '(...: not cached)'")
    link_bw_bytes_per_s: float = col("prediction", "bytes/s", "rank0", "all-reduce bus bandwidth of the group")
    link_bw_source: str = col("prediction", rule="rank0", doc="probe:measured or probe:cached, '(...: not "
                              "cached)' as mem_bw_source; None in one process")
    link_bw_by_kind: dict = col("prediction", "bytes/s", "rank0", "bus bandwidth per collective (all_reduce, "
                                "all_gather, reduce_scatter); on a CPU host without a spare core measured with "
                                "the ranks' compute threads busy: what the predicted communication uses")
    link_bw_by_kind_source: str = col("prediction", rule="rank0", doc="probe:measured or probe:cached, "
                                      "'contended' when measured beside busy compute, '(neighbours N% of the "
                                      "host: not cached)' when other work shared the host")
    comm_bytes_per_step: int = col("prediction", "bytes/step", "max", "observed collective bytes per rank")
    comm_breakdown: dict = col("prediction", "bytes/step", "rank0", "observed bytes by collective")
    comm_calls_per_step: dict = col("prediction", "calls/step", "rank0", "observed calls by collective")
    # overlap (bench/measure/overlap.py: 2 profiled steps after the timed window, unions over streams/threads)
    compute_time_s: float = col("metric", "s/step", "max", "time with any compute running, per step")
    comm_time_s: float = col("metric", "s/step", "max", "time with any collective in flight, per step")
    exposed_comm_s: float = col("metric", "s/step", "max", "collective time with no compute running, per step")
    overlap_pct: float = col("metric", "%", "min", "100 x (comm_time_s - exposed_comm_s) / comm_time_s")
    matmul_time_s: float = col("metric", "s/step", "max", "time with a matmul or attention op running, per step")
    # outcome
    status: str = col("outcome", doc="ok, nan, oom, timeout, error, suspect, not_reached (finished without "
                      "reaching target_loss)", required=True)
    error: str = col("outcome", doc="why the run is not ok (None when ok)", required=True)
    suspect_reason: str = col("outcome", doc="why a number cannot be true (status suspect)")
    # provenance (bench/harness/env.py)
    git_sha: str = col("provenance", doc="HEAD, '-dirty' with local changes", required=True)
    torch_version: str = col("provenance", required=True)
    cuda_version: str = col("provenance")
    nccl_version: str = col("provenance")
    python_version: str = col("provenance")
    hostname: str = col("provenance", required=True)
    device_name: str = col("provenance", doc="GPU or CPU model", setup=True)
    device_count: int = col("provenance", "devices")
    cpu_threads: int = col("provenance", "threads", doc="torch intra-op threads")
    allocator: str = col("provenance", doc="the allocator and its settings: 'glibc', 'glibc (MALLOC_MMAP_THRESHOLD_"
                         "=65536)', 'jemalloc', 'cuda caching (expandable_segments:True)' (bench/harness/env.py)")
    config: dict = col("config", doc="the resolved Hydra configuration")

    def to_row(self) -> dict:
        """The JSON-ready row (every column, None where unknown)."""
        return asdict(self)


COLUMNS = [f.name for f in fields(RunRecord)]
META = {f.name: f.metadata for f in fields(RunRecord)}
REQUIRED_COLUMNS = [f.name for f in fields(RunRecord) if f.metadata["required"]]
# A run that measured everything: ok, suspect (finished, but a number -- MFU -- cannot be true), or not_reached
# (finished every step it was allowed without reaching target_loss: its speed and memory are real).
FINISHED = ("ok", "suspect", "not_reached")
MEASURED = ("ok", "not_reached")  # finished, and every number can be true: what the reports' tables summarise
NUMERIC_COLUMNS = [f.name for f in fields(RunRecord) if f.type in ("int", "float")]  # a number or null
# One definition of a setup: what must be equal for two rows to be compared (reports' tables, the gate).
SETUP_KEYS = ["model", "device_name", "world_size", "seq_len", "micro_batch", "grad_accum"]
assert set(SETUP_KEYS) == {f.name for f in fields(RunRecord) if f.metadata["setup"]}
# Within a setup a row is named by its strategy, dtype and implementation (variant_label).
VARIANT_KEYS = ["strategy", "dtype", "model_source"]
assert all(f.default is None or f.default is MISSING for f in fields(RunRecord))


def variant_label(strategy: str, dtype: str | None, source: str | None = None) -> str:
    """The strategy name, plus the dtype where the name does not imply it (``single (tf32)``), plus ``[HF]`` for
    the Hugging Face implementation (``fsdp+ac(full) [HF]``), so both implementations sit side by side."""
    named = next((d for d in ("bf16", "fp16") if d in str(strategy).split("+")), "fp32")
    label = strategy if dtype in (None, named) or dtype != dtype else f"{strategy} ({dtype})"
    return f"{label} [HF]" if source == "hf" else label


def implausible(row: dict) -> str | None:
    """Why a row's numbers cannot be true (mfu or hfu above 1: the peak was measured too low, e.g. a contended
    probe, or the FLOP count is wrong), or None. Such a row has status ``suspect``, never ``ok``."""
    for key in ("mfu", "hfu"):
        v = row.get(key)
        if v is not None and v == v and v > 1:
            return (f"{key}={v:.3f} > 1 cannot be true: the peak {row.get('peak_flops') or 0:.3g} FLOP/s "
                    f"({row.get('peak_flops_source')}) is too low for this run (a contended probe?)")
    return None
