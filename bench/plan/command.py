"""The command line that runs a plan row: ``torchrun ... bench/run.py ...`` with every override the row assumes.

A strategy is written as the fields that differ from the ``single`` preset (StrategyConfig's defaults), so the
command names what the row changes and nothing else; the shape (model, micro-batch, sequence length,
accumulation) and any model override the plan was asked with follow. One node (world size up to
``gpus_per_node``): ``torchrun --standalone --nproc_per_node=W``. More: ``torchrun --nnodes=N
--nproc_per_node=G --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:29500``, the same line on every node
(docs/cluster.md), with ``$MASTER_ADDR`` left for the shell of the job to fill.
"""

from __future__ import annotations

import dataclasses
import math
import shlex

from strategies.config import StrategyConfig

_DEFAULT = StrategyConfig()


def _value(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def strategy_overrides(s: StrategyConfig) -> list[str]:
    """``strategy.<field>=<value>`` for every field of ``s`` that differs from the single preset."""
    return [f"strategy.{f.name}={_value(getattr(s, f.name))}" for f in dataclasses.fields(s)
            if getattr(s, f.name) != getattr(_DEFAULT, f.name)]


def launcher(world_size: int, gpus_per_node: int) -> list[str]:
    """torchrun's arguments for ``world_size`` processes, ``gpus_per_node`` to a node."""
    if world_size <= gpus_per_node:
        return ["torchrun", "--standalone", f"--nproc_per_node={world_size}"]
    nodes = math.ceil(world_size / gpus_per_node)
    if nodes * gpus_per_node != world_size:
        raise ValueError(f"world_size={world_size} is not a whole number of nodes of gpus_per_node={gpus_per_node}")
    return ["torchrun", f"--nnodes={nodes}", f"--nproc_per_node={gpus_per_node}", "--rdzv_backend=c10d",
            "--rdzv_endpoint=$MASTER_ADDR:29500"]


def run_command(model: str, s: StrategyConfig, world_size: int, micro_batch: int, seq_len: int, grad_accum: int,
                gpus_per_node: int, model_overrides: list[str] = ()) -> str:
    """The shell line that runs this plan row (module docstring)."""
    args = [f"model={model}", *(f"model.{o}" for o in model_overrides), f"micro_batch={micro_batch}",
            f"seq_len={seq_len}", f"grad_accum={grad_accum}", *strategy_overrides(s)]
    return " ".join(launcher(world_size, gpus_per_node) + ["bench/run.py"] + [shlex.quote(a) for a in args])
