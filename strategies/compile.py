"""torch.compile, per transformer block or for the whole model.

Uses ``nn.Module.compile()`` (in place), so parameter names keep no ``_orig_mod.`` prefix
and the model object stays the same for the strategies applied after it.
"""

from __future__ import annotations

import torch
from torch import nn

from strategies.base import StrategyError

MODES = ("block", "model")


def apply_compile(model: nn.Module, mode: str = "block") -> nn.Module:
    """Compile each block (``mode='block'``: repeated blocks share one compiled graph) and the output
    stage (``model.head_loss``: final norm, head, loss), or the whole model (``mode='model'``)."""
    if mode == "block":
        for block in model.blocks.values():
            block.compile()
        if hasattr(model, "head_loss"):
            model.head_loss = torch.compile(model.head_loss)  # instance attribute shadows the method
    elif mode == "model":
        model.compile()
    else:
        raise ValueError(f"unknown compile mode {mode!r}; valid: block, model")
    return model


def validate(s) -> None:
    if s.dp == "fsdp" and s.compile and s.compile_mode == "model":
        raise StrategyError("strategy.compile_mode='model' with dp=fsdp is not supported: FSDP2 hooks would sit "
                            "inside the compiled graph; use compile_mode=block (per-block compile, as torchtitan)")


def name_part(s) -> str | None:
    if not s.compile:
        return None
    return "compile" if s.compile_mode == "block" else "compile(model)"
