"""A/B two variants of one training setup on this machine: which is faster, and which needs less memory.

    python -m bench.launch.ab model=mini a=model.loss_chunk=0 b=model.loss_chunk=1024
    python -m bench.launch.ab model=mini "common=[model.n_layer=4]" micro_batch=8 seq_len=256 \\
        "a=[model.loss_chunk=0]" "b=[model.loss_chunk=1024]" rounds=6

Speed: both variants train in this one process (``bench.harness.loop.train``, one rank, as ``bench/run.py``
runs it), in ``rounds`` rounds of A B, B A, ... (the A/B engine, bench/gate/paired.py), so drift and a busy
neighbour hit both; the score is the median over every round's step k of A / step k of B (> 1: B is faster),
with the range of the rounds' median ratios. The two variants' losses are compared too (the same seed and data:
a variant that changes the numbers says so).
Memory: each variant once more in its own process (``bench/run.py``, a few steps, glibc's mmap threshold
fixed so RSS tracks live bytes), so neither inherits the other's allocator state: peak memory and its
growth over the process's baseline (``peak_mem_bytes -
mem_baseline_bytes``: what the training step itself adds; on a CPU the interpreter and libraries are the
baseline). Two git revisions are A/B'd by the CI gate instead (bench/gate/ab.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from bench.gate.paired import alternate, median, paired_ratios, summarize  # noqa: E402
from bench.harness.config import ConfigError, RunConfig, to_run_config  # noqa: E402
from bench.harness.dist import DistInfo  # noqa: E402
from bench.harness.loop import train  # noqa: E402
from bench.shape import ShapeArgs  # noqa: E402
from models import get_config  # noqa: E402
from models.cli import UsageError, opt, parse  # noqa: E402
from reports import load  # noqa: E402
from strategies import StrategyConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ABArgs(ShapeArgs):
    """The shape both variants share (bench/shape.py; one process: world_size 1) and the tool's own options."""

    common: list[str] = opt([], "overrides for both (bench/run.py's keys: model.n_layer=4, strategy.ac=full, ...)")
    a: list[str] = opt([], "overrides of variant A (the reference)")
    b: list[str] = opt([], "overrides of variant B (the candidate)")
    steps: int = opt(10, "timed steps per round and variant")
    warmup: int = opt(3, "untimed steps first, per round and variant")
    rounds: int = opt(6, "alternated rounds (A then B)")
    threads: int = opt(0, "torch threads (0 = torch's default)")
    memory: bool = opt(True, "also measure each variant's peak memory in its own process")

    def __post_init__(self):
        super().__post_init__()
        self.one_process("python -m bench.launch.ab")
        if self.rounds < 1 or self.steps < 1:
            raise UsageError(f"rounds={self.rounds}, steps={self.steps}: both must be >= 1")


def run_config(args: ABArgs, overrides: list[str]) -> RunConfig:
    """The variant's RunConfig: the model preset, then ``common``, then its own overrides."""
    base = OmegaConf.structured(RunConfig(model=get_config(args.model), strategy=StrategyConfig(), steps=args.steps,
                                          warmup=args.warmup, micro_batch=args.micro_batch, seq_len=args.seq_len,
                                          grad_accum=args.grad_accum, measure_comm=False, log_every=0))
    try:
        return to_run_config(OmegaConf.merge(base, OmegaConf.from_dotlist([*args.common, *overrides])))
    except Exception as exc:  # an unknown key or a bad value: one line, exit 2
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"overrides {' '.join([*args.common, *overrides])}: {first}") from exc


def speed(args: ABArgs) -> dict:
    """Alternated rounds in this process (the A/B engine, bench/gate/paired.py: A B, B A, ...): each round's
    step k of A over step k of B, pooled over rounds; the per-round medians; the largest loss difference."""
    cfgs = {"A": run_config(args, args.a), "B": run_config(args, args.b)}
    info = DistInfo(0, 0, 1, 1, torch.device("cpu"), None)

    def one(k: str, rnd: int):
        out = train(cfgs[k], info)
        print(f"round {rnd} {k}: {median(out.step_times_s) * 1e3:.1f} ms", flush=True)
        return out

    runs = alternate(("A", "B"), args.rounds, one)
    ratios = summarize([r for a, b in zip(runs["A"], runs["B"]) for r in paired_ratios(a.step_times_s,
                                                                                        b.step_times_s)])
    per_round = [median(a.step_times_s) / median(b.step_times_s) for a, b in zip(runs["A"], runs["B"])]
    max_dloss = max(abs(x - y) for x, y in zip(runs["A"][-1].losses, runs["B"][-1].losses))
    return {"A_ms": median(median(r.step_times_s) for r in runs["A"]) * 1e3,
            "B_ms": median(median(r.step_times_s) for r in runs["B"]) * 1e3,
            "ratio": ratios.median, "steps": ratios.n, "lo": min(per_round), "hi": max(per_round),
            "max_loss_diff": max_dloss}


def memory(args: ABArgs, overrides: list[str]) -> dict:
    """One short run of the variant in its own process (bench/run.py): its row's peak and baseline."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "bench" / "run.py"), f"model={args.model}", *args.common, *overrides,
               f"micro_batch={args.micro_batch}", f"seq_len={args.seq_len}", f"grad_accum={args.grad_accum}",
               "steps=3", "warmup=1",
               "log_every=0", "device=cpu", f"results_dir={tmp}"]
        # a fixed mmap threshold: glibc returns large freed buffers at once, so RSS tracks live bytes instead of
        # keeping freed heap (+3-16 % measured; docs/metrics.md "Measuring on a CPU")
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()[-400:]}")
        row = load(tmp).iloc[0]
    return {"peak": float(row.peak_mem_bytes), "growth": float(row.peak_mem_bytes - row.mem_baseline_bytes)}


def main(argv=None) -> int:
    args = parse(ABArgs, argv, "python -m bench.launch.ab", __doc__)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        seq = run_config(args, args.a).seq_len
        run_config(args, args.b)  # both valid before anything runs
    except (UsageError, ConfigError) as exc:
        print(f"ab: {exc}", file=sys.stderr)
        return 2
    print(f"A: {' '.join(args.common + args.a) or '(preset)'}\nB: {' '.join(args.common + args.b) or '(preset)'}\n"
          f"model {args.model}, micro-batch {args.micro_batch} x seq {seq}, {args.rounds} rounds x "
          f"{args.steps} steps, torch threads {torch.get_num_threads()}", flush=True)
    s = speed(args)
    print(f"step time: A {s['A_ms']:.1f} ms, B {s['B_ms']:.1f} ms; speed-up A/B: median of {s['steps']} paired "
          f"steps {s['ratio']:.3f} (rounds {s['lo']:.3f}-{s['hi']:.3f}); largest loss difference "
          f"{s['max_loss_diff']:.2e}")
    if args.memory:
        ma, mb = memory(args, args.a), memory(args, args.b)
        gib = 2**30
        print(f"peak memory: A {ma['peak'] / gib:.2f} GiB, B {mb['peak'] / gib:.2f} GiB; growth over the process "
              f"baseline: A {ma['growth'] / gib:.2f} GiB, B {mb['growth'] / gib:.2f} GiB "
              f"({(mb['growth'] / ma['growth'] - 1) * 100:+.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
