"""The n00bGPT model: one readable GPT family (GPT-2 blocks or Llama-style blocks).

Construction only creates modules (so it works under ``torch.device("meta")``);
``init_weights(seed)`` fills them, one parameter at a time from one seeded
generator in ``named_parameters()`` order. Because the values depend only on the
seed, the order and the *global* shapes, a sharded (FSDP) or wrapped
(checkpoint, compile) copy of the model gets exactly the weights a plain copy
gets -- which is what lets every strategy start from the same point.

Shapes: B batch, T sequence, d = n_embd, H heads, hd = d/H, V = padded vocab.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from models.config import GPTConfig
from models.loss import fused_lm_loss
from models.weights import canonical_name, copy_full_into, load_pretrained_into, qkv_to_head_major


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.arch == "llama":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.use_bias)


def rope_tables(cfg: GPTConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (block_size, hd/2), for half-split rotary embeddings."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(half, device=device, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(cfg.block_size, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, hd) queries or keys by position; tables are cut to T and cast to x's dtype."""
    T = x.shape[-2]
    cos, sin = cos[:T].to(x.dtype), sin[:T].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    """Causal self-attention with a fused q/k/v projection whose rows are head-major, (H, 3, hd): a
    row-split of ``qkv`` (tensor parallelism) leaves whole heads on each rank, so the forward reads the
    number of local heads from the projection's output width."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.use_bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.use_bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, -1, 3, self.head_dim)  # (B, T, H, 3, hd); H local under TP
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(3))  # 3 x (B, H, T, hd), views of qkv
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, d); d/tp under TP
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """GELU MLP for gpt2; SwiGLU (silu(gate) * up, then down) for llama."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.swiglu = cfg.arch == "llama"
        h = cfg.hidden_dim
        self.fc = nn.Linear(cfg.n_embd, h, bias=cfg.use_bias)
        self.gate = nn.Linear(cfg.n_embd, h, bias=cfg.use_bias) if self.swiglu else None
        self.proj = nn.Linear(h, cfg.n_embd, bias=cfg.use_bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            h = F.silu(self.gate(x)) * self.fc(x)  # (B, T, h)
        else:
            h = F.gelu(self.fc(x), approximate="tanh")  # (B, T, h)
        return self.dropout(self.proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


def param_shapes(cfg: GPTConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of ``GPT(cfg)``, in ``named_parameters()`` order, from the config alone:
    the planner's search asks for thousands of strategies and needs no module (the first meta-device module costs
    ~1.5 s of torch's lazy imports). tests/test_models.py holds it equal to the built model for every preset."""
    d, h, V = cfg.n_embd, cfg.hidden_dim, cfg.padded_vocab_size
    bias = cfg.use_bias

    def linear(name: str, n_out: int, n_in: int) -> list:
        return [(f"{name}.weight", (n_out, n_in))] + ([(f"{name}.bias", (n_out,))] if bias else [])

    def norm(name: str) -> list:
        with_bias = cfg.arch == "gpt2" and bias  # RMSNorm: a scale only
        return [(f"{name}.weight", (d,))] + ([(f"{name}.bias", (d,))] if with_bias else [])

    out = [("tok_emb.weight", (V, d))] + ([("pos_emb.weight", (cfg.block_size, d))] if cfg.arch == "gpt2" else [])
    for i in range(cfg.n_layer):
        b = f"blocks.{i}"
        out += (norm(f"{b}.norm1") + linear(f"{b}.attn.qkv", 3 * d, d) + linear(f"{b}.attn.proj", d, d)
                + norm(f"{b}.norm2") + linear(f"{b}.mlp.fc", h, d)
                + (linear(f"{b}.mlp.gate", h, d) if cfg.arch == "llama" else []) + linear(f"{b}.mlp.proj", d, h))
    out += norm("norm_f") + ([] if cfg.tie_embeddings else [("lm_head.weight", (V, d))])
    return out


def init_tensors(cfg: GPTConfig, seed: int, device: torch.device, dtypes: dict | None = None):
    """Yield ``(name, full tensor)`` for every parameter of the whole model ``cfg`` describes, in
    ``named_parameters()`` order, with the family's seeded GPT-2 init (see ``GPT.init_weights``): one
    generator seeded with ``seed``, one full-shape tensor at a time. ``dtypes`` maps a name to its dtype
    (default the meta model's). The Hugging Face build (models/hf.py) draws the same tensors and maps their
    names (models/convert.py), so both implementations start from the same weights."""
    gen = torch.Generator(device=device).manual_seed(seed)
    std_resid = 0.02 / math.sqrt(2 * cfg.n_layer)
    dtypes = dtypes or {}
    with torch.device("meta"):
        shapes = GPT(dataclasses.replace(cfg, source="native")).named_parameters()
    for name, meta in shapes:
        full = torch.empty(meta.shape, dtype=dtypes.get(name, meta.dtype), device=device)
        if name.endswith("bias"):
            full.zero_()
        elif meta.ndim == 1:  # LayerNorm / RMSNorm scale
            full.fill_(1.0)
        else:
            std = std_resid if name.endswith(_RESIDUAL_SUFFIXES) else 0.02
            full.normal_(0.0, std, generator=gen)
            if name.endswith("attn.qkv.weight"):  # drawn in GPT-2's (3, H, hd) order, kept head-major
                full = qkv_to_head_major(full, cfg.n_head)
        yield name, full


# Parameters whose names end like this are residual projections: GPT-2 scales their
# init std by 1/sqrt(2 * n_layer) so the residual stream's variance does not grow with depth.
_RESIDUAL_SUFFIXES = ("attn.proj.weight", "mlp.proj.weight")


class GPT(nn.Module):
    """The family's model. ``blocks`` is the ModuleDict strategies iterate over, keyed by the global
    block index ("0", "1", ...), so a pipeline stage that keeps only some blocks keeps their names.

    ``forward(idx)`` returns logits (B, T, V); ``forward(idx, targets)`` returns the
    mean next-token cross-entropy (fp32 scalar). A pipeline stage (strategies/pp.py) is this model
    with the parts it does not own set to None: without ``tok_emb`` its input is the previous
    stage's hidden states (B, T, d), without ``norm_f`` it returns its hidden states.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        V, d = cfg.padded_vocab_size, cfg.n_embd
        self.tok_emb = nn.Embedding(V, d)
        self.pos_emb = nn.Embedding(cfg.block_size, d) if cfg.arch == "gpt2" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layer)})
        self.norm_f = make_norm(cfg)
        # Tied: the head *is* tok_emb.weight (used through F.linear), so there is no
        # second module holding the shared tensor for wrappers or sharding to untie.
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(d, V, bias=False)
        if cfg.arch == "llama":
            cos, sin = rope_tables(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def keep_stage(self, keep: set[str], first: bool, last: bool) -> None:
        """Make this (meta-device) model a pipeline stage: only the blocks ``keep``, the embeddings if ``first``,
        the final norm and head if ``last`` (strategies/pp.py ``split_stage``)."""
        for key in [k for k in self.blocks.keys() if k not in keep]:
            del self.blocks[key]
        if not first:
            self.tok_emb = self.pos_emb = None
        if not last:
            self.norm_f = self.lm_head = None

    def prepare_tp(self, tp: int, sp: bool) -> None:
        """Local facts tensor parallelism needs before it splits the weights (strategies/tp.py): none here -- the
        fused q/k/v rows are head-major, so a row split keeps whole heads, and RoPE tables are whole-sequence."""

    @property
    def head_weight(self) -> torch.Tensor:
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Deterministic GPT-2 init: N(0, 0.02) weights, residual projections N(0, 0.02/sqrt(2L)),
        zero biases, unit norm weights. Each full-shape tensor is drawn on the parameter's device
        from one generator seeded with ``seed``; a DTensor (FSDP) keeps only its local shard, so
        only one parameter is ever materialised whole.

        The draws follow the *whole* model's parameter order, so a pipeline stage draws (and drops)
        the parameters it does not own and gets exactly the values the whole model has."""
        device = next(self.parameters()).device
        if device.type == "meta":
            raise RuntimeError("init_weights: materialise the model first (model.to_empty(device=...))")
        own = {canonical_name(name): p for name, p in self.named_parameters()}
        if self.cfg.hf_path:  # a checkpoint's weights instead of the seeded draw (models/weights.py)
            load_pretrained_into(own, self.cfg, "native", device)
        else:
            for name, full in init_tensors(self.cfg, seed, device, {n: p.dtype for n, p in own.items()}):
                if name in own:
                    copy_full_into(own[name], full)
        if self.cfg.arch == "llama":
            cos, sin = rope_tables(self.cfg, device=device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds the model's context block_size={self.cfg.block_size}")
        rope = (self.rope_cos, self.rope_sin) if self.cfg.arch == "llama" else None
        x = self.embed(idx) if self.tok_emb is not None else idx  # (B, T, d)
        for block in self.blocks.values():
            x = block(x, rope)
        return self.head_loss(x, targets) if self.norm_f is not None else x

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token (+ learned position, gpt2) embeddings of (B, T) token ids -> (B, T, d)."""
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        return self.drop(x)

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm, LM head and (with targets) the fp32 cross-entropy: a separate method so that
        per-block compilation can compile it too (eager, its fp32 logits copy and log-softmax cost
        a third of a GPT-2-small step on an H100)."""
        x = self.norm_f(x)
        # the fused, chunked loss: no (B, T, V) logits. Not under TP (a DTensor head: loss_parallel) nor inside
        # torch.compile, which traces the plain path and fuses its softmax itself
        if (targets is not None and self.cfg.loss_chunk and not _is_dtensor(self.head_weight)
                and not torch.compiler.is_compiling()):
            return fused_lm_loss(x, self.head_weight, targets, self.cfg.loss_chunk)
        logits = F.linear(x, self.head_weight)  # (B, T, V)
        if targets is None:
            return logits
        return lm_loss(logits, targets)


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"  # no import of torch.distributed.tensor for the plain model


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 of (B, T, V) logits against (B, T) targets."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


# Attribute names under which strategies hold a wrapped block (strategies/ac.py's CheckpointWrapper keeps it
# as ``.block``; torch's own wrappers use the other two): not part of a parameter's model name.
def count_params(model: nn.Module) -> int:
    """Number of distinct parameters (tied tensors counted once), global shapes under FSDP."""
    return sum(p.numel() for p in model.parameters())
