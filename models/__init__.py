"""The n00bGPT model family: config presets, the model, and its FLOP/parameter accounting.

Imports nothing from bench/, strategies/ or reports/.
"""

from models.build import build_model
from models.config import ARCHS, PRESETS, GPTConfig, get_config
from models.flops import (
    adamw_fp32_state_bytes,
    forward_flops_per_token,
    non_embedding_param_count,
    param_count,
    train_flops_per_token,
)
from models.gpt import GPT, Block, count_params

__all__ = [
    "ARCHS", "PRESETS", "GPTConfig", "get_config", "GPT", "Block", "build_model", "count_params",
    "param_count", "non_embedding_param_count", "forward_flops_per_token", "train_flops_per_token",
    "adamw_fp32_state_bytes",
]
