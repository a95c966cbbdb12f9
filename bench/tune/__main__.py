"""Check the step-time model where it matters: run the planner's k fastest predictions, compare with measured.

    python -m bench.tune model=mini world_size=2 top=3
    python -m bench.tune model=gpt2-small world_size=8 top=5 steps=20 device_memory_gib=80

1. This machine's rates: the matmul peak (bench/measure/peak_flops.py), the elementwise memory bandwidth and
   the process group's all-reduce bus bandwidth (``torchrun -m bench.measure.bandwidth``; cached), and the
   model's own parts at the runs' shape (``torchrun -m bench.measure.parts``: measured now and cached; every
   run, started with ``probe_parts=true``, predicts from this measurement).
2. The planner's strategies (bench/plan/__main__.py ``combinations``; on a CPU fp32 ones without compile,
   which the probes describe) that fit ``device_memory_gib``, ranked by predicted tokens/s
   (bench/plan/steptime.py; overlap as this host allows it).
3. The top ``top`` run through the harness (``torchrun bench/run.py``, rows in ``results_dir``); each row
   carries its own prediction (from the rates it measured) and the measured components (the profiled
   steps: bench/measure/overlap.py).
4. The report (stdout and ``<results_dir>/tune.md``): per run, predicted and measured step time and the
   signed error (predicted - measured) / measured of the step and of each component -- compute (matmul
   time), memory-bound (compute time outside matmuls), exposed communication -- and whether the predicted
   order of the runs is the measured one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.launch.suite import ROOT, launcher
from bench.plan.__main__ import PlanArgs, combinations, model_config
from bench.plan.costmodel import predict_memory
from bench.plan.steptime import Rates, can_overlap, predict_step
from models.config import PRESETS
from reports.cli import UsageError, fail, opt, parse
from strategies.config import StrategyConfig

GIB = 2**30


@dataclass
class TuneArgs:
    model: str = opt(help="a model preset: " + ", ".join(PRESETS))
    world_size: int = opt(2, "ranks on this host (torchrun --nproc_per_node)")
    top: int = opt(3, "how many of the fastest predictions to run")
    micro_batch: int = opt(4, "sequences per micro-batch per rank")
    seq_len: int = opt(0, "tokens per sequence (0 = the model's context)")
    steps: int = opt(10, "timed steps per run")
    warmup: int = opt(3, "untimed steps first")
    device_memory_gib: float = opt(0.0, "memory per rank; 0 = a GPU's memory, or the host's RAM / world_size")
    results_dir: str = opt("results/tune", "where the runs' rows and tune.md go")

    def __post_init__(self) -> None:
        if self.model not in PRESETS:
            raise UsageError(f"model={self.model!r} is not a preset; valid: {', '.join(PRESETS)}")
        for key in ("world_size", "top", "micro_batch", "steps"):
            if getattr(self, key) < 1:
                raise UsageError(f"{key}={getattr(self, key)} is invalid; must be >= 1")


def strategy_overrides(s: StrategyConfig) -> list[str]:
    """``strategy.<field>=<value>`` for every field that differs from the defaults (on top of strategy=single)."""
    default = StrategyConfig()
    out = []
    for f in dataclasses.fields(s):
        value = getattr(s, f.name)
        if value != getattr(default, f.name):
            out.append(f"strategy.{f.name}={str(value).lower() if isinstance(value, bool) else value}")
    return out


def measure_rates(world: int, device_type: str) -> tuple[Rates, dict]:
    """This host's rates (probes, cached), measured in a torchrun group of ``world`` ranks like the runs'."""
    from bench.measure.peak_flops import get_peak_flops

    contended = not can_overlap(device_type, world, 1, len(os.sched_getaffinity(0)))  # as the runs will probe
    out = subprocess.run([*launcher(world), "-m", "bench.measure.bandwidth"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                      "N00BGPT_CONTENDED": "1" if contended else "0"})
    if out.returncode:
        raise RuntimeError(f"bandwidth probe failed: {out.stderr.strip().splitlines()[-1:]}")
    bw = json.loads(out.stdout.strip().splitlines()[-1])
    torch.set_num_threads(1 if device_type == "cpu" and world > 1 else torch.get_num_threads())
    dtype = "fp32" if device_type == "cpu" else "bf16"
    peak, source, _ = get_peak_flops(torch.device(device_type), dtype)
    rates = Rates(peak, bw["mem_bw"], bw["link_bw"], link_bw_by_kind=bw["link_bw_by_kind"])
    return rates, {"peak_source": source, **bw}


def measure_parts(args: TuneArgs, seq: int):
    """The model's parts at the runs' shape on ``world_size`` ranks, measured now and cached, so that every run
    (``probe_parts=true``) predicts from this one measurement (bench/measure/parts.py)."""
    from bench.measure.parts import Parts

    out = subprocess.run([*launcher(args.world_size), "-m", "bench.measure.parts", f"model={args.model}",
                          f"micro_batch={args.micro_batch}", f"seq_len={seq}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        raise RuntimeError(f"parts probe failed: {out.stderr.strip().splitlines()[-1:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    got.pop("source")
    return Parts(**got)


def ranked(args: TuneArgs, rates: Rates, device_type: str, memory_gib: float) -> list[dict]:
    """The planner's candidates that fit, fastest predicted first."""
    cfg = model_config(PlanArgs(model=args.model, world_size=args.world_size), [])
    seq = args.seq_len or cfg.block_size
    overlap = can_overlap(device_type, args.world_size, 1, len(os.sched_getaffinity(0)))  # torchrun: 1 thread
    rows = []
    for s in combinations(args.world_size, cfg, args.micro_batch, seq):
        if device_type == "cpu" and (s.amp != "fp32" or s.compile):
            continue  # the CPU probes are fp32 eager: bf16 runs ~250x slower there, compile is not modelled
        mem = predict_memory(cfg, s, args.world_size, args.micro_batch, seq)["total"]
        if mem > memory_gib * GIB:
            continue
        t = predict_step(cfg, s, args.world_size, args.micro_batch, seq, 1, rates, overlap)
        rows.append({"strategy": s.canonical_name, "config": s, "pred_tokens_per_sec": t["tokens_per_sec"],
                     "pred_step_s": t["step_s"]})
    return sorted(rows, key=lambda r: -r["pred_tokens_per_sec"])


def _median(values) -> float:
    """The median of the values that are not None (nan for none)."""
    v = sorted(x for x in values if x is not None)
    if not v:
        return float("nan")
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def _err(pred, meas) -> float | None:
    if pred is None or meas is None or not meas or meas != meas:
        return None
    return (pred - meas) / meas


def errors(row: dict) -> dict:
    """Signed relative errors (predicted - measured) / measured of one row: step and components."""
    b = row.get("pred_step_breakdown") or {}
    matmul, compute = row.get("matmul_time_s"), row.get("compute_time_s")
    return {"step": _err(row.get("pred_step_time_s"), row.get("step_time_median_s")),
            "compute": _err(b.get("compute_s"), matmul),
            "memory": _err(b.get("memory_s"), None if matmul is None or compute is None else compute - matmul),
            "exposed_comm": _err(b.get("exposed_comm_s"), row.get("exposed_comm_s"))}


def report(rows: list[dict]) -> str:
    """The predicted-vs-measured table (markdown) and the order check."""
    import pandas as pd

    def pct(v):
        return "–" if v is None else f"{v:+.1%}"

    table = []
    for r in rows:
        e = errors(r)
        table.append({"strategy": r["strategy"], "pred step (ms)": f"{r['pred_step_time_s'] * 1e3:.1f}",
                      "measured step (ms)": f"{r['step_time_median_s'] * 1e3:.1f}", "step error": pct(e["step"]),
                      "compute error": pct(e["compute"]), "memory-bound error": pct(e["memory"]),
                      "exposed comm error": pct(e["exposed_comm"])})
    pred_order = [r["strategy"] for r in sorted(rows, key=lambda r: -r["pred_tokens_per_sec"])]
    meas_order = [r["strategy"] for r in sorted(rows, key=lambda r: -r["tokens_per_sec"])]
    median = _median([abs(errors(r)["step"]) for r in rows if errors(r)["step"] is not None])
    return (pd.DataFrame(table).to_markdown(index=False)
            + f"\n\nmedian |step error|: {median:.1%}; predicted order: {', '.join(pred_order)}; measured order: "
            + f"{', '.join(meas_order)} ({'agrees' if pred_order == meas_order else 'differs'})\n")


def main(argv: list[str] | None = None) -> int:
    args = parse(TuneArgs, argv, "python -m bench.tune", __doc__)
    from reports.load import load

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    memory_gib = args.device_memory_gib or (torch.cuda.get_device_properties(0).total_memory / GIB
                                            if device_type == "cuda"
                                            else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
                                            / args.world_size)
    try:
        rates, sources = measure_rates(args.world_size, device_type)
        seq = args.seq_len or model_config(PlanArgs(model=args.model, world_size=args.world_size), []).block_size
        rates.parts = measure_parts(args, seq)
        candidates = ranked(args, rates, device_type, memory_gib)
    except (RuntimeError, ValueError) as exc:
        fail("python -m bench.tune", str(exc))
    if not candidates:
        fail("python -m bench.tune", f"no strategy for {args.model} fits {memory_gib:.1f} GiB per rank")
    print(f"[tune] rates: {rates.matmul_flops / 1e9:.1f} GFLOP/s matmul ({sources['peak_source']}), "
          f"{rates.mem_bw / 1e9:.1f} GB/s memory, "
          + (f"{rates.link_bw / 1e9:.2f} GB/s link (all-reduce); by collective "
             + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in rates.link_bw_by_kind.items())
             + f" GB/s ({sources['link_by_kind_source']})" if rates.link_bw else "one rank"), flush=True)
    chosen = candidates[:args.top]
    results = Path(args.results_dir)
    tag = f"tune:{os.getpid()}"
    for i, c in enumerate(chosen):
        print(f"[tune] {i + 1}/{len(chosen)}: {c['strategy']} (predicted {c['pred_tokens_per_sec']:,.0f} tokens/s)",
              flush=True)
        cmd = [*launcher(args.world_size), str(ROOT / "bench" / "run.py"), f"model={args.model}", "strategy=single",
               *strategy_overrides(c["config"]), f"micro_batch={args.micro_batch}", f"seq_len={args.seq_len}",
               f"steps={args.steps}", f"warmup={args.warmup}", f"results_dir={results}", f"tag={tag}",
               "probe_parts=true"]
        subprocess.run(cmd, cwd=ROOT, check=False, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    df = load(results)
    rows = [r for r in df[(df.tag == tag) & (df.status == "ok")].to_dict("records")
            if not (isinstance(r.get("pred_step_time_s"), float) and math.isnan(r["pred_step_time_s"]))]
    if not rows:
        fail("python -m bench.tune", f"no ok run in {results} (see the runs' errors there)")
    text = report(rows)
    (results / "tune.md").write_text(f"# python -m bench.tune {' '.join(argv or sys.argv[1:])}\n\n{text}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def budget_row(name: str, rows: list[dict]) -> dict:
    """One line of README's error budget: the median and largest |step error| over ``rows``, the median
    signed error of each component, and whether the top 3 by prediction are the top 3 measured, in order."""
    errs = [errors(r) for r in rows]
    median = _median

    def pct(v):
        return f"{v:+.1%}"

    steps = [abs(e["step"]) for e in errs]
    pred = [r["strategy"] for r in sorted(rows, key=lambda r: -r["pred_tokens_per_sec"])][:3]
    meas = [r["strategy"] for r in sorted(rows, key=lambda r: -r["tokens_per_sec"])][:3]
    return {"rows": name, "runs": len(rows), "median abs step error": f"{median(steps):.1%}",
            "max abs step error": f"{max(steps):.1%}",
            **{f"median {k} error": pct(median(e[k] for e in errs)) for k in ("compute", "memory", "exposed_comm")},
            "top 3 order": "agrees" if pred == meas else f"differs (predicted {', '.join(pred)}; measured "
                                                           f"{', '.join(meas)})"}


def budget_table(sets: dict[str, list[dict]]) -> str:
    import pandas as pd

    return pd.DataFrame([budget_row(name, rows) for name, rows in sets.items()]).to_markdown(index=False)
