"""Predicted per-rank memory and communication per step, from the model config and strategy alone.

Everything is per rank, in bytes, for one optimizer step of ``grad_accum`` micro-batches of
``micro_batch`` sequences of ``seq_len`` tokens (n = micro_batch * seq_len tokens per micro-batch).
P is the parameter count (tied head once); W the data-parallel size; "sharded" sizes follow FSDP2,
which pads each parameter's dim 0 up to a multiple of W (``padded_numel``).

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
from strategies.config import StrategyConfig

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


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
    blocks = [[tuple(p.shape) for p in b.parameters()] for b in model.blocks]
    block_ids = {id(p) for b in model.blocks for p in b.parameters()}
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


def activation_mode(s: StrategyConfig) -> str:
    if s.amp == "fp32":
        return "fp32"
    return "half" if s.dp == "fsdp" else "autocast"


def predict_memory(cfg: GPTConfig, s: StrategyConfig, world: int, micro_batch: int, seq_len: int,
                   groups: ParamGroups | None = None) -> dict[str, int]:
    """Per-rank bytes by part (see the module docstring); ``total`` is the predicted peak."""
    g = groups or param_groups(cfg)
    P, W = g.total, (world if s.dp == "fsdp" else 1)
    n = micro_batch * seq_len
    mode = activation_mode(s)
    L = cfg.n_layer
    parts = {}
    shard = g.padded(W) // W if s.dp == "fsdp" else P
    parts["params"] = 4 * shard
    parts["optimizer"] = 8 * shard
    parts["autocast_weights"] = 2 * g.n_mm if mode == "autocast" else 0
    pbytes = BYTES[s.amp] if s.dp == "fsdp" else 4
    if s.dp == "fsdp":  # FSDP2 keeps unsharded copies even on one rank
        root = sum(padded_numel(x, W) for x in g.root)
        inflight = L if not s.reshard_after_forward else min(2, L)
        parts["fsdp_unsharded"] = pbytes * (root + sum(g.block_padded(i, W) for i in range(inflight)))
    else:
        parts["fsdp_unsharded"] = 0
    block = block_activation_bytes(cfg, n, mode, seq_len)
    resid = n * cfg.n_embd * (4 if mode != "half" else 2)
    if s.ac in ("full", "selective"):
        ck = L if s.ac == "full" else len(range(0, L, s.ac_every))
        acts = ck * resid + (L - ck) * block + block  # one block recomputed at a time in backward
    else:
        acts = L * block
    parts["activations"] = acts
    hb = head_bytes(cfg, n, mode)
    parts["head"] = hb["saved"] + hb["transient"]
    if s.dp == "ddp":
        parts["grads"] = 4 * P  # bucket views, alive all run
    elif s.dp == "fsdp":
        parts["grads"] = 0  # sharded grads appear after reduce-scatter, when activations are gone
    else:
        parts["grads"] = max(0, 4 * P - acts)
    parts["total"] = sum(parts.values())
    return parts


def predict_comm(cfg: GPTConfig, s: StrategyConfig, world: int, grad_accum: int = 1,
                 groups: ParamGroups | None = None) -> dict[str, int]:
    """Bytes per step per rank by collective (full-tensor sizes), and ``total``."""
    if world <= 1 or s.dp == "none":
        return {"total": 0}
    g = groups or param_groups(cfg)
    if s.dp == "ddp":
        return {"all_reduce": 4 * g.total, "total": 4 * g.total}
    pbytes = BYTES[s.amp]
    padded = g.padded(world)
    blocks = sum(g.block_padded(i, world) for i in range(cfg.n_layer))
    gather = grad_accum * pbytes * (padded + (blocks if s.reshard_after_forward else 0))
    scatter = 4 * padded  # reduce dtype fp32
    return {"all_gather": gather, "reduce_scatter": scatter, "total": gather + scatter}
