"""FLOP and parameter accounting for the family, from the config alone (no allocation).

This is the one place the harness's MFU and HFU get their numerator from.

Convention (the same as ``torch.utils.flop_counter.FlopCounterMode``):
- only matrix multiplies count, 2 FLOPs per multiply-accumulate; norms, softmax,
  activations, RoPE, the loss and embedding *lookups* are not counted;
- causal attention is counted in full (the T x T score matrix, as a dense SDPA kernel
  computes it), not halved;
- backward = 2 x forward (grad w.r.t. input and w.r.t. weight), so training = 3 x forward.

Forward FLOPs per token, sequence length T, width d, MLP hidden h, padded vocab V:

    per block:  2*d*3d (qkv) + 2*T*d (q k^T) + 2*T*d (att @ v) + 2*d*d (out proj)
                + 2*d*h*2 (GELU MLP) or 2*d*h*3 (SwiGLU MLP)
    head:       2*d*V

Relation to the usual approximation: with N_mm = matmul weights (the head included; biases,
norms, the position table and an untied token table, which are only looked up, excluded),
training FLOPs/token = 6*N_mm + 12*L*d*T, i.e.
exactly the PaLM / nanoGPT ``6N + 12*L*H*Q*T`` formula with N taken as N_mm.
"""

from __future__ import annotations

from models.config import GPTConfig


def block_forward_flops_per_token(cfg: GPTConfig, seq_len: int) -> int:
    """Forward matmul FLOPs of one transformer block, per token, at sequence length ``seq_len``."""
    d, h, T = cfg.n_embd, cfg.hidden_dim, seq_len
    mlp_mats = 3 if cfg.arch == "llama" else 2
    return 2 * d * 3 * d + 2 * T * d + 2 * T * d + 2 * d * d + 2 * d * h * mlp_mats


def forward_flops_per_token(cfg: GPTConfig, seq_len: int) -> int:
    """Forward matmul FLOPs per token (FLOPs/token): all blocks plus the LM head."""
    return cfg.n_layer * block_forward_flops_per_token(cfg, seq_len) + 2 * cfg.n_embd * cfg.padded_vocab_size


def train_flops_per_token(cfg: GPTConfig, seq_len: int) -> int:
    """Model FLOPs per trained token (forward + backward = 3 x forward), the MFU numerator's unit."""
    return 3 * forward_flops_per_token(cfg, seq_len)


def param_count(cfg: GPTConfig) -> int:
    """Parameters of the model built from ``cfg`` (tied head counted once), without building it."""
    d, h, V = cfg.n_embd, cfg.hidden_dim, cfg.padded_vocab_size
    b = cfg.use_bias
    norm = d + (d if (b and cfg.arch == "gpt2") else 0)  # RMSNorm has no bias
    attn = d * 3 * d + d * d + ((3 * d + d) if b else 0)
    n_mlp_in = 2 if cfg.arch == "llama" else 1
    mlp = n_mlp_in * d * h + h * d + ((n_mlp_in * h + d) if b else 0)
    block = 2 * norm + attn + mlp
    emb = V * d + (cfg.block_size * d if cfg.arch == "gpt2" else 0)
    head = 0 if cfg.tie_embeddings else V * d
    return emb + cfg.n_layer * block + norm + head


def non_embedding_param_count(cfg: GPTConfig) -> int:
    """Parameters excluding the token and position embedding tables (Kaplan et al.'s N).
    An untied LM head is counted as non-embedding."""
    emb = cfg.padded_vocab_size * cfg.n_embd + (cfg.block_size * cfg.n_embd if cfg.arch == "gpt2" else 0)
    return param_count(cfg) - emb


def adamw_fp32_state_bytes(cfg: GPTConfig) -> int:
    """fp32 training state in bytes: params (4) + grads (4) + AdamW's two moments (8) = 16 B/param."""
    return 16 * param_count(cfg)
