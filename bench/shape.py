"""The run's shape, the options every tool shares: which model, on how many ranks, with what batch.

``ShapeArgs`` is the one declaration of ``model``, ``world_size``, ``micro_batch``, ``seq_len`` and ``grad_accum``
with one set of defaults (bench/harness/config.py ``RunConfig``'s: mini, micro-batch 4, the model's context, no
accumulation); the planner (``python -m bench.plan``), the tuner (``python -m bench.tune``), the parts probe
(``torchrun -m bench.tune.parts``) and the A/B tools (``python -m bench.launch.ab``, ``bench.launch.overhead``)
extend it with their own options. A bad value is one line and exit code 2 (models/cli.py), before any work.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.cli import UsageError, opt
from models.config import PRESETS


@dataclass
class ShapeArgs:
    model: str = opt("mini", "a model preset: " + ", ".join(PRESETS))
    world_size: int = opt(1, "ranks (devices): data-parallel x tensor-parallel x pipeline-parallel")
    micro_batch: int = opt(4, "sequences per micro-batch per data-parallel rank")
    seq_len: int = opt(0, "tokens per sequence (0 = the model's context)")
    grad_accum: int = opt(1, "micro-batches per optimizer step per rank")

    MIN_WORLD_SIZE = 1  # (not a field) a tool whose world_size=0 means "as launched" sets 0
    MIN_MICRO_BATCH = 1  # (not a field) a tool whose micro_batch=0 means "search" (the planner) sets 0
    MAX_COUNT = 2**20  # (not a field) ranks, sequences or micro-batches: 10x the largest clusters, not 1e20

    def __post_init__(self) -> None:
        if self.model not in PRESETS:
            raise UsageError(f"model={self.model!r} is not a preset; valid: {', '.join(PRESETS)}")
        if not self.MIN_WORLD_SIZE <= self.world_size <= self.MAX_COUNT:
            raise UsageError(f"world_size={self.world_size} is invalid; must be within {self.MIN_WORLD_SIZE} .. "
                             f"{self.MAX_COUNT:,}")
        for key, low in (("micro_batch", self.MIN_MICRO_BATCH), ("grad_accum", 1)):
            if not low <= getattr(self, key) <= self.MAX_COUNT:
                raise UsageError(f"{key}={getattr(self, key)} is invalid; must be within {low} .. {self.MAX_COUNT:,}")
        if self.seq_len < 0:
            raise UsageError(f"seq_len={self.seq_len} is invalid; must be >= 0 (0 = the model's context)")

    def one_process(self, tool: str) -> None:
        """For a tool that runs in this one process: world_size must be 1."""
        if self.world_size != 1:
            raise UsageError(f"world_size={self.world_size}: {tool} runs in one process; use world_size=1")
