"""Does the harness slow what it measures? Harness step time vs a bare hand-written loop.

    python -m bench.launch.overhead                       # mini, micro_batch 4, seq 256, 5 rounds
    python -m bench.launch.overhead model=tiny rounds=3

Both run in this one process, alternated A/B/A/B (so machine drift hits both), on the same model,
batch and optimizer: the bare loop is the minimum a training step needs (forward, backward, AdamW
step, zero_grad) timed with perf_counter; the harness is ``bench.harness.loop.train`` as ``bench/run.py``
runs it (per-step timers, per-sequence seeded data, progress checks). Prints the median step time of
each round and the overall ratio harness/bare. CPU only (single process).
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from bench.harness.config import RunConfig  # noqa: E402
from bench.harness.dist import DistInfo  # noqa: E402
from bench.harness.loop import train  # noqa: E402
from models import build_model, get_config  # noqa: E402
from models.cli import opt, parse  # noqa: E402
from strategies import StrategyConfig  # noqa: E402


def bare_loop(model_name: str, micro_batch: int, seq_len: int, steps: int, warmup: int) -> list[float]:
    cfg = get_config(model_name)
    model = build_model(cfg, "cpu")
    model.init_weights(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        seq = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1), generator=gen)
        loss = model(seq[:, :-1], seq[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def harness(model_name: str, micro_batch: int, seq_len: int, steps: int, warmup: int) -> list[float]:
    cfg = RunConfig(model=get_config(model_name), strategy=StrategyConfig(), steps=steps, warmup=warmup,
                    micro_batch=micro_batch, seq_len=seq_len)
    out = train(cfg, DistInfo(0, 0, 1, 1, torch.device("cpu"), None))
    return out.step_times_s


@dataclass
class OverheadArgs:
    model: str = opt("mini", "model preset")
    micro_batch: int = opt(4, "sequences per step")
    seq_len: int = opt(256, "tokens per sequence")
    steps: int = opt(20, "timed steps per round and side")
    warmup: int = opt(5, "untimed steps first")
    rounds: int = opt(5, "alternated rounds (bare loop, harness)")

def main(argv=None) -> None:
    args = parse(OverheadArgs, argv, "python -m bench.launch.overhead", __doc__)
    bare_med, harness_med = [], []
    for r in range(args.rounds):
        b = statistics.median(bare_loop(args.model, args.micro_batch, args.seq_len, args.steps, args.warmup))
        h = statistics.median(harness(args.model, args.micro_batch, args.seq_len, args.steps, args.warmup))
        bare_med.append(b)
        harness_med.append(h)
        print(f"round {r}: bare {b * 1e3:.1f} ms  harness {h * 1e3:.1f} ms  ratio {h / b:.3f}", flush=True)
    ratios = [h / b for h, b in zip(harness_med, bare_med)]
    print(f"median step time: bare {statistics.median(bare_med) * 1e3:.1f} ms, harness "
          f"{statistics.median(harness_med) * 1e3:.1f} ms; harness/bare ratio median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}) over {args.rounds} alternated rounds, "
          f"torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
