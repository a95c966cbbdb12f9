"""What a strategy module declares: one ``TECHNIQUE = Technique(...)`` holding every fact about it.

strategies/config.py finds the modules of this package that define ``TECHNIQUE`` and builds from them the
strategy configuration (its fields, validation, canonical name), ``apply_strategies`` (the order), the
cost model's terms (bench/plan/costmodel.py), the FLOP effect (HFU) and the planner's search space.
Adding a strategy is therefore its module plus a preset YAML (README: "Add a strategy").

Hooks (all optional except ``apply``), called with the strategy configuration ``s``:

- ``fields``: the configuration fields it owns, ``Field(name, type, default, doc, choices)``;
- ``validate(s)`` / ``validate_for(s, device_type, world_size)`` / ``validate_run(s, model_cfg, seq_len,
  micro_batch)``: raise StrategyError (one line naming the bad value and the valid ones) or warn;
- ``name_part(s)``: its part of the canonical name (``None``/``""`` when off), joined with '+' in
  ``name_order``;
- ``apply(model, s, ctx)``: change the meta-device model (``ApplyContext``); returns the model to train;
- ``cost_setup(ctx)`` then ``memory(parts, ctx)``: predicted per-rank bytes (``CostContext``): setup
  hooks of every technique run first (precision, sharding), then the memory hooks edit ``parts``;
- ``comm(ctx)``: predicted bytes per step by collective;
- ``recompute_flops(model_cfg, seq_len, s)``: forward FLOPs per token re-run in backward (HFU);
- ``plan_axes(world_size)``: field -> values the planner tries (combinations that fail validation are
  left out).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class StrategyError(ValueError):
    """An invalid strategy or an invalid combination; raised before any training starts."""


@dataclass(frozen=True)
class Field:
    name: str
    type: type
    default: Any
    doc: str
    choices: tuple = ()  # non-empty: the valid values (checked before any technique's validate)


def _none(*_args, **_kwargs):
    return None


@dataclass(frozen=True)
class Technique:
    name: str
    order: int  # apply order; strategies/__init__.py documents why it is what it is
    apply: Callable
    name_order: int = 100  # position of its part in the canonical name (dp, ac, amp, compile, ...)
    fields: tuple[Field, ...] = ()
    validate: Callable = _none
    validate_for: Callable = _none
    validate_run: Callable = _none
    name_part: Callable = _none
    cost_setup: Callable = _none
    memory: Callable = _none
    comm: Callable = field(default=lambda ctx: {})
    comm_group: Callable = field(default=lambda ctx: ctx.world)  # ranks in its collectives (a ring's n)
    recompute_flops: Callable = field(default=lambda model_cfg, seq_len, s: 0)
    plan_axes: Callable = field(default=lambda world_size: {})


@dataclass
class ApplyContext:
    """What ``apply`` may use: the device, the seed, ``materialise()`` (allocate on the device and
    initialise from the seed, once; the composer calls it at the end if no technique needed it earlier)
    and the device mesh (strategies/mesh.py; None in a single process)."""

    device: Any
    seed: int
    materialise: Callable[[], None]
    mesh: Any = None


@dataclass
class CostContext:
    """The cost model's view of one run (all sizes per rank). Set by bench/plan/costmodel.py; techniques'
    ``cost_setup`` hooks may change ``mode``, ``shard_world`` and ``param_bytes``.

    P params (elements, this rank's: tp-local, this pipeline stage's), n_mm matmul weights, L blocks held,
    tokens = micro_batch x seq_len per micro-step; ``world`` all ranks, ``dp`` the data-parallel degree;
    ``mode``: activation precision, 'fp32' | 'autocast' | 'half'; ``shard_world``: ranks the parameters
    and optimizer state are sharded over (1 = replicated); ``param_bytes``: bytes per gathered parameter;
    ``padded(world)``, ``root_padded(world)``, ``block_padded(i, world)``: element counts after FSDP-style
    dim-0 padding; ``block_bytes(mode)``: one block's saved activations; ``resid_bytes(mode)``: one
    block's input (what full checkpointing keeps)."""

    model: Any
    s: Any
    world: int
    micro_batch: int
    seq_len: int
    grad_accum: int
    P: int
    n_mm: int
    L: int
    padded: Callable[[int], int]
    root_padded: Callable[[int], int]
    block_padded: Callable[[int, int], int]
    block_bytes: Callable[[str], int]
    resid_bytes: Callable[[str], int]
    mode: str = "fp32"
    shard_world: int = 1
    param_bytes: int = 4
    dp: int = 1  # data-parallel degree: world / (tp x pp)
    tp: int = 1
    pp: int = 1
    pp_rank: int = 0
    block_ids: tuple = ()  # global indices of the blocks this rank holds (all of them without pp)
    has_embedding: bool = True  # this rank holds the first stage (embeddings)
    has_head: bool = True  # ... the last stage (final norm, head, loss)
    replicated_norm: int = 0  # elements of this rank's norm parameters (replicated under tp)
    fused_head: bool = False  # the loss runs through models/loss.py (no logits; its weight cast is transient)
    act_tokens: int = 0  # tokens whose block activations are alive at once (pp: micro-batches in flight)
    head_tokens: int = 0  # ... whose output-stage activations are
    head_step_tokens: int = 0  # tokens of one output-stage backward (its transient buffers)

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len
