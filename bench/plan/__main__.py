"""Plan before renting GPUs: predicted per-rank memory and communication for every strategy combination.

    python -m bench.plan model=gpt2-xl world_size=64 device_memory_gib=80
    python -m bench.plan model=llama-125m world_size=8 device_memory_gib=24 micro_batch=8 seq_len=1024
    python -m bench.plan model=gpt2-xl world_size=4096 device_memory_gib=80 format=json

Keys: model (a preset), world_size (data-parallel ranks), device_memory_gib, micro_batch (default 1),
seq_len (default: the model's context), grad_accum (default 1), pad_vocab_to (default 1), format
(table | json). Formulas: bench/plan/costmodel.py. Nothing is allocated (shapes come from a meta model),
so any family size and thousands of ranks answer in about a second.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.plan.costmodel import param_groups, predict_comm, predict_memory  # noqa: E402
from models.config import PRESETS, get_config  # noqa: E402
from strategies.config import TECHNIQUES, StrategyConfig, StrategyError  # noqa: E402

GIB = 2**30
KEYS = {"model": str, "world_size": int, "device_memory_gib": float, "micro_batch": int, "seq_len": int,
        "grad_accum": int, "pad_vocab_to": int, "format": str}


def parse(argv: list[str]) -> dict:
    args = {"world_size": 1, "device_memory_gib": 80.0, "micro_batch": 1, "seq_len": 0, "grad_accum": 1,
            "pad_vocab_to": 1, "format": "table"}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in KEYS:
            raise ValueError(f"bad argument {item!r}; use key=value with keys: {', '.join(KEYS)}")
        try:
            args[key] = KEYS[key](value)
        except ValueError:
            raise ValueError(f"{key}={value!r} is not a valid {KEYS[key].__name__}") from None
    if "model" not in args:
        raise ValueError(f"model= is required; valid names: {', '.join(PRESETS)}")
    if args["format"] not in ("table", "json"):
        raise ValueError(f"format={args['format']!r}; valid: table, json")
    for key in ("world_size", "micro_batch", "grad_accum", "pad_vocab_to"):
        if args[key] < 1:
            raise ValueError(f"{key}={args[key]} is invalid; must be >= 1")
    if args["seq_len"] < 0:
        raise ValueError(f"seq_len={args['seq_len']} is invalid; must be >= 0 (0 = the model's context)")
    gib = args["device_memory_gib"]
    if not (math.isfinite(gib) and gib > 0):
        raise ValueError(f"device_memory_gib={gib} is invalid; must be a finite number > 0")
    if args["model"] not in PRESETS:
        raise ValueError(f"model={args['model']!r} is not a preset; valid: {', '.join(PRESETS)}")
    return args


def combinations(world: int) -> list[StrategyConfig]:
    """Every valid combination of the techniques' plan axes (strategies/*.py: ``plan_axes``) on ``world`` GPUs,
    one per canonical name."""
    axes = {k: v for t in TECHNIQUES for k, v in t.plan_axes(world).items()}
    out: dict[str, StrategyConfig] = {}
    for values in itertools.product(*axes.values()):
        try:
            s = StrategyConfig(**dict(zip(axes, values)))
            s.validate_for("cuda", world)
        except StrategyError:
            continue
        out.setdefault(s.canonical_name, s)
    return list(out.values())


def plan(args: dict) -> list[dict]:
    cfg = get_config(args["model"], pad_vocab_to=args["pad_vocab_to"])
    seq = args["seq_len"] or cfg.block_size
    if seq > cfg.block_size:
        raise ValueError(f"seq_len={seq} exceeds {cfg.name}'s context block_size={cfg.block_size}")
    groups = param_groups(cfg)
    rows = []
    for s in combinations(args["world_size"]):
        mem = predict_memory(cfg, s, args["world_size"], args["micro_batch"], seq, groups)
        comm = predict_comm(cfg, s, args["world_size"], args["grad_accum"], groups)
        rows.append({"strategy": s.canonical_name, "model": cfg.name, "world_size": args["world_size"],
                     "micro_batch": args["micro_batch"], "seq_len": seq, "pred_mem_bytes": mem,
                     "fits": mem["total"] <= args["device_memory_gib"] * GIB, "pred_comm_bytes_per_step": comm})
    return rows


def render(rows: list[dict], device_gib: float) -> str:
    """The plan as a text table (pandas): GiB per predicted part per rank, total, fits, comm GB per step."""
    import pandas as pd

    first = ["params", "grads", "optimizer", "autocast_weights", "fsdp_unsharded", "activations", "head"]
    parts = list(dict.fromkeys(first + [k for r in rows for k in r["pred_mem_bytes"] if k != "total"]))
    table = pd.DataFrame([{"strategy": r["strategy"], **{p: r["pred_mem_bytes"].get(p, 0) / GIB for p in parts},
                           "total GiB": r["pred_mem_bytes"]["total"] / GIB, "fits": "yes" if r["fits"] else "NO",
                           "comm GB/step": r["pred_comm_bytes_per_step"]["total"] / 1e9} for r in rows])
    r0, width = rows[0], max(len(r["strategy"]) for r in rows)
    text = table.to_string(index=False, float_format=lambda v: f"{v:.2f}",
                           formatters={"strategy": lambda v: f"{v:<{width}}"})
    return (text + f"\n\n{r0['model']}, world size {r0['world_size']}, micro-batch {r0['micro_batch']}, "
            f"seq {r0['seq_len']}; "
            f"per-rank GiB against {device_gib:g} GiB; comm = full-tensor bytes per step per rank "
            "(bench/plan/costmodel.py and each strategy's terms in strategies/*.py).")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        args = parse(argv)
        rows = plan(args)
    except ValueError as exc:
        print(f"plan: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=1) if args["format"] == "json" else render(rows, args["device_memory_gib"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
