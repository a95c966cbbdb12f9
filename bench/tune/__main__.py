"""Check the step-time model where it matters: run the planner's k fastest predictions, compare with measured.

    python -m bench.tune model=mini world_size=2 top=3
    python -m bench.tune model=gpt2-small world_size=8 top=5 steps=20 device_memory_gib=80
    python -m bench.tune model=mini world_size=2 top=30 model.pad_vocab_to=64 model.tie_embeddings=false  # + tp, pp
    python -m bench.tune model=mini world_size=2 top=16 match=tp2 model.pad_vocab_to=64 model.tie_embeddings=false
    python -m bench.tune model=mini world_size=2 top=16 match=tp2 repeats=2 ...     # each run twice, ABBA, pooled

1. This machine's rates: the matmul peak (bench/measure/peak_flops.py), the elementwise memory bandwidth and
   the process group's bus bandwidths (``torchrun -m bench.measure.bandwidth``: measured now and cached), and the
   model's own parts at the runs' shape (``torchrun -m bench.tune.parts``: measured now and cached; every
   run, started with ``probe_parts=true``, predicts from this measurement), split as each candidate's tensor
   parallelism splits them. While a probe reports other work on the host, all are measured again after a
   pause, up to ``probe_tries`` times (``quiet_probes``); tune.md opens with the rates and any contention left.
2. The planner's strategies (bench/plan/__main__.py ``combinations``) that fit ``device_memory_gib`` and that
   the step model describes (eager: compile's fusions are not modelled; on a CPU fp32 only), ranked by
   predicted tokens/s (bench/plan/steptime.py, each with the parts of its compute dtype -- fp32, tf32, bf16 --
   and of the micro-batch they run at -- a pipeline micro-batch under pp -- measured once per pair; overlap as
   this host allows it).
3. The top ``top`` run through the harness (``torchrun bench/run.py``, rows in ``results_dir``); each row
   carries its own prediction (from the rates it measured) and the measured components (the profiled
   steps: bench/measure/overlap.py).
   With ``repeats=N`` every chosen strategy runs N times, in rounds that alternate the order (ABBA), and
   its runs' timed steps are pooled (bench/tune/budget.py ``combine_repeats``).
4. The report (stdout and ``<results_dir>/tune.md``): per strategy, its runs, predicted and measured step time
   with the measured p10-p90 and the host's steal (the most of any of its runs), the signed error (predicted -
   measured) / measured of the step and of each component -- compute (matmul time), memory-bound (compute time
   outside matmuls), exposed communication -- and whether the predicted order of the runs is the measured one,
   or agrees with it up to runs the measurement cannot order (``order_verdict``).
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

from bench.gate.paired import median, round_order
from bench.harness.precheck import precheck
from bench.launch.suite import ROOT, launcher
from bench.plan.__main__ import PlanArgs, combinations, model_config
from bench.plan.costmodel import predict_memory
from bench.plan.steptime import Rates, can_overlap, predict_step
from bench.shape import ShapeArgs
from bench.tune.budget import combine_repeats, errors, order_verdict
from models.cli import UsageError, fail, opt, parse
from strategies.config import StrategyConfig
from strategies.pp import pipeline_micro_batch

GIB = 2**30


@dataclass
class TuneArgs(ShapeArgs):
    """The shape (bench/shape.py; world_size: ranks on this host, torchrun --nproc_per_node) and the tuner's own
    options."""

    top: int = opt(3, "how many of the fastest predictions to run")
    steps: int = opt(10, "timed steps per run")
    warmup: int = opt(3, "untimed steps first")
    device_memory_gib: float = opt(0.0, "memory per rank; 0 = a GPU's memory, or the host's RAM / world_size")
    results_dir: str = opt("results/tune", "where the runs' rows and tune.md go")
    match: str = opt("", "only the candidates whose name contains this (e.g. tp2: the tensor-parallel family)")
    probe_tries: int = opt(3, "times to measure the rates and parts before the runs while a probe reports other "
                              "work on the host (then probed again after a pause; the last try is used, and "
                              "tune.md says it was contended)")
    repeats: int = opt(1, "runs of each chosen strategy, in rounds that alternate the order (ABBA: a drifting "
                          "neighbour meets every strategy early and late); their timed steps are pooled")
    model_overrides: list[str] = opt([], "model fields, given as model.<field>=value like bench/run.py's (e.g. "
                                         "model.pad_vocab_to=64 for tp, model.tie_embeddings=false for pp)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("top", "steps", "repeats", "probe_tries"):
            if getattr(self, key) < 1:
                raise UsageError(f"{key}={getattr(self, key)} is invalid; must be >= 1")
        # the form --help shows (model.<field>=value, as bench/run.py takes it), or the bare field
        self.model_overrides = [o.removeprefix("model.") for o in self.model_overrides]


def tuned_model(args: TuneArgs):
    """The preset with the ``model.<field>=`` overrides (validated as the planner validates them)."""
    return model_config(PlanArgs(model=args.model, world_size=args.world_size), args.model_overrides,
                        "python -m bench.tune")


def model_args(args: TuneArgs) -> list[str]:
    """The model's arguments for bench/run.py and bench.tune.parts."""
    return [f"model={args.model}", *(f"model.{o}" for o in args.model_overrides)]


def run_args(args: TuneArgs, s: StrategyConfig, tag: str) -> list[str]:
    """bench/run.py's arguments for one run of strategy ``s``."""
    return [*model_args(args), "strategy=single", *strategy_overrides(s), f"micro_batch={args.micro_batch}",
            f"seq_len={args.seq_len}", f"grad_accum={args.grad_accum}", f"steps={args.steps}",
            f"warmup={args.warmup}", f"results_dir={args.results_dir}", f"tag={tag}", "probe_parts=true"]


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
    """This host's rates, measured in a torchrun group of ``world`` ranks like the runs': the bandwidths now
    (cached for the sweep's runs), the matmul peak as cached when its probe was clean."""
    from bench.measure.peak_flops import get_peak_flops

    contended = not can_overlap(device_type, world, 1, len(os.sched_getaffinity(0)))  # as the runs will probe
    out = subprocess.run([*launcher(world), "-m", "bench.measure.bandwidth"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                      "N00BGPT_CONTENDED": "1" if contended else "0",
                                                      "N00BGPT_FRESH_PROBES": "1"})
    if out.returncode:
        raise RuntimeError(f"bandwidth probe failed: {out.stderr.strip().splitlines()[-1:]}")
    bw = json.loads(out.stdout.strip().splitlines()[-1])
    torch.set_num_threads(1 if device_type == "cpu" and world > 1 else torch.get_num_threads())
    dtype = "fp32" if device_type == "cpu" else "bf16"
    peak, source, _ = get_peak_flops(torch.device(device_type), dtype)
    rates = Rates(peak, bw["mem_bw"], bw["link_bw"], link_bw_by_kind=bw["link_bw_by_kind"])
    return rates, {"peak_source": source, **bw}


def measure_parts(args: TuneArgs, seq: int, dtype: str, micro_batch: int, tp: int = 1, sp: bool = False):
    """The model's parts at ``micro_batch`` x ``seq`` on ``world_size`` ranks with matmuls in ``dtype``, split over
    ``tp`` ranks (``sp``), measured now and cached, so that every run (``probe_parts=true``) of that parts key
    predicts from this one measurement (bench/tune/parts.py)."""
    from bench.measure.parts import Parts

    split = [f"tp={tp}", f"sp={str(sp).lower()}"]
    out = subprocess.run([*launcher(args.world_size), "-m", "bench.tune.parts", *model_args(args),
                          f"micro_batch={micro_batch}", f"seq_len={seq}", f"dtype={dtype}", *split], cwd=ROOT,
                         capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        raise RuntimeError(f"parts probe ({dtype}) failed: {out.stderr.strip().splitlines()[-1:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    source = got.pop("source")
    return Parts(**got), source


PROBE_PAUSE_S = 30.0  # between tries of the probes while other work shares the host


def quiet_probes(args: TuneArgs, seq: int, device_type: str, keys: list) -> tuple[Rates, dict, dict, list[str]]:
    """(rates, their sources, parts per key, what was still contended) measured up to ``args.probe_tries`` times:
    a probe that ran beside other work -- a matmul peak whose trials spread or starved, a bandwidth or parts
    probe while other processes or guests took more than a fifth of the host (bench/measure/contention.py) --
    says "not cached" in its source, and every run of the sweep would inherit its bias (one sweep here
    predicted its tp2 family 22-30 % slow from parts timed at such a moment), so all are measured again after
    ``PROBE_PAUSE_S``; the last try stands. A value the last try still measured beside other work was not
    cached, so the runs measure it again themselves (``probe_parts=true``: after their timed window) and each
    predicts from its own moment's parts."""
    import time

    for attempt in range(1, args.probe_tries + 1):
        rates, sources = measure_rates(args.world_size, device_type)
        measured = {k: measure_parts(args, seq, *k) for k in keys}
        parts = {k: p for k, (p, _) in measured.items()}
        named = {"matmul peak": sources["peak_source"], "memory bandwidth": sources.get("mem_source"),
                 "all-reduce": sources.get("link_source"), "collectives": sources.get("link_by_kind_source"),
                 **{f"parts {k}": s for k, (_, s) in measured.items()}}
        noisy = [f"{name}: {src}" for name, src in named.items() if src and "not cached" in src]
        if not noisy or attempt == args.probe_tries:
            return rates, sources, parts, noisy
        print(f"[tune] try {attempt}: probes shared the host ({'; '.join(noisy)}); again in {PROBE_PAUSE_S:.0f} s",
              flush=True)
        time.sleep(PROBE_PAUSE_S)
    raise AssertionError("unreachable")


def candidates(args: TuneArgs, device_type: str, memory_gib: float) -> tuple[list[StrategyConfig], str]:
    """The planner's strategies (bench/plan/__main__.py ``combinations``) that fit ``memory_gib`` per rank and that
    the step model describes, and a line saying what was left out: compile (its fusions are not modelled: the
    parts are timed eager) and, on a CPU, 16-bit ones (~250x slower than fp32 without native bf16)."""
    cfg = tuned_model(args)
    seq = args.seq_len or cfg.block_size
    out, compiled, half, too_big = [], 0, 0, 0
    for s in combinations(args.world_size, cfg, args.micro_batch, seq):
        if s.compile:
            compiled += 1
        elif device_type == "cpu" and s.amp != "fp32":
            half += 1
        elif predict_memory(cfg, s, args.world_size, args.micro_batch, seq)["total"] > memory_gib * GIB:
            too_big += 1
        else:
            out.append(s)
    note = (f"{len(out)} candidates; left out: {compiled} with compile (not modelled), "
            + (f"{half} 16-bit on a CPU, " if device_type == "cpu" else "") + f"{too_big} over {memory_gib:.1f} GiB")
    return out, note


def parts_key(s: StrategyConfig, device_type: str, micro_batch: int) -> tuple[str, int, int, bool]:
    """Which parts measurement predicts ``s``: its compute dtype, the micro-batch its parts run at and its
    tensor-parallel split (tp, sp)."""
    return s.compute_dtype_name(device_type), pipeline_micro_batch(s, micro_batch), s.tp, s.sp and s.tp > 1


def ranked(args: TuneArgs, rates: Rates, device_type: str, strategies: list[StrategyConfig],
           parts: dict | None = None) -> list[dict]:
    """``strategies`` fastest predicted first, each predicted from ``rates`` with the parts of its compute dtype
    and parts micro-batch (``parts``: {``parts_key``: Parts}; none: the generic rates)."""
    cfg = tuned_model(args)
    seq = args.seq_len or cfg.block_size
    overlap = can_overlap(device_type, args.world_size, 1, len(os.sched_getaffinity(0)))  # torchrun: 1 thread
    rows = []
    for s in strategies:
        r = dataclasses.replace(rates, parts=(parts or {}).get(parts_key(s, device_type, args.micro_batch)))
        t = predict_step(cfg, s, args.world_size, args.micro_batch, seq, args.grad_accum, r, overlap)
        rows.append({"strategy": s.canonical_name, "config": s, "pred_tokens_per_sec": t["tokens_per_sec"],
                     "pred_step_s": t["step_s"]})
    return sorted(rows, key=lambda r: -r["pred_tokens_per_sec"])


def run_order(chosen: list, repeats: int) -> list:
    """The runs of a sweep: ``repeats`` rounds of ``chosen`` in the A/B engine's order (bench/gate/paired.py
    ``round_order``: every other round reversed, A B C, C B A, A B C...), so that a neighbour's load drifting over
    the sweep meets each strategy both early and late."""
    return [c for k in range(repeats) for c in round_order(chosen, k)]


def report(rows: list[dict]) -> str:
    """The predicted-vs-measured table (markdown) and the order check."""
    import pandas as pd

    def pct(v):
        return "–" if v is None else f"{v:+.1%}"

    table = []
    for r in rows:
        e = errors(r)
        steal = r.get("steal_pct")
        table.append({"strategy": r["strategy"], "runs": r.get("repeats", 1),
                      "pred step (ms)": f"{r['pred_step_time_s'] * 1e3:.1f}",
                      "measured step (ms)": f"{r['step_time_median_s'] * 1e3:.1f}",
                      "p10-p90 (ms)": f"{r['step_time_p10_s'] * 1e3:.0f}-{r['step_time_p90_s'] * 1e3:.0f}",
                      "steal": "–" if steal is None or steal != steal else f"{steal:.1f}%",
                      "step error": pct(e["step"]),
                      "compute error": pct(e["compute"]), "memory-bound error": pct(e["memory"]),
                      "exposed comm error": pct(e["exposed_comm"])})
    pred_order = [r["strategy"] for r in sorted(rows, key=lambda r: -r["pred_tokens_per_sec"])]
    meas_order = [r["strategy"] for r in sorted(rows, key=lambda r: -r["tokens_per_sec"])]
    median_err = median([abs(errors(r)["step"]) for r in rows if errors(r)["step"] is not None])
    return (pd.DataFrame(table).to_markdown(index=False)
            + f"\n\nmedian |step error|: {median_err:.1%}; predicted order: {', '.join(pred_order)}; measured order: "
            + f"{', '.join(meas_order)}: {order_verdict(rows, len(rows)).split(' (predicted')[0]}\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    model_overrides = [a.removeprefix("model.") for a in argv if a.startswith("model.")]
    args = parse(TuneArgs, [a for a in argv if not a.startswith("model.")], "python -m bench.tune", __doc__)
    args.model_overrides += model_overrides
    from reports.load import load

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    memory_gib = args.device_memory_gib or (torch.cuda.get_device_properties(0).total_memory / GIB
                                            if device_type == "cuda"
                                            else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
                                            / args.world_size)
    try:
        fits, note = candidates(args, device_type, memory_gib)
        if args.match:
            fits = [s for s in fits if args.match in s.canonical_name]
            note += f"; {len(fits)} named *{args.match}*"
        if not fits:
            fail("python -m bench.tune", f"no strategy for {args.model} fits {memory_gib:.1f} GiB per rank ({note})")
        problem = precheck(run_args(args, fits[0], "tune:check"))  # the runs' own check, before any probe
        if problem:
            fail("python -m bench.tune", problem)
        print(f"[tune] {note}", flush=True)
        seq = args.seq_len or tuned_model(args).block_size
        keys = sorted({parts_key(s, device_type, args.micro_batch) for s in fits})
        rates, sources, parts, noisy = quiet_probes(args, seq, device_type, keys)
        chosen = ranked(args, rates, device_type, fits, parts)[:args.top]
    except (RuntimeError, ValueError) as exc:
        fail("python -m bench.tune", str(exc))
    rates_line = (f"rates: {rates.matmul_flops / 1e9:.1f} GFLOP/s matmul ({sources['peak_source']}), "
                  f"{rates.mem_bw / 1e9:.1f} GB/s memory, "
                  + (f"{rates.link_bw / 1e9:.2f} GB/s link (all-reduce); by collective "
                     + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in rates.link_bw_by_kind.items())
                     + f" GB/s ({sources['link_by_kind_source']})" if rates.link_bw else "one rank"))
    if noisy:
        rates_line += (f"\n\n**Probed beside other work** after {args.probe_tries} tries: {'; '.join(noisy)}: "
                       "every prediction below inherits it.")
    print(f"[tune] {rates_line}", flush=True)
    results = Path(args.results_dir)
    tag = f"tune:{os.getpid()}"
    plan = run_order(chosen, args.repeats)
    for i, c in enumerate(plan):
        print(f"[tune] {i + 1}/{len(plan)}: {c['strategy']} (predicted {c['pred_tokens_per_sec']:,.0f} tokens/s)",
              flush=True)
        cmd = [*launcher(args.world_size), str(ROOT / "bench" / "run.py"), *run_args(args, c["config"], tag)]
        subprocess.run(cmd, cwd=ROOT, check=False, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    df = load(results)
    ok = df[(df.tag == tag) & (df.status == "ok")].to_dict("records")
    rows = combine_repeats([r for r in ok if not (isinstance(r.get("pred_step_time_s"), float)
                                                  and math.isnan(r["pred_step_time_s"]))], results)
    if not rows:
        fail("python -m bench.tune", f"no ok run in {results} (see the runs' errors there)")
    text = report(rows)
    (results / "tune.md").write_text(f"# python -m bench.tune {' '.join(argv)}\n\n{rates_line}\n\n{text}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
