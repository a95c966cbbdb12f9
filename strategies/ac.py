"""Activation checkpointing: wrap transformer blocks so their activations are recomputed in backward.

Uses PyTorch's non-reentrant ``torch.utils.checkpoint`` (works with FSDP2, DDP and compile).
Modes: 'full' (every block), 'selective' (every k-th block), 'op' (op-level selective: the
block's matmul and attention outputs are saved, everything elementwise is recomputed).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from models.flops import block_forward_flops_per_token
from strategies.base import StrategyError

MODES = ("none", "full", "selective", "op")

_aten = torch.ops.aten
# Outputs worth keeping under op-level selective checkpointing: the expensive ops.
_SAVE_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
}
if hasattr(_aten, "_scaled_dot_product_cudnn_attention"):
    _SAVE_OPS.add(_aten._scaled_dot_product_cudnn_attention.default)


def _op_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


class CheckpointWrapper(nn.Module):
    """Runs ``block`` under non-reentrant checkpointing; ``op_level`` selects the op-level policy."""

    def __init__(self, block: nn.Module, op_level: bool = False):
        super().__init__()
        self.block = block
        self.op_level = op_level

    def forward(self, *args, **kwargs):  # keyword arguments: Hugging Face layers take most of theirs by name
        if self.op_level:
            context_fn = partial(create_selective_checkpoint_contexts, _op_policy)
            return checkpoint(self.block, *args, use_reentrant=False, context_fn=context_fn, **kwargs)
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


def checkpointed_block_ids(n_layer: int, mode: str, every: int) -> list[int]:
    """Indices of the blocks that ``mode`` checkpoints."""
    if mode == "none":
        return []
    if mode == "selective":
        return list(range(0, n_layer, every))
    return list(range(n_layer))


def apply_ac(model: nn.Module, mode: str, every: int = 2) -> nn.Module:
    """Wrap ``model.blocks[key]`` in place for the blocks ``mode`` selects (by global block index, so a
    pipeline stage checkpoints the same blocks the whole model would); returns ``model``."""
    chosen = set(checkpointed_block_ids(model.cfg.n_layer, mode, every))
    for key in list(model.blocks.keys()):
        if int(key) in chosen:
            model.blocks[key] = CheckpointWrapper(model.blocks[key], op_level=(mode == "op"))
    return model


def recompute_flops_per_token(cfg, seq_len: int, ac: str = "none", ac_every: int = 1) -> int:
    """Extra forward FLOPs per token that activation checkpointing re-runs in backward (for HFU).

    A checkpointed block re-runs its forward in backward, but PyTorch's non-reentrant
    checkpoint stops recomputing once every tensor backward needs is back ("early stop"):
    the block's last matmul (the MLP down projection) only produces the block output, which
    backward never needs, so it is not re-run. Per checkpointed block that is
    ``block_forward - 2*d*h``; tests/test_models.py checks this against FlopCounterMode.

    - ``none``: 0.
    - ``full``: every block is checkpointed.
    - ``selective``: every ``ac_every``-th block (blocks i with i % ac_every == 0) is checkpointed.
    - ``op``: op-level selective checkpointing that saves every matmul and attention output and
      recomputes only cheap elementwise ops -> 0 matmul FLOPs.
    """
    if ac not in MODES:
        raise ValueError(f"unknown ac mode {ac!r}; valid: {', '.join(MODES)}")
    if ac == "op":
        return 0
    n = len(checkpointed_block_ids(cfg.n_layer, ac, ac_every))
    return n * (block_forward_flops_per_token(cfg, seq_len) - 2 * cfg.n_embd * cfg.hidden_dim)


def validate(s) -> None:
    if s.ac_every < 1:
        raise StrategyError(f"strategy.ac_every={s.ac_every} is invalid; must be >= 1")


def name_part(s) -> str | None:
    if s.ac == "selective":
        return f"ac(selective/{s.ac_every})"
    return None if s.ac == "none" else f"ac({s.ac})"
