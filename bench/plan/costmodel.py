"""Predicted per-rank memory and communication per step, from the model config and strategy alone.

Everything is per rank, in bytes, for one optimizer step of ``grad_accum`` micro-batches of
``micro_batch`` sequences of ``seq_len`` tokens (n = micro_batch * seq_len tokens per micro-batch).
P is the parameter count (tied head once); W the data-parallel size; "sharded" sizes follow FSDP2,
which pads each parameter's dim 0 up to a multiple of W (``padded_numel``).

The model's parts are computed here; each strategy's terms live in its module (strategies/*.py, the
``cost_setup``/``memory``/``comm`` hooks of its TECHNIQUE) and are summarised below.

Memory parts (``predict_memory``):
- ``params``: fp32 master weights, 4 P (single, DDP) or 4 P_shard (FSDP). ZeRO (Rajbhandari et al.
  2020, sec. 5.1): stage 3 shards parameters, gradients and optimizer state.
- ``grads``: fp32 gradients, 4 P; DDP keeps them in its all-reduce buckets (gradient_as_bucket_view),
  which live for the whole run; FSDP keeps the reduce-scattered shard, 4 P_shard.
- ``optimizer``: AdamW's exp_avg and exp_avg_sq in fp32, 8 P (8 P_shard under FSDP).
- ``autocast_weights``: under autocast, the bf16/fp16 copies of the matmul weights that autocast makes
  and linear layers save for backward, 2 N_mm.
- ``fsdp_unsharded``: FSDP's all-gathered parameters in the compute dtype: the root (embeddings, final
  norm, head) from forward through backward (strategies/fsdp.py never reshards the root), plus two
  blocks in flight (current + prefetched) with resharding, or all blocks without it (ZeRO-2-like) --
  the FSDP2 design (Zhao et al. 2023, "PyTorch FSDP", sec. 3.2-3.3).
- ``activations``: what autograd saves for backward over all blocks, from ``block_activation_bytes``
  (the Korthikanti et al. 2022 accounting, eq. 2, without the s^2 attention terms since SDPA keeps
  only the log-sum-exp, and without dropout masks since dropout is 0), per micro-batch; with full
  checkpointing only each block's input is kept, plus one block's activations recomputed at a time;
  op-level selective checkpointing is predicted as no checkpointing (an upper bound), and compiled
  blocks (which fuse and free differently) are not modelled.
- ``head``: final norm, head input and the fp32 log-softmax output kept for the loss's backward
  (n V 4 bytes), plus the loss backward's two transient fp32 (n, V) buffers and the head weight's
  gradient.
The peak is ``sum(parts)``: at the start of backward every activation, the head's buffers and the
persistent state are alive together (gradients of single-process runs are freed by
zero_grad(set_to_none=True) and grow only while activations are freed, so they are counted as
``max(0, 4P - activations)``).

Communication (``predict_comm``): bytes of the full tensors each collective operates on (nccl-tests'
"size"), summed over one step. DDP: one all-reduce of all fp32 gradients, 4 P, on the last
micro-step. FSDP: per micro-step an all-gather of every unit in forward (padded P in the parameter
dtype) and, when resharding, of every block again in backward; one reduce-scatter of the padded
gradients in the reduce dtype (fp32) on the last micro-step. A ring moves (W-1)/W of an all-gather's
or reduce-scatter's size per rank and 2 (W-1)/W of an all-reduce's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from models.config import GPTConfig
from models.gpt import build_model
from strategies.base import CostContext
from strategies.config import TECHNIQUES, StrategyConfig


def padded_numel(shape: tuple[int, ...], world: int) -> int:
    """Elements of a parameter after FSDP2 pads dim 0 to a multiple of ``world``."""
    rest = math.prod(shape[1:])
    return math.ceil(shape[0] / world) * world * rest


@dataclass
class ParamGroups:
    """Parameter shapes of the model as FSDP groups them: the root (non-block params) and each block."""

    root: list[tuple[int, ...]]
    blocks: list[list[tuple[int, ...]]]
    n_mm: int  # matmul weights (2-D params used in a matmul): autocast copies them

    @property
    def total(self) -> int:
        return sum(math.prod(s) for s in self.root) + sum(math.prod(s) for b in self.blocks for s in b)

    def padded(self, world: int) -> int:
        return sum(padded_numel(s, world) for s in self.root) + sum(padded_numel(s, world) for b in self.blocks
                                                                      for s in b)

    def block_padded(self, i: int, world: int) -> int:
        return sum(padded_numel(s, world) for s in self.blocks[i])


def param_groups(cfg: GPTConfig) -> ParamGroups:
    """Shapes from a meta-device model (no allocation, any size)."""
    model = build_model(cfg, "meta")
    blocks = [[tuple(p.shape) for p in b.parameters()] for b in model.blocks.values()]
    block_ids = {id(p) for b in model.blocks.values() for p in b.parameters()}
    root = [tuple(p.shape) for p in model.parameters() if id(p) not in block_ids]
    lookup_only = ["pos_emb"] + ([] if cfg.tie_embeddings else ["tok_emb"])
    n_mm = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and n.split(".")[0] not in lookup_only)
    return ParamGroups(root, blocks, n_mm)


def block_activation_bytes(cfg: GPTConfig, tokens: int, mode: str, seq_len: int = 0) -> int:
    """Bytes autograd saves for one block's backward, for ``tokens`` tokens.

    ``mode``: 'fp32'; 'autocast' (bf16/fp16 autocast: norms and the residual stream stay fp32, matmul
    inputs and outputs are 16-bit); 'half' (FSDP mixed precision: everything 16-bit except norm
    statistics and the attention log-sum-exp). Per token, d = width, h = MLP hidden, H = heads:

    gpt2: LN1 in (d) + 2 stats, qkv in (d), qkv out (3d: q, k, v are views of it), attention out (d) +
    log-sum-exp (H) -- the out-projection reads the attention output in place (SDPA returns it in
    (B, T, H, hd) layout when q, k, v are views of one qkv tensor, so transpose+contiguous copies
    nothing), LN2 in (d) + 2 stats, fc in (d), GELU in (h), down-proj in (h). Under autocast the
    16-bit casts of the LN outputs replace the fp32 ones as the linears' saved inputs.
    llama: RMSNorm1 in (d) + rsqrt (1) + normalised (d), qkv in (d), qkv out (3d), rotated q and k (2d),
    attention out (d) + lse (H), out-proj in (d), the same norm again (2d + 1) + MLP in (d),
    gate out, SiLU out, up out and their product (4h); in 16-bit modes RoPE's cos/sin tables are cast
    per call (4 tables of seq_len x hd/2 per block, independent of the batch).
    """
    d, h, H = cfg.n_embd, cfg.hidden_dim, cfg.n_head
    lo = 2  # bytes of a 16-bit element
    if cfg.arch == "gpt2":
        if mode == "fp32":
            per_tok = 4 * (8 * d + 2 * h + H + 4)
        elif mode == "autocast":  # fp32: LN inputs (2d) + 4 stats + lse; 16-bit: 6d + 2h
            per_tok = 4 * (2 * d + 4 + H) + lo * (6 * d + 2 * h)
        else:  # 16-bit LN statistics (as on CPU), fp32 lse
            per_tok = lo * (8 * d + 2 * h + 4) + 4 * H
        return per_tok * tokens
    if mode == "fp32":
        per_tok = 4 * (13 * d + 4 * h + H + 2)
    elif mode == "autocast":  # RMSNorms in fp32 (2 x (2d + 1)); the MLP input is cast twice (gate, up)
        per_tok = 4 * (4 * d + 2 + H) + lo * (10 * d + 4 * h)
    else:
        per_tok = 4 * (2 + H) + lo * (13 * d + 4 * h)
    rope_casts = 4 * seq_len * (cfg.head_dim // 2) * lo if mode != "fp32" else 0
    return per_tok * tokens + rope_casts


def head_bytes(cfg: GPTConfig, tokens: int, mode: str) -> dict[str, int]:
    """Saved (final norm, head input, fp32 log-softmax output, int64 inputs/targets) and transient
    (the loss backward's gradient buffers) bytes of the output stage."""
    d, V = cfg.n_embd, cfg.padded_vocab_size
    norm = (2 * d + 1) if cfg.arch == "llama" else (d + 2)
    act = 4 if mode in ("fp32", "autocast") else 2
    saved = tokens * (norm * act + d * (2 if mode != "fp32" else 4) + 4 * V + 16) + 4  # + nll's total_weight
    # the loss backward's grad of the log-softmax output and grad of the fp32 logits, and the head
    # weight's gradient (V x d) that the logits gradient produces while both are alive
    transient = tokens * 2 * 4 * V + V * d * (2 if mode == "half" else 4)
    return {"saved": saved, "transient": transient}


def cost_context(cfg: GPTConfig, s: StrategyConfig, world: int, micro_batch: int, seq_len: int,
                 grad_accum: int = 1, groups: ParamGroups | None = None) -> CostContext:
    """The techniques' view of one run, after every technique's ``cost_setup`` (precision, sharding)."""
    g = groups or param_groups(cfg)
    ctx = CostContext(
        model=cfg, s=s, world=world, micro_batch=micro_batch, seq_len=seq_len, grad_accum=grad_accum,
        P=g.total, n_mm=g.n_mm, L=cfg.n_layer, padded=g.padded,
        root_padded=lambda w: sum(padded_numel(x, w) for x in g.root), block_padded=g.block_padded,
        block_bytes=lambda mode: block_activation_bytes(cfg, micro_batch * seq_len, mode, seq_len),
        resid_bytes=lambda mode: micro_batch * seq_len * cfg.n_embd * (4 if mode != "half" else 2))
    for t in TECHNIQUES:
        t.cost_setup(ctx)
    return ctx


def predict_memory(cfg: GPTConfig, s: StrategyConfig, world: int, micro_batch: int, seq_len: int,
                   groups: ParamGroups | None = None) -> dict[str, int]:
    """Per-rank bytes by part (see the module docstring); ``total`` is the predicted peak. The model's parts
    here, each technique's terms from its own ``memory`` hook (strategies/*.py)."""
    ctx = cost_context(cfg, s, world, micro_batch, seq_len, groups=groups)
    W = ctx.shard_world
    shard = ctx.padded(W) // W if W > 1 else ctx.P
    hb = head_bytes(cfg, ctx.tokens, ctx.mode)
    parts = {"params": 4 * shard, "optimizer": 8 * shard, "autocast_weights": 0, "fsdp_unsharded": 0,
             "activations": ctx.L * ctx.block_bytes(ctx.mode), "head": hb["saved"] + hb["transient"],
             "grads": None}
    for t in TECHNIQUES:
        t.memory(parts, ctx)
    if parts["grads"] is None:  # single process: freed by zero_grad(set_to_none), grow as activations free
        parts["grads"] = max(0, 4 * ctx.P - parts["activations"])
    parts["total"] = sum(parts.values())
    return parts


def predict_comm(cfg: GPTConfig, s: StrategyConfig, world: int, grad_accum: int = 1,
                 groups: ParamGroups | None = None) -> dict[str, int]:
    """Bytes per step per rank by collective (full-tensor sizes; each technique's ``comm`` hook), and ``total``."""
    if world <= 1:
        return {"total": 0}
    ctx = cost_context(cfg, s, world, 1, 1, grad_accum, groups)
    out: dict[str, int] = {}
    for t in TECHNIQUES:
        for name, nbytes in t.comm(ctx).items():
            out[name] = out.get(name, 0) + nbytes
    out["total"] = sum(out.values())
    return out
