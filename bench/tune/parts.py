"""Measure the model's parts now and cache them, for the runs of one shape (bench/measure/parts.py):

    torchrun --standalone --nproc_per_node=2 -m bench.tune.parts model=mini micro_batch=4 [seq_len=256]
        [dtype=bf16] [tp=2 sp=true] [model.<field>=value ...]

on N ranks of this host, matmuls in the runs' compute dtype (fp32, tf32, bf16, fp16), whatever is cached; with
``tp`` the parts are timed as tensor parallelism splits them, on the (dp, tp) mesh of the N ranks, exactly as a
run's harness does it (bench/harness/rates.py ``parts_sharding``). Rank 0 prints them as JSON. python -m
bench.tune runs this first, once per parts key among its candidates, so that its ranking and every run of
that key predict from one measurement. An entry point (it applies a strategy), so it lives with the tuner.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass

import torch.distributed as dist

from bench.harness.dist import env_world, gather_objects, init_distributed
from bench.harness.rates import parts_sharding
from bench.measure.parts import get_parts
from bench.plan.__main__ import PlanArgs, model_config
from bench.shape import ShapeArgs
from models.cli import UsageError, fail, opt, parse
from strategies.config import StrategyConfig
from strategies.mesh import build_mesh

DTYPES = ("fp32", "tf32", "bf16", "fp16")


@dataclass
class PartsArgs(ShapeArgs):
    """The shape (bench/shape.py; micro_batch: a pipeline micro-batch under pp; world_size: as torchrun launched
    it, checked) and the parts' own options."""

    world_size: int = opt(0, "ranks the parts are timed on: 0 = as torchrun launched them (WORLD_SIZE)")
    MIN_WORLD_SIZE = 0
    dtype: str = opt("fp32", "the runs' compute dtype: " + ", ".join(DTYPES))
    tp: int = opt(1, "tensor-parallel degree the parts are split over (1 = whole)")
    sp: bool = opt(False, "with tp >= 2: sequence parallelism")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grad_accum != 1:  # the parts are one micro-batch's work; the step model multiplies them
            raise UsageError(f"grad_accum={self.grad_accum}: the parts are timed per micro-batch; leave it at 1")
        if self.dtype not in DTYPES:
            raise UsageError(f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.micro_batch < 1 or self.tp < 1:
            raise UsageError(f"micro_batch={self.micro_batch}, tp={self.tp}: both must be >= 1")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    prog = "python -m bench.tune.parts"
    args = parse(PartsArgs, [a for a in argv if not a.startswith("model.")], prog, __doc__)
    world = env_world()[2]
    if args.world_size and args.world_size != world:
        fail(prog, f"world_size={args.world_size} but torchrun launched {world} rank(s); launch that many or drop "
                   "world_size=")
    cfg = model_config(PlanArgs(model=args.model, world_size=world),
                       [a.removeprefix("model.") for a in argv if a.startswith("model.")], prog)
    try:  # before any work: the split must fit the ranks and the model
        s = StrategyConfig(tp=args.tp, sp=args.sp)
        s.validate_for("cpu", world)
        s.validate_run(cfg, args.seq_len or cfg.block_size, args.micro_batch)
    except ValueError as exc:
        fail(prog, str(exc))
    info = init_distributed("auto", "auto", 600)
    try:
        mesh = build_mesh(s, info.device.type) if args.tp > 1 else None
        parts, source = get_parts(cfg, args.micro_batch, args.seq_len or cfg.block_size, info.device,
                                  max(1, info.world_size // info.nnodes), lambda obj: gather_objects(obj, info),
                                  dist.barrier if dist.is_initialized() else (lambda: None), info.is_main,
                                  fresh=True, dtype=args.dtype, shard=parts_sharding(s, mesh))
        if info.is_main:
            print(json.dumps({"source": source, **dataclasses.asdict(parts)}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
