"""The planner's search: per strategy, the vocabulary padding, micro-batch and accumulation that fit and run fastest.

``python -m bench.plan`` (bench/plan/__main__.py) enumerates the strategies (``combinations``: parallel layouts and
techniques); for each one this module chooses the shape a user would otherwise try by hand:

1. **The vocabulary** is padded to a multiple of ``128 x tp`` (Megatron-LM's ``make-vocab-size-divisible-by`` 128,
   times tp: every tensor-parallel shard of the embedding and head is whole and a multiple of 128 rows), unless
   ``pad_vocab_to`` pins it (1: no padding). The row states the padding (``vocab_padding``: rows added, their
   parameter bytes, the FLOPs per token added in percent).
2. **The micro-batch**: the powers of two (multiples of the pipeline's micro-batches under pp) from 1 up to the
   per-rank sequences of the target global batch (else up to ``MAX_MICRO_BATCH``), or the one given. Memory grows
   with the micro-batch, so the candidates are tried from the smallest until one does not fit.
3. **Accumulation**: ``global_batch / (micro_batch x dp)`` micro-batches, which must be whole (the target global
   batch is met exactly, or the micro-batch is not a candidate); without a target, the ``grad_accum`` given.
4. **The choice**: among the fitting candidates, the fastest predicted step per token (bench/plan/steptime.py) --
   the largest micro-batch unless a smaller one is faster; without rates, the largest that fits. When none fits,
   the smallest, marked as not fitting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from models.config import GPTConfig
from models.flops import train_flops_per_token
from strategies.config import StrategyConfig
from strategies.mesh import dp_degree
from strategies.pp import n_microbatches

MEGATRON_PAD = 128  # Megatron-LM's default make-vocab-size-divisible-by; the rule pads to a multiple of 128 x tp
# without a target global batch: the largest micro-batch tried (beyond it the global batch, not the speed, is what
# grows: a larger batch needs a target, which the user gives)
MAX_MICRO_BATCH = 64
GIB = 2**30


def auto_pad(tp: int) -> int:
    """The multiple the vocabulary is padded to under tensor parallelism ``tp``: 128 x tp (module docstring)."""
    return MEGATRON_PAD * tp


def padded_model(cfg: GPTConfig, pad: int) -> GPTConfig:
    """``cfg`` with its vocabulary padded to a multiple of ``pad``."""
    return cfg if pad == cfg.pad_vocab_to else dataclasses.replace(cfg, pad_vocab_to=pad)


def vocab_padding(cfg: GPTConfig, seq_len: int) -> dict:
    """What padding costs: ``rows`` added to the embedding and head (``padded_vocab_size - vocab_size``), their fp32
    parameter ``bytes`` (``4 x rows x d``, twice for an untied head), and ``flops_pct``: the training FLOPs per token
    added, ``100 x (F(padded) / F(unpadded) - 1)`` (models/flops.py)."""
    rows = cfg.padded_vocab_size - cfg.vocab_size
    bare = dataclasses.replace(cfg, pad_vocab_to=1)
    flops = train_flops_per_token(cfg, seq_len) / train_flops_per_token(bare, seq_len) - 1
    return {"rows": rows, "bytes": 4 * rows * cfg.n_embd * (1 if cfg.tie_embeddings else 2),
            "flops_pct": round(100 * flops, 3)}


def micro_batches(s: StrategyConfig, per_rank: int | None, given: int) -> list[int]:
    """The candidate micro-batches, smallest first (module docstring, 2.): ``given`` (if it divides ``per_rank``),
    or powers of two times the pipeline's micro-batches that divide ``per_rank`` (the target's sequences per
    data-parallel rank; None: up to ``MAX_MICRO_BATCH``)."""
    if given:
        return [given] if per_rank is None or per_rank % given == 0 else []
    step = n_microbatches(s) if s.pp > 1 else 1
    out, mb = [], step
    while mb <= (per_rank if per_rank is not None else MAX_MICRO_BATCH):
        if per_rank is None or per_rank % mb == 0:
            out.append(mb)
        mb *= 2
    return out


@dataclass
class Shape:
    """One strategy's chosen shape and what the cost model predicts for it."""

    micro_batch: int
    grad_accum: int
    mem: dict  # bench/plan/costmodel.py predict_memory
    fits: bool
    step: dict | None = None  # bench/plan/steptime.py predict_step, with rates


def choose_shape(s: StrategyConfig, world: int, global_batch: int, given_mb: int, given_ga: int, limit: int,
                 memory: Callable[[int], dict], step: Callable[[int, int], dict] | None) -> Shape | str:
    """The shape to run ``s`` with (module docstring, 2.-4.), or why there is none (the target global batch does
    not divide over the data-parallel ranks, or no candidate micro-batch divides the per-rank sequences).
    ``memory(micro_batch=)``: predicted bytes by part; ``step(micro_batch=, grad_accum=)``: predicted step (None:
    memory only); ``limit``: bytes per device."""
    dp = dp_degree(s, world)
    per_rank = None
    if global_batch:
        if global_batch % dp:
            return f"global_batch={global_batch} sequences do not divide over dp={dp} ranks"
        per_rank = global_batch // dp
    candidates = micro_batches(s, per_rank, given_mb)
    if not candidates:
        need = f"a multiple of the pipeline's {n_microbatches(s)} micro-batches" if s.pp > 1 else "whole"
        return f"no micro-batch ({need}) divides the {per_rank} sequences per data-parallel rank"
    best: Shape | None = None
    for mb in candidates:
        mem = memory(micro_batch=mb)
        ga = per_rank // mb if per_rank is not None else given_ga
        shape = Shape(mb, ga, mem, mem["total"] <= limit)
        if not shape.fits:
            if best is None:  # nothing fits: the smallest candidate, marked
                best = shape
            break
        if step is not None:
            shape.step = step(micro_batch=mb, grad_accum=ga)
        if best is None or not best.fits or step is None or (
                shape.step["tokens_per_sec"] >= best.step["tokens_per_sec"]):
            best = shape
    return best


def family(s: StrategyConfig) -> str:
    """The plan's family, for the per-family best: 'with pp', 'hsdp', 'dp x tp' or 'dp only'."""
    if s.pp > 1:
        return "with pp"
    if s.dp_replicate > 1:
        return "hsdp"
    return "dp x tp" if s.tp > 1 else "dp only"


_PARTS = {"compute_s": "compute", "memory_s": "memory-bound time", "exposed_comm_s": "exposed communication",
          "bubble_s": "pipeline bubble"}


def why(row: dict, other: dict) -> str:
    """Why ``row`` is predicted faster than ``other``: its tokens/s ratio and the (at most two) step-time parts it
    saves most on, each as a share of ``other``'s step per token (the two may differ in batch), largest first."""
    def per_token(r, part):
        return (r["pred_step_s"] if part == "step_s" else r["pred_step_breakdown"][part]) / r["global_batch_tokens"]

    gains = sorted(((per_token(other, p) - per_token(row, p)) / per_token(other, "step_s"), name)
                   for p, name in _PARTS.items() if p in row["pred_step_breakdown"])
    said = [f"{100 * g:.0f} % less {name}" for g, name in reversed(gains) if g >= 0.01][:2]
    ratio = row["pred_tokens_per_sec"] / other["pred_tokens_per_sec"]
    return (f"{row['strategy']} is {ratio:.2f}x as fast as {other['strategy']}"
            + (f": {', '.join(said)} per token" if said else "")
            + (f" (at micro-batch {row['micro_batch']} vs {other['micro_batch']})"
               if row["micro_batch"] != other["micro_batch"] else ""))
