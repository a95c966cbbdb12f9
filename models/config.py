"""Model configuration for the n00bGPT family: one dataclass, exact-name presets.

One family with knobs: ``arch="gpt2"`` gives nanoGPT-style pre-LayerNorm GPT-2
blocks (learned positions, GELU MLP, biases, tied head); ``arch="llama"`` gives
RoPE, RMSNorm, SwiGLU and no biases. Every preset is a plain ``GPTConfig`` so the
harness (Hydra) and the planner read the same numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ARCHS = ("gpt2", "llama")
SOURCES = ("native", "hf")


@dataclass
class GPTConfig:
    """Shape and flavour of one model. Validated at construction."""

    name: str = "custom"
    """Preset name (free text for custom configs); recorded in every result row."""
    arch: str = "gpt2"
    """'gpt2' (LayerNorm, learned positions, GELU, biases) or 'llama' (RMSNorm, RoPE, SwiGLU, no biases)."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 768
    """Residual stream width d."""
    vocab_size: int = 50257
    """Tokenizer vocabulary (before padding)."""
    block_size: int = 1024
    """Context length: longest sequence the model accepts (size of the position table for gpt2)."""
    pad_vocab_to: int = 1
    """Pad the embedding/head rows up to a multiple of this (64 is a common speed choice); 1 = no padding."""
    mlp_hidden: int = 0
    """MLP hidden width; 0 = 4*d for gpt2, SwiGLU's 8/3*d rounded up to a multiple of 256 for llama."""
    bias: bool | None = None
    """Biases in linears and norms; None = True for gpt2, False for llama."""
    tie_embeddings: bool = True
    """Share the token-embedding matrix with the LM head."""
    dropout: float = 0.0
    """Dropout probability (0 for benchmarks: dropout changes nothing in the FLOPs but adds noise)."""
    norm_eps: float = 1e-5
    """Epsilon of LayerNorm / RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base frequency (llama only)."""
    loss_chunk: int = 1024
    """Training loss through the fused, chunked LM head + cross-entropy (models/loss.py), this many tokens at a
    time: the (tokens, vocabulary) logits never exist whole. 0 = the plain path (logits, fp32 copy,
    F.cross_entropy). Default 1024: measured faster on CPU at both shapes tried (docs/journal.md, "A faster step").
    Same FLOPs, same loss. Under tensor parallelism (loss_parallel), pipeline parallelism
    (the last stage hands logits to the schedule's loss) and inside torch.compile (which fuses the plain
    path's softmax itself) the plain path is used. ``source=hf`` always runs HF's own head (plain path)."""
    source: str = "native"
    """Which implementation of the architecture: 'native' (models/gpt.py) or 'hf' (Hugging Face transformers'
    GPT2LMHeadModel / LlamaForCausalLM built from this config, models/hf.py; needs the ``[hf]`` extra). Both
    start from the same seeded weights (models/convert.py maps the names)."""
    hf_path: str = ""
    """A local ``save_pretrained`` directory (config.json + safetensors): its config.json sets the shape and its
    weights replace the seeded init, for either source (the fine-tuning case); its tokenizer, when it has one,
    tokenizes text data. ``dropout`` and ``loss_chunk`` stay this config's (a GPT-2 checkpoint's 0.1 dropout is
    not used). Empty = the preset and the seeded init."""

    def __post_init__(self) -> None:
        def bad(field: str, value, why: str) -> ValueError:
            return ValueError(f"model config {self.name!r}: {field}={value!r} is invalid: {why}")

        if self.arch not in ARCHS:
            raise bad("arch", self.arch, f"valid values are {', '.join(ARCHS)}")
        if self.source not in SOURCES:
            raise bad("source", self.source, f"valid values are {', '.join(SOURCES)}")
        if self.source == "hf" and self.arch == "gpt2" and self.bias is False:
            raise bad("bias", self.bias, "Hugging Face's GPT2LMHeadModel always has biases (use source=native)")
        for field in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "pad_vocab_to"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise bad(field, value, "must be a positive integer")
        if not isinstance(self.loss_chunk, int) or self.loss_chunk < 0:
            raise bad("loss_chunk", self.loss_chunk, "must be 0 (off) or a positive number of tokens")
        if self.n_embd % self.n_head:
            raise bad("n_embd", self.n_embd, f"must be divisible by n_head={self.n_head}")
        if self.arch == "llama" and self.head_dim % 2:
            raise bad("n_embd", self.n_embd, f"RoPE needs an even head dim, got {self.head_dim}")
        if self.mlp_hidden < 0:
            raise bad("mlp_hidden", self.mlp_hidden, "must be >= 0 (0 = default for the arch)")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", self.dropout, "must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and head: vocab_size rounded up to a multiple of pad_vocab_to."""
        m = self.pad_vocab_to
        return (self.vocab_size + m - 1) // m * m

    @property
    def use_bias(self) -> bool:
        return self.arch == "gpt2" if self.bias is None else bool(self.bias)

    @property
    def hidden_dim(self) -> int:
        """MLP hidden width actually used."""
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.arch == "gpt2":
            return 4 * self.n_embd
        return (int(8 * self.n_embd / 3) + 255) // 256 * 256


def _gpt2(name: str, n_layer: int, n_head: int, n_embd: int, **kw) -> GPTConfig:
    return GPTConfig(name=name, arch="gpt2", n_layer=n_layer, n_head=n_head, n_embd=n_embd, **kw)


def _llama(name: str, n_layer: int, n_head: int, n_embd: int, **kw) -> GPTConfig:
    return GPTConfig(name=name, arch="llama", n_layer=n_layer, n_head=n_head, n_embd=n_embd, **kw)


PRESETS: dict[str, GPTConfig] = {
    # Test size: ~0.85M params, byte-level vocabulary, runs a step in milliseconds.
    "tiny": _gpt2("tiny", 4, 4, 128, vocab_size=256, block_size=256),
    # Default CPU benchmark size: ~17.6M params with the real GPT-2 vocabulary, so the
    # LM head weighs what it weighs in the big models.
    "mini": _gpt2("mini", 6, 4, 256, block_size=256),
    "gpt2-small": _gpt2("gpt2-small", 12, 12, 768),
    "gpt2-medium": _gpt2("gpt2-medium", 24, 16, 1024),
    "gpt2-large": _gpt2("gpt2-large", 36, 20, 1280),
    "gpt2-xl": _gpt2("gpt2-xl", 48, 25, 1600),
    "llama-tiny": _llama("llama-tiny", 4, 4, 128, vocab_size=256, block_size=256),
    "llama-mini": _llama("llama-mini", 6, 4, 256, block_size=256),
    # ~124M with tied embeddings: the Llama-style counterpart of gpt2-small.
    "llama-125m": _llama("llama-125m", 12, 12, 768),
}


def get_config(name: str, **overrides) -> GPTConfig:
    """Return a fresh copy of preset ``name`` with ``overrides`` applied (validated)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
