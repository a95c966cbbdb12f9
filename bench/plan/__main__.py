"""Plan before renting GPUs: for every strategy, the shape that fits and runs fastest, its memory and communication.

    python -m bench.plan model=gpt2-xl world_size=64 device_memory_gib=80
    python -m bench.plan model=gpt2-xl world_size=64 device=H100 link_gbps=360 global_batch=512  # ranked, a target
    python -m bench.plan model=llama-125m world_size=8 device_memory_gib=24 micro_batch=8 seq_len=1024
    python -m bench.plan model=gpt2-xl world_size=4096 device_memory_gib=80 format=json
    python -m bench.plan model=gpt2-xl model.n_layer=24 world_size=64     # any model field, as bench/run.py
    python -m bench.plan model=mini world_size=2 peak_tflops=0.06 mem_gbps=20 link_gbps=1 overlap=false
    python -m bench.plan model=tiny world_size=2 format=commands top=3 > plan.sh   # the runs, one per line

Keys (``--help`` lists them with defaults): model (a preset), world_size (all ranks), gpus_per_node,
device_memory_gib, global_batch or global_batch_tokens (a target per optimizer step), micro_batch (0: searched),
seq_len (0: the model's context), grad_accum (without a target), pad_vocab_to (0: 128 x tp, Megatron's rule),
format (table | json | commands); with rates -- ``device=`` (a GPU of bench/hardware.py: its dense peak in each
strategy's compute dtype and its memory bandwidth) or ``peak_tflops=`` and ``mem_gbps=``, plus ``link_gbps=``
beyond one rank -- every row also gets the predicted step time and tokens/s (bench/plan/steptime.py) and the
strategies that fit are ranked fastest first.

The strategies (``combinations``): every valid mix of ``plan_axes`` -- tp over the divisors of the world within a
node that divide the heads, pp with each schedule, DDP / FSDP / HSDP (replicas across nodes), checkpointing and
precision. For each, bench/plan/search.py chooses the vocabulary padding, the micro-batch and the accumulation
(the target global batch met exactly); a pipeline on a tied model unties its head. Both model changes are stated
in the row (``model_changes``) and carried by its command. Every row carries the command that runs it
(``command``: bench/plan/command.py); ``format=commands`` prints only those, one per line, for the rows that fit
(``top=N``: the first N). The table shows the fastest that fit (``top``, default 6), the best plan of each family
(dp only, dp x tp, with pp, hsdp) with why it wins, and counts everything else with its reason; ``format=json``
holds every row. Formulas: bench/plan/costmodel.py. Nothing is allocated (shapes come from a meta model).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from omegaconf import OmegaConf  # noqa: E402

from bench.hardware import GPU_TABLE, lookup_device  # noqa: E402
from bench.plan.calibration import device_calibration, efficiencies, error_note  # noqa: E402
from bench.plan.command import run_command  # noqa: E402
from bench.plan.costmodel import param_shapes, predict_comm, predict_memory  # noqa: E402
from bench.plan.search import Shape, auto_pad, choose_shape, family, padded_model, vocab_padding, why  # noqa: E402
from bench.plan.steptime import Rates, predict_step  # noqa: E402
from bench.shape import ShapeArgs  # noqa: E402
from models.cli import UsageError, fail, opt, parse  # noqa: E402
from models.config import GPTConfig, get_config  # noqa: E402
from strategies.config import StrategyConfig, StrategyError  # noqa: E402
from strategies.mesh import dp_degree, mesh_shape  # noqa: E402
from strategies.pp import bubble_fraction, n_microbatches  # noqa: E402

GIB = 2**30


@dataclass
class PlanArgs(ShapeArgs):
    """The shape (bench/shape.py: model, world_size -- split into (pp, dp, tp) by each strategy --, micro_batch,
    seq_len, grad_accum) and the planner's own options."""

    micro_batch: int = opt(0, "sequences per micro-batch per data-parallel rank (0: searched per strategy)")
    device_memory_gib: float = opt(80.0, "memory per device, GiB")
    global_batch: int = opt(0, "target sequences per optimizer step, all ranks (0: none; grad_accum= then holds)")
    global_batch_tokens: int = opt(0, "target tokens per optimizer step (instead of global_batch; a multiple of "
                                      "seq_len)")
    pad_vocab_to: int = opt(0, "pad the vocabulary to a multiple of this (0: 128 x tp, Megatron's rule; 1: none)")
    format: str = opt("table", "table | json | commands (the runs of the rows that fit, one command per line)")
    gpus_per_node: int = opt(8, "devices per node: tp stays within one, HSDP replicates across nodes, the commands "
                                "launch world_size processes")
    top: int = opt(0, "only the first N rows (0: all; the table shows 6 then)")
    device: str = opt("", "a GPU of bench/hardware.py (H100, H200, A100, L40S, L4, A10G, A10, V100): its peak "
                          "and memory bandwidth")
    peak_tflops: float = opt(0.0, "sustained matmul TFLOP/s per device for every strategy (instead of device='s "
                                  "datasheet peak in each strategy's compute dtype)")
    mem_gbps: float = opt(0.0, "memory bandwidth GB/s per device (overrides device='s)")
    link_gbps: float = opt(0.0, "all-reduce bus bandwidth GB/s of the process group (needed beyond one rank)")
    matmul_efficiency: float = opt(1.0, "fraction of the datasheet peak the model's matmuls reach (device= only; "
                                        "other than 1: instead of the calibration)")
    calibrated: bool = opt(True, "device=: apply results/calibration.json's efficiencies for that GPU "
                                 "(python -m bench.tune.calibrate); false: its datasheet as is")
    overlap: bool = opt(True, "communication can overlap compute (GPU streams; a CPU with spare cores)")

    def rates(self, s: StrategyConfig | None = None) -> Rates | None:
        """The step-time model's rates for strategy ``s`` (device='s peak in its compute dtype) from device= and
        the explicit keys, or None (a memory-only plan)."""
        flops, mem = self.peak_tflops * 1e12, self.mem_gbps * 1e9
        if self.device:
            hit = lookup_device(self.device)
            if hit is None:
                raise UsageError(f"device={self.device!r} is not in bench/hardware.py; valid: "
                                 + ", ".join(row[1] for row in GPU_TABLE) + " (or give peak_tflops= and mem_gbps=)")
            label, peaks, hbm = hit
            dtype = s.compute_dtype_name("cuda") if s is not None else "bf16"
            eff = efficiencies(label, bool(s is not None and s.compile)) if self.calibration() else None
            eff = eff or (self.matmul_efficiency, 1.0)
            flops = flops or peaks.get(dtype, peaks.get("fp32", 0)) * eff[0]
            mem = mem or hbm * eff[1]
        if not flops and not mem:
            return None
        if not (flops and mem):
            raise UsageError("a step-time prediction needs both peak_tflops= and mem_gbps= (or device=)")
        if self.world_size > 1 and not self.link_gbps:
            raise UsageError(f"world_size={self.world_size} needs link_gbps= (the group's all-reduce bus bandwidth)")
        return Rates(flops, mem, self.link_gbps * 1e9 or None)

    MIN_MICRO_BATCH = 0  # 0: searched

    @property
    def wants_calibration(self) -> bool:
        """device= with calibrated=true and no explicit rate (peak_tflops=, mem_gbps=, matmul_efficiency=)."""
        return bool(self.device and self.calibrated and not (self.peak_tflops or self.mem_gbps)
                    and self.matmul_efficiency == 1)

    def calibration(self) -> dict | None:
        """results/calibration.json's entry for device= when ``wants_calibration``; else None (the datasheet, or the
        rates given)."""
        if not self.wants_calibration:
            return None
        hit = lookup_device(self.device)
        return device_calibration(hit[0]) if hit else None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.global_batch < 0 or self.global_batch_tokens < 0:
            raise UsageError(f"global_batch={self.global_batch} / global_batch_tokens={self.global_batch_tokens} is "
                             "invalid; must be >= 0 (0: no target)")
        if self.global_batch and self.global_batch_tokens:
            raise UsageError("give global_batch= (sequences) or global_batch_tokens=, not both")
        if (self.global_batch or self.global_batch_tokens) and self.grad_accum != 1:
            raise UsageError(f"grad_accum={self.grad_accum} with a target global batch: the planner derives the "
                             "accumulation from it; drop one of the two")
        if self.format not in ("table", "json", "commands"):
            raise UsageError(f"format={self.format!r}; valid: table, json, commands")
        if self.gpus_per_node < 1:
            raise UsageError(f"gpus_per_node={self.gpus_per_node} is invalid; must be >= 1")
        if self.world_size > self.gpus_per_node and self.world_size % self.gpus_per_node:
            raise UsageError(f"world_size={self.world_size} is not a whole number of nodes of gpus_per_node="
                             f"{self.gpus_per_node}")
        if self.top < 0:
            raise UsageError(f"top={self.top} is invalid; must be >= 0 (0: all rows)")
        if self.pad_vocab_to < 0:
            raise UsageError(f"pad_vocab_to={self.pad_vocab_to} is invalid; must be >= 0 (0: 128 x tp; 1: none)")
        if not (math.isfinite(self.device_memory_gib) and self.device_memory_gib > 0):
            raise UsageError(f"device_memory_gib={self.device_memory_gib} is invalid; must be a finite number > 0")
        for key in ("peak_tflops", "mem_gbps", "link_gbps"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) >= 0):
                raise UsageError(f"{key}={getattr(self, key)} is invalid; must be a finite number >= 0")
        if not 0 < self.matmul_efficiency <= 1:
            raise UsageError(f"matmul_efficiency={self.matmul_efficiency} is invalid; must be in (0, 1]")


def plan_axes(world: int, gpus_per_node: int = 8) -> dict[str, list]:
    """The values the planner tries per strategy field on ``world`` devices, ``gpus_per_node`` to a node
    (combinations that fail validation are left out): tp over the divisors of the world up to a node (a
    tensor-parallel group never crosses nodes), pp over 1, 2, 4, 8; HSDP's replicas: one per node, when there is
    more than one node; fp32 and bf16."""
    nodes = world // gpus_per_node if world > gpus_per_node else 1
    return {"pp": [p for p in (1, 2, 4, 8) if world % p == 0], "pp_schedule": ["1f1b", "interleaved1f1b", "gpipe"],
            "tp": [t for t in range(1, min(world, gpus_per_node) + 1) if world % t == 0], "sp": [False, True],
            "ac": ["none", "full"],
            "dp": ["none", "ddp", "fsdp"],  # none: one process, or one model-parallel replica
            "dp_replicate": [1] + ([nodes] if nodes > 1 else []),
            "reshard_after_forward": [True, False],
            "amp": ["fp32", "bf16"]}


def combinations(world: int, model: GPTConfig | None = None, micro_batch: int = 1,
                 seq_len: int = 0, left_out: dict | None = None, gpus_per_node: int = 8,
                 model_for=None) -> list[StrategyConfig]:
    """Every valid combination of the planner's axes (``plan_axes``) on ``world`` GPUs,
    one per canonical name; with ``model``, only those valid for it (tp against its heads, pp against its
    blocks and head tying, ...; ``model_for(s)``: the model strategy ``s`` would run, e.g. padded for its tp).
    ``micro_batch`` 0: the pipeline's own micro-batches (the smallest the search tries). ``left_out`` collects
    why model-specific combinations were dropped."""
    axes = plan_axes(world, gpus_per_node)
    out: dict[str, StrategyConfig] = {}
    for values in itertools.product(*axes.values()):
        try:
            s = StrategyConfig(**dict(zip(axes, values)))
            s.validate_for("cuda", world)
        except StrategyError:
            continue
        if s.canonical_name in out:
            continue
        try:
            if model is not None:
                m = model_for(s) if model_for is not None else model
                s.validate_run(m, seq_len or m.block_size, micro_batch or n_microbatches(s))
        except StrategyError as exc:
            if left_out is not None:
                left_out[str(exc)] = left_out.get(str(exc), 0) + 1
            continue
        out[s.canonical_name] = s
    return list(out.values())


def model_config(args: PlanArgs, overrides: list[str], prog: str = "python -m bench.plan") -> GPTConfig:
    """The preset with ``model.<field>=value`` overrides applied (as bench/run.py takes them), validated (a bad
    one stops ``prog`` with one line)."""
    cfg = get_config(args.model, pad_vocab_to=args.pad_vocab_to or 1)  # 0 (the planner's search): per strategy
    if not overrides:
        return cfg
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(overrides)))
    except Exception as exc:
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        fields = ", ".join(f.name for f in dataclasses.fields(GPTConfig))
        fail(prog, f"{' '.join(str(cause).split()[:30])} (model keys: {fields})")


def plan(args: PlanArgs, model_overrides: list[str] = ()) -> list[dict]:
    """Every strategy's row (module docstring), what fits fastest first when there are rates; the first row's
    ``left_out`` counts the combinations the model cannot take, by reason."""
    cfg = model_config(args, list(model_overrides))
    seq = args.seq_len or cfg.block_size
    if seq > cfg.block_size:
        raise ValueError(f"seq_len={seq} exceeds {cfg.name}'s context block_size={cfg.block_size}")
    global_batch = args.global_batch
    if args.global_batch_tokens:
        if args.global_batch_tokens % seq:
            raise ValueError(f"global_batch_tokens={args.global_batch_tokens} is not a multiple of seq_len={seq}")
        global_batch = args.global_batch_tokens // seq
    ranked = args.rates() is not None  # (a bad rate stops here, before any work)
    pinned = args.pad_vocab_to > 0 or any(o.startswith("pad_vocab_to=") for o in model_overrides)
    untie_for_pp = cfg.tie_embeddings and not any(o.startswith("tie_embeddings=") for o in model_overrides)

    def model_for(s: StrategyConfig) -> GPTConfig:
        m = cfg if pinned else padded_model(cfg, auto_pad(s.tp))
        return dataclasses.replace(m, tie_embeddings=False) if s.pp > 1 and untie_for_pp else m

    shapes: dict[tuple, list] = {}  # (padded vocabulary, tied) -> param_shapes: one meta model each
    left_out: dict[str, int] = {}
    rows = []
    for s in combinations(args.world_size, cfg, args.micro_batch, seq, left_out, args.gpus_per_node, model_for):
        m = model_for(s)
        key = (m.padded_vocab_size, m.tie_embeddings)
        if key not in shapes:
            shapes[key] = param_shapes(m)
        sh = shapes[key]
        rates = args.rates(s)
        shape = choose_shape(
            s, args.world_size, global_batch, args.micro_batch, args.grad_accum, round(args.device_memory_gib * GIB),
            partial(predict_memory, m, s, args.world_size, seq_len=seq, shapes=sh),
            None if rates is None else partial(predict_step, m, s, args.world_size, seq_len=seq, rates=rates,
                                               overlap=args.overlap))
        if isinstance(shape, str):
            left_out[shape] = left_out.get(shape, 0) + 1
            continue
        rows.append(_row(args, cfg, m, s, seq, shape, sh, list(model_overrides), pinned))
    if ranked:  # what fits, fastest first; then what does not fit
        rows.sort(key=lambda r: (not r["fits"], -r["pred_tokens_per_sec"]))
    heads = [t for t in range(2, cfg.n_head + 1) if cfg.n_head % t == 0]
    if heads and not any(args.world_size % t == 0 and t <= args.gpus_per_node for t in heads):
        left_out[f"tp: model.n_head={cfg.n_head} takes tp " + ", ".join(map(str, heads[:6]))
                 + f"; none divides world_size={args.world_size} within a node of {args.gpus_per_node}"] = 0
    if not rows:
        raise ValueError(f"no strategy can run {cfg.name} on world_size={args.world_size}: "
                         + "; ".join(left_out))
    if args.device and ranked:  # how far the GPU step times are expected to be off, in every row and the header
        label = lookup_device(args.device)[0]
        applied, entry = args.wants_calibration, args.calibration()
        for r in rows:
            r["pred_step_error"] = None if entry is None else {
                "loo_median_abs": entry["loo_median_abs_error"], "loo_max_abs": entry["loo_max_abs_error"],
                "calibrated_on_rows": entry["rows"]}
        rows[0]["step_time_note"] = error_note(label) if applied else (
            f"step times for {label}: datasheet rates as given (calibrated=false, matmul_efficiency= or explicit "
            "rates), error not known")
    rows[0]["left_out"] = left_out  # why the combinations missing for this model are missing
    return rows[:args.top] if args.top else rows


def _row(args: PlanArgs, asked: GPTConfig, m: GPTConfig, s: StrategyConfig, seq: int, shape: Shape, shapes: list,
         overrides: list[str], pinned: bool) -> dict:
    """One plan row: the strategy, the chosen shape and model changes, predicted memory, communication and (with
    rates) step time, and the command that runs it."""
    changes, as_run = [], list(overrides)
    if not pinned and m.padded_vocab_size != asked.padded_vocab_size:
        pad = vocab_padding(m, seq)
        changes.append(f"pad_vocab_to={m.pad_vocab_to} ({asked.vocab_size} -> {m.padded_vocab_size}: +{pad['rows']} "
                       f"rows, +{pad['bytes'] / 2**20:.1f} MiB fp32, +{pad['flops_pct']:.3f} % FLOPs)")
    if m.pad_vocab_to > 1 and not any(o.startswith("pad_vocab_to=") for o in overrides):
        as_run.append(f"pad_vocab_to={m.pad_vocab_to}")
    if asked.tie_embeddings and not m.tie_embeddings:
        extra = m.padded_vocab_size * m.n_embd
        changes.append(f"tie_embeddings=false (a pipeline's head and embedding are different stages: "
                       f"+{extra / 1e6:.1f} M parameters)")
        as_run.append("tie_embeddings=false")
    world, mb, ga = args.world_size, shape.micro_batch, shape.grad_accum
    dp = dp_degree(s, world)
    row = {"strategy": s.canonical_name, "family": family(s), "mesh": mesh_shape(s, world).describe(),
           "model": asked.name, "world_size": world, "micro_batch": mb, "grad_accum": ga, "seq_len": seq,
           "global_batch": mb * ga * dp, "global_batch_tokens": mb * ga * dp * seq,
           "vocab_size": m.padded_vocab_size, "model_changes": changes,
           "pred_mem_bytes": shape.mem, "fits": shape.fits,
           "pred_comm_bytes_per_step": predict_comm(m, s, world, ga, micro_batch=mb, seq_len=seq, shapes=shapes),
           "pred_bubble_fraction": bubble_fraction(s),
           "command": run_command(args.model, s, world, mb, seq, ga, args.gpus_per_node, as_run)}
    if shape.step is not None:
        t = shape.step
        row.update(pred_step_s=t["step_s"], pred_tokens_per_sec=t["tokens_per_sec"],
                   pred_step_breakdown={k: v for k, v in t.items() if k not in ("step_s", "tokens_per_sec")})
    return row


def family_best(rows: list[dict]) -> dict[str, dict]:
    """The first fitting row of each family (rows are fastest first when ranked)."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["fits"]:
            best.setdefault(r["family"], r)
    return best


TABLE_TOP = 6  # rows the table shows without top=


def render(rows: list[dict], device_gib: float, top: int = 0) -> str:
    """The plan as text: a table (pandas) of the first ``top`` (default ``TABLE_TOP``) rows that fit when ranked by
    speed (every row without rates) -- micro-batch, accumulation, GiB per predicted part per rank, total, fits,
    comm GB per step --, then each family's best with why the fastest beats it, the rows not shown counted, the
    left-out combinations with their reasons, and the first commands."""
    import pandas as pd

    ranked = "pred_step_s" in rows[0]
    shown = [r for r in rows if r["fits"]][:top or TABLE_TOP] if ranked else rows
    shown = shown or rows[:top or TABLE_TOP]
    first = ["params", "grads", "optimizer", "autocast_weights", "fsdp_unsharded", "activations", "head"]
    parts = list(dict.fromkeys(first + [k for r in shown for k in r["pred_mem_bytes"] if k != "total"]))
    table = pd.DataFrame([{"strategy": r["strategy"], "mesh": r["mesh"], "mb": r["micro_batch"],
                           "ga": r["grad_accum"],
                           **{p: r["pred_mem_bytes"].get(p, 0) / GIB for p in parts},
                           "total GiB": r["pred_mem_bytes"]["total"] / GIB, "fits": "yes" if r["fits"] else "NO",
                           "comm GB/step": r["pred_comm_bytes_per_step"]["total"] / 1e9,
                           "bubble": r["pred_bubble_fraction"],
                           **({"step ms": r["pred_step_s"] * 1e3, "tokens/s": f"{r['pred_tokens_per_sec']:,.0f}"}
                              if ranked else {})} for r in shown])
    r0, width = rows[0], max(len(r["strategy"]) for r in shown)
    text = table.to_string(index=False, float_format=lambda v: f"{v:.2f}",
                           formatters={"strategy": lambda v: f"{v:<{width}}"})
    batches = sorted({r["global_batch"] for r in rows})
    text += (f"\n\n{r0['model']}, world size {r0['world_size']}, seq {r0['seq_len']}, global batch "
             + (f"{batches[0]} sequences" if len(batches) == 1 else f"{batches[0]}-{batches[-1]} sequences by row")
             + f"; mb micro-batch, ga accumulation (chosen per strategy unless given: bench/plan/search.py); "
             f"per-rank GiB against {device_gib:g} GiB; comm = full-tensor bytes per step per rank "
             "(bench/plan/costmodel.py and each strategy's terms in bench/plan/terms.py)"
             + ("; step ms and tokens/s predicted by bench/plan/steptime.py, the fastest that fit first"
                if ranked else ""))
    if "step_time_note" in r0:
        text += "\n" + r0["step_time_note"]
    changes = sorted({c for r in rows for c in r["model_changes"]})
    if changes:
        text += "\nmodel changes the plans make (in each row's model_changes and command):" + "".join(
            f"\n  {c}" for c in changes)
    if ranked and len(shown) > 1 and shown[1]["fits"]:  # why each of the first rows wins over the next
        text += "\n\nwhy the first win:" + "".join(f"\n  {why(a, b)}" for a, b in zip(shown[:3], shown[1:4])
                                                     if b["fits"])
    best = family_best(rows)
    if ranked and best:
        top_row = next(r for r in rows if r["fits"])
        text += "\n\nbest of each family:" + "".join(
            f"\n  {fam:<8} {r['strategy']} (mb {r['micro_batch']}, ga {r['grad_accum']}): "
            f"{r['pred_tokens_per_sec']:,.0f} tokens/s"
            + ("" if r is top_row else f"; {why(top_row, r)}") for fam, r in best.items())
    elif best:
        text += "\n\nfitting families: " + ", ".join(f"{fam} ({sum(r['family'] == fam and r['fits'] for r in rows)})"
                                                     for fam in best)
    hidden = len(rows) - len(shown)
    if hidden:
        text += (f"\n\n{hidden} more row(s) not shown: {sum(r['fits'] for r in rows) - sum(r['fits'] for r in shown)}"
                 f" that fit, {sum(not r['fits'] for r in rows) - sum(not r['fits'] for r in shown)} that do not "
                 "(top=0 format=json lists every row)")
    text += "".join(f"\nleft out {n or ''}{' combination(s): ' if n else ''}{why_}"
                    for why_, n in r0.get("left_out", {}).items())
    return (text + "\n\nto run the first rows that fit (format=commands prints every one):\n"
            + "\n".join(f"  {r['command']}" for r in [r for r in rows if r["fits"]][:3]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    model_overrides = [a.removeprefix("model.") for a in argv if a.startswith("model.")]
    args = parse(PlanArgs, [a for a in argv if not a.startswith("model.")], "python -m bench.plan", __doc__)
    try:
        rows = plan(args, model_overrides)
    except (ValueError, UsageError) as exc:
        fail("plan", str(exc))
    if args.format == "commands":
        print("\n".join(r["command"] for r in rows if r["fits"]))
    else:
        print(json.dumps(rows, indent=1) if args.format == "json" else render(rows, args.device_memory_gib, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
