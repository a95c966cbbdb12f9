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

    def forward(self, *args):
        context_fn = partial(create_selective_checkpoint_contexts, _op_policy) if self.op_level else None
        kwargs = {"context_fn": context_fn} if context_fn else {}
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


def checkpointed_block_ids(n_layer: int, mode: str, every: int) -> list[int]:
    """Indices of the blocks that ``mode`` checkpoints."""
    if mode == "none":
        return []
    if mode == "selective":
        return list(range(0, n_layer, every))
    return list(range(n_layer))


def apply_ac(model: nn.Module, mode: str, every: int = 2) -> nn.Module:
    """Wrap ``model.blocks[i]`` in place for the blocks ``mode`` selects; returns ``model``."""
    for i in checkpointed_block_ids(len(model.blocks), mode, every):
        model.blocks[i] = CheckpointWrapper(model.blocks[i], op_level=(mode == "op"))
    return model
