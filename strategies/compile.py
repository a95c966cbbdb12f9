"""torch.compile, per transformer block or for the whole model.

Uses ``nn.Module.compile()`` (in place), so parameter names keep no ``_orig_mod.`` prefix
and the model object stays the same for the strategies applied after it.
"""

from __future__ import annotations

import torch
from torch import nn


def apply_compile(model: nn.Module, mode: str = "block") -> nn.Module:
    """Compile each block (``mode='block'``: repeated blocks share one compiled graph) and the output
    stage (``model.head_loss``: final norm, head, loss), or the whole model (``mode='model'``)."""
    if mode == "block":
        for block in model.blocks:
            block.compile()
        if hasattr(model, "head_loss"):
            model.head_loss = torch.compile(model.head_loss)  # instance attribute shadows the method
    elif mode == "model":
        model.compile()
    else:
        raise ValueError(f"unknown compile mode {mode!r}; valid: block, model")
    return model
