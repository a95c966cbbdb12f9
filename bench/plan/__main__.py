"""Plan before renting GPUs: predicted per-rank memory and communication for every strategy combination.

    python -m bench.plan model=gpt2-xl world_size=64 device_memory_gib=80
    python -m bench.plan model=llama-125m world_size=8 device_memory_gib=24 micro_batch=8 seq_len=1024
    python -m bench.plan model=gpt2-xl world_size=4096 device_memory_gib=80 format=json
    python -m bench.plan model=gpt2-xl model.n_layer=24 world_size=64     # any model field, as bench/run.py
    python -m bench.plan model=gpt2-xl world_size=8 device=H100 link_gbps=360   # ranked by predicted tokens/s
    python -m bench.plan model=mini world_size=2 peak_tflops=0.06 mem_gbps=20 link_gbps=1 overlap=false
    python -m bench.plan model=tiny world_size=2 format=commands top=3 > plan.sh   # the runs, one per line

Keys (``--help`` lists them with defaults): model (a preset), world_size (data-parallel ranks),
device_memory_gib, micro_batch, seq_len (0: the model's context), grad_accum, pad_vocab_to, format
(table | json); with rates -- ``device=`` (a GPU of bench/hardware.py: its dense peak in each strategy's compute
dtype and its memory bandwidth) or ``peak_tflops=`` and ``mem_gbps=``, plus ``link_gbps=`` beyond one rank -- every row
also gets the predicted step time and tokens/s (bench/plan/steptime.py) and the strategies that fit are
ranked fastest first. Every row carries the command that runs it (``command``: bench/plan/command.py; the
table prints the first rows'); ``format=commands`` prints only those, one per line, for the rows that fit
(``top=N``: the first N). Formulas: bench/plan/costmodel.py. Nothing is allocated (shapes come from a meta model),
so any family size and thousands of ranks answer in about a second.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from omegaconf import OmegaConf  # noqa: E402

from bench.hardware import GPU_TABLE, lookup_device  # noqa: E402
from bench.plan.command import run_command  # noqa: E402
from bench.plan.costmodel import param_shapes, predict_comm, predict_memory  # noqa: E402
from bench.plan.steptime import Rates, predict_step  # noqa: E402
from bench.shape import ShapeArgs  # noqa: E402
from models.cli import UsageError, fail, opt, parse  # noqa: E402
from models.config import GPTConfig, get_config  # noqa: E402
from strategies.config import StrategyConfig, StrategyError  # noqa: E402
from strategies.mesh import mesh_shape  # noqa: E402
from strategies.pp import bubble_fraction  # noqa: E402

GIB = 2**30


@dataclass
class PlanArgs(ShapeArgs):
    """The shape (bench/shape.py: model, world_size -- split into (pp, dp, tp) by each strategy --, micro_batch,
    seq_len, grad_accum) and the planner's own options."""

    device_memory_gib: float = opt(80.0, "memory per device, GiB")
    pad_vocab_to: int = opt(1, "pad the vocabulary to a multiple of this")
    format: str = opt("table", "table | json | commands (the runs of the rows that fit, one command per line)")
    gpus_per_node: int = opt(8, "devices per node: how the commands launch world_size processes")
    top: int = opt(0, "only the first N rows (0: all)")
    device: str = opt("", "a GPU of bench/hardware.py (H100, H200, A100, L40S, L4, A10G, A10, V100): its peak "
                          "and memory bandwidth")
    peak_tflops: float = opt(0.0, "sustained matmul TFLOP/s per device for every strategy (instead of device='s "
                                  "datasheet peak in each strategy's compute dtype)")
    mem_gbps: float = opt(0.0, "memory bandwidth GB/s per device (overrides device='s)")
    link_gbps: float = opt(0.0, "all-reduce bus bandwidth GB/s of the process group (needed beyond one rank)")
    matmul_efficiency: float = opt(1.0, "fraction of the datasheet peak the model's matmuls reach (device= only)")
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
            _, peaks, hbm = hit
            dtype = s.compute_dtype_name("cuda") if s is not None else "bf16"
            flops = flops or peaks.get(dtype, peaks.get("fp32", 0)) * self.matmul_efficiency
            mem = mem or hbm
        if not flops and not mem:
            return None
        if not (flops and mem):
            raise UsageError("a step-time prediction needs both peak_tflops= and mem_gbps= (or device=)")
        if self.world_size > 1 and not self.link_gbps:
            raise UsageError(f"world_size={self.world_size} needs link_gbps= (the group's all-reduce bus bandwidth)")
        return Rates(flops, mem, self.link_gbps * 1e9 or None)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.format not in ("table", "json", "commands"):
            raise UsageError(f"format={self.format!r}; valid: table, json, commands")
        if self.gpus_per_node < 1:
            raise UsageError(f"gpus_per_node={self.gpus_per_node} is invalid; must be >= 1")
        if self.world_size > self.gpus_per_node and self.world_size % self.gpus_per_node:
            raise UsageError(f"world_size={self.world_size} is not a whole number of nodes of gpus_per_node="
                             f"{self.gpus_per_node}")
        if self.top < 0:
            raise UsageError(f"top={self.top} is invalid; must be >= 0 (0: all rows)")
        if self.pad_vocab_to < 1:
            raise UsageError(f"pad_vocab_to={self.pad_vocab_to} is invalid; must be >= 1")
        if not (math.isfinite(self.device_memory_gib) and self.device_memory_gib > 0):
            raise UsageError(f"device_memory_gib={self.device_memory_gib} is invalid; must be a finite number > 0")
        for key in ("peak_tflops", "mem_gbps", "link_gbps"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) >= 0):
                raise UsageError(f"{key}={getattr(self, key)} is invalid; must be a finite number >= 0")
        if not 0 < self.matmul_efficiency <= 1:
            raise UsageError(f"matmul_efficiency={self.matmul_efficiency} is invalid; must be in (0, 1]")


def plan_axes(world: int) -> dict[str, list]:
    """The values the planner tries per strategy field on ``world`` devices (combinations that fail validation are
    left out; fp32 and bf16)."""
    return {"pp": [p for p in (1, 2, 4, 8) if world % p == 0], "pp_schedule": ["1f1b", "interleaved1f1b", "gpipe"],
            "tp": [t for t in (1, 2, 4, 8) if world % t == 0], "sp": [False, True],
            "ac": ["none", "full"],
            "dp": ["none", "ddp", "fsdp"],  # none: one process, or one model-parallel replica
            "reshard_after_forward": [True, False],
            "amp": ["fp32", "bf16"]}


def combinations(world: int, model: GPTConfig | None = None, micro_batch: int = 1,
                 seq_len: int = 0, left_out: dict | None = None) -> list[StrategyConfig]:
    """Every valid combination of the planner's axes (``plan_axes``) on ``world`` GPUs,
    one per canonical name; with ``model``, only those valid for it (tp against its heads, pp against its
    blocks and head tying, ...). ``left_out`` collects why model-specific combinations were dropped."""
    axes = plan_axes(world)
    out: dict[str, StrategyConfig] = {}
    for values in itertools.product(*axes.values()):
        try:
            s = StrategyConfig(**dict(zip(axes, values)))
            s.validate_for("cuda", world)
        except StrategyError:
            continue
        try:
            if model is not None:
                s.validate_run(model, seq_len or model.block_size, micro_batch)
        except StrategyError as exc:
            if left_out is not None:
                left_out[str(exc)] = left_out.get(str(exc), 0) + 1
            continue
        out.setdefault(s.canonical_name, s)
    return list(out.values())


def model_config(args: PlanArgs, overrides: list[str], prog: str = "python -m bench.plan") -> GPTConfig:
    """The preset with ``model.<field>=value`` overrides applied (as bench/run.py takes them), validated (a bad
    one stops ``prog`` with one line)."""
    cfg = get_config(args.model, pad_vocab_to=args.pad_vocab_to)
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
    cfg = model_config(args, list(model_overrides))
    seq = args.seq_len or cfg.block_size
    if seq > cfg.block_size:
        raise ValueError(f"seq_len={seq} exceeds {cfg.name}'s context block_size={cfg.block_size}")
    shapes = param_shapes(cfg)
    rates = args.rates()
    as_run = list(model_overrides) + ([f"pad_vocab_to={args.pad_vocab_to}"] if args.pad_vocab_to > 1 else [])
    rows = []
    left_out: dict[str, int] = {}
    for s in combinations(args.world_size, cfg, args.micro_batch, seq, left_out):
        mem = predict_memory(cfg, s, args.world_size, args.micro_batch, seq, shapes=shapes)
        comm = predict_comm(cfg, s, args.world_size, args.grad_accum, micro_batch=args.micro_batch, seq_len=seq,
                            shapes=shapes)
        rows.append({"strategy": s.canonical_name, "mesh": mesh_shape(s, args.world_size).describe(),
                     "model": cfg.name, "world_size": args.world_size,
                     "micro_batch": args.micro_batch, "seq_len": seq, "pred_mem_bytes": mem,
                     "fits": mem["total"] <= args.device_memory_gib * GIB, "pred_comm_bytes_per_step": comm,
                     "pred_bubble_fraction": bubble_fraction(s),
                     "command": run_command(args.model, s, args.world_size, args.micro_batch, seq, args.grad_accum,
                                            args.gpus_per_node, as_run)})
        if rates is not None:
            t = predict_step(cfg, s, args.world_size, args.micro_batch, seq, args.grad_accum, args.rates(s),
                             args.overlap)
            rows[-1].update(pred_step_s=t["step_s"], pred_tokens_per_sec=t["tokens_per_sec"],
                            pred_step_breakdown={k: v for k, v in t.items() if k not in ("step_s", "tokens_per_sec")})
    if rates is not None:  # what fits, fastest first; then what does not fit
        rows.sort(key=lambda r: (not r["fits"], -r["pred_tokens_per_sec"]))
    if rows:
        rows[0]["left_out"] = left_out  # why the combinations missing for this model are missing
    return rows[:args.top] if args.top else rows


def render(rows: list[dict], device_gib: float) -> str:
    """The plan as a text table (pandas): GiB per predicted part per rank, total, fits, comm GB per step."""
    import pandas as pd

    first = ["params", "grads", "optimizer", "autocast_weights", "fsdp_unsharded", "activations", "head"]
    parts = list(dict.fromkeys(first + [k for r in rows for k in r["pred_mem_bytes"] if k != "total"]))
    table = pd.DataFrame([{"strategy": r["strategy"], "mesh": r["mesh"],
                           **{p: r["pred_mem_bytes"].get(p, 0) / GIB for p in parts},
                           "total GiB": r["pred_mem_bytes"]["total"] / GIB, "fits": "yes" if r["fits"] else "NO",
                           "comm GB/step": r["pred_comm_bytes_per_step"]["total"] / 1e9,
                           "bubble": r["pred_bubble_fraction"],
                           **({"step ms": r["pred_step_s"] * 1e3, "tokens/s": f"{r['pred_tokens_per_sec']:,.0f}"}
                              if "pred_step_s" in r else {})} for r in rows])
    r0, width = rows[0], max(len(r["strategy"]) for r in rows)
    text = table.to_string(index=False, float_format=lambda v: f"{v:.2f}",
                           formatters={"strategy": lambda v: f"{v:<{width}}"})
    return (text + f"\n\n{r0['model']}, world size {r0['world_size']}, micro-batch {r0['micro_batch']}, "
            f"seq {r0['seq_len']}; "
            f"per-rank GiB against {device_gib:g} GiB; comm = full-tensor bytes per step per rank "
            "(bench/plan/costmodel.py and each strategy's terms in strategies/*.py)."
            + ("; step ms and tokens/s predicted by bench/plan/steptime.py, rows that fit fastest first"
               if "pred_step_s" in r0 else "")
            + "".join(f"\nleft out {n} combination(s): {why}" for why, n in r0.get("left_out", {}).items())
            + "\n\nto run the first rows that fit (format=commands prints every one):\n"
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
        print(json.dumps(rows, indent=1) if args.format == "json" else render(rows, args.device_memory_gib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
