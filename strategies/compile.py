"""torch.compile, per transformer block or for the whole model.

Uses ``nn.Module.compile()`` (in place), so parameter names keep no ``_orig_mod.`` prefix
and the model object stays the same for the strategies applied after it.
"""

from __future__ import annotations

from torch import nn


def apply_compile(model: nn.Module, mode: str = "block") -> nn.Module:
    """Compile each block (``mode='block'``: repeated blocks share one compiled graph) or the whole model."""
    if mode == "block":
        for block in model.blocks:
            block.compile()
    elif mode == "model":
        model.compile()
    else:
        raise ValueError(f"unknown compile mode {mode!r}; valid: block, model")
    return model
