"""``build_model``: the family's GPT, or with ``cfg.source='hf'`` the Hugging Face model behind the same interface.
Its own module so that neither implementation imports the other (models/hf.py builds on models/gpt.py's tensors).
"""

from __future__ import annotations

import torch
from torch import nn

from models.config import GPTConfig
from models.gpt import GPT
from models.hf import build_hf


def build_model(cfg: GPTConfig, device: str | torch.device = "meta") -> nn.Module:
    """Build the module tree on ``device`` (``meta`` by default: no memory is allocated): the family's GPT, or
    with ``cfg.source='hf'`` the Hugging Face model behind the same interface (models/hf.py)."""
    if cfg.source == "hf":
        return build_hf(cfg, device)
    with torch.device(device):
        return GPT(cfg)
