"""Does the harness slow what it measures? Harness step time vs a bare hand-written loop.

    python -m bench.launch.overhead                       # mini, micro_batch 4, seq 256, 5 rounds
    python -m bench.launch.overhead model=tiny rounds=3

Both run in this one process, in rounds of A B, B A, ... (the A/B engine, bench/gate/paired.py: machine drift
hits both), on the same model,
batch and optimizer: the bare loop is the minimum a training step needs (forward, backward, AdamW
step, zero_grad) timed with perf_counter; the harness is ``bench.harness.loop.train`` as ``bench/run.py``
runs it (per-step timers, per-sequence seeded data, progress checks). Prints the median step time of
each round and the ratio harness/bare: the median over every round's step k of the harness / step k of the bare
loop, with the range of the rounds' median ratios. CPU only (single process).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from bench.gate.paired import alternate, median, paired_ratios, summarize  # noqa: E402
from bench.harness.config import RunConfig  # noqa: E402
from bench.harness.dist import DistInfo  # noqa: E402
from bench.harness.loop import train  # noqa: E402
from bench.shape import ShapeArgs  # noqa: E402
from models import build_model, get_config  # noqa: E402
from models.cli import UsageError, opt, parse  # noqa: E402
from strategies import StrategyConfig  # noqa: E402


def bare_loop(model_name: str, micro_batch: int, seq_len: int, grad_accum: int, steps: int,
              warmup: int) -> list[float]:
    """The minimum a training step needs, timed with perf_counter: ``grad_accum`` forward + backward, an AdamW
    step, zero_grad."""
    cfg = get_config(model_name)
    seq_len = seq_len or cfg.block_size
    model = build_model(cfg, "cpu")
    model.init_weights(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        for _ in range(grad_accum):
            seq = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1), generator=gen)
            loss = model(seq[:, :-1], seq[:, 1:]) / grad_accum
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def harness(model_name: str, micro_batch: int, seq_len: int, grad_accum: int, steps: int,
            warmup: int) -> list[float]:
    cfg = RunConfig(model=get_config(model_name), strategy=StrategyConfig(), steps=steps, warmup=warmup,
                    micro_batch=micro_batch, seq_len=seq_len, grad_accum=grad_accum)
    out = train(cfg, DistInfo(0, 0, 1, 1, torch.device("cpu"), None))
    return out.step_times_s


@dataclass
class OverheadArgs(ShapeArgs):
    """The shape (bench/shape.py; one process: world_size 1) and the tool's own options."""

    steps: int = opt(20, "timed steps per round and side")
    warmup: int = opt(5, "untimed steps first")
    rounds: int = opt(5, "alternated rounds (bare loop, harness)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.one_process("python -m bench.launch.overhead")
        if self.rounds < 1 or self.steps < 1 or self.warmup < 0:
            raise UsageError(f"rounds={self.rounds}, steps={self.steps}, warmup={self.warmup}: rounds and steps must "
                             "be >= 1, warmup >= 0")

def main(argv=None) -> None:
    args = parse(OverheadArgs, argv, "python -m bench.launch.overhead", __doc__)
    shape = (args.model, args.micro_batch, args.seq_len, args.grad_accum, args.steps, args.warmup)
    loops = {"bare": bare_loop, "harness": harness}

    def one(side: str, rnd: int) -> list[float]:
        times = loops[side](*shape)
        print(f"round {rnd} {side}: {median(times) * 1e3:.1f} ms", flush=True)
        return times

    runs = alternate(("bare", "harness"), args.rounds, one)
    paired = summarize([r for b, h in zip(runs["bare"], runs["harness"]) for r in paired_ratios(h, b)])
    per_round = [median(h) / median(b) for b, h in zip(runs["bare"], runs["harness"])]
    print(f"median step time: bare {median(median(t) for t in runs['bare']) * 1e3:.1f} ms, harness "
          f"{median(median(t) for t in runs['harness']) * 1e3:.1f} ms; harness/bare ratio: median of {paired.n} "
          f"paired steps {paired.median:.3f} (rounds {min(per_round):.3f}-{max(per_round):.3f}) over {args.rounds} "
          f"alternated rounds, torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
