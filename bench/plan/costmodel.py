"""Predicted per-rank memory and communication per step, from the model config and strategy alone.

Everything is per rank, in bytes, for one optimizer step of ``grad_accum`` micro-batches of
``micro_batch`` sequences of ``seq_len`` tokens (n = micro_batch * seq_len tokens per micro-batch).
P is the parameter count (tied head once); W the data-parallel size; "sharded" sizes follow FSDP2,
which pads each parameter's dim 0 up to a multiple of W (``padded_numel``).

The model's parts are computed here; each technique's terms live in bench/plan/terms.py (its setup, memory and
communication functions, each with its formula) and are summarised below.

Memory parts (``predict_memory``):
- ``params``: fp32 master weights, 4 P (single, DDP) or 4 P_shard (FSDP). ZeRO (Rajbhandari et al.
  2020, sec. 5.1): stage 3 shards parameters, gradients and optimizer state.
- ``grads``: fp32 gradients, 4 P; DDP keeps them in its all-reduce buckets (gradient_as_bucket_view),
  which live for the whole run; FSDP keeps the reduce-scattered shard, 4 P_shard.
- ``optimizer``: AdamW's exp_avg and exp_avg_sq in fp32, 8 P (8 P_shard under FSDP).
- ``autocast_weights``: under autocast, the bf16/fp16 copies of the matmul weights that autocast makes
  and linear layers save for backward, 2 N_mm (less the head's under the fused loss: its cast is transient).
- ``fsdp_unsharded``: FSDP's all-gathered parameters in the compute dtype: the root (embeddings, final
  norm, head) from forward through backward (strategies/fsdp.py never reshards the root), plus two
  blocks in flight (current + prefetched) with resharding, or all blocks without it (ZeRO-2-like) --
  the FSDP2 design (Zhao et al. 2023, "PyTorch FSDP", sec. 3.2-3.3).
- ``activations``: what autograd saves for backward over all blocks, from ``block_activation_bytes``
  (the Korthikanti et al. 2022 accounting, eq. 2, without the s^2 attention terms since SDPA keeps
  only the log-sum-exp, and without dropout masks since dropout is 0), per micro-batch; with full
  checkpointing only each block's input is kept, plus one block's activations recomputed at a time
  (less its input, which the checkpoint holds);
  op-level selective checkpointing is predicted as no checkpointing (an upper bound), and compiled
  blocks (which fuse and free differently) are not modelled.
- ``head``: final norm, head input and the fp32 log-softmax output kept for the loss's backward
  (n V 4 bytes), plus the loss backward's two transient fp32 (n, V) buffers and the head weight's
  gradient; with the fused, chunked loss (``model.loss_chunk``) no (n, V) tensor: the two gradients it
  computes in forward (n d and V d) and one (chunk, V) block (``head_bytes``).
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

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from bench.plan.terms import TERMS, CostContext
from models.config import GPTConfig
from models.gpt import param_shapes as gpt_param_shapes
from models.weights import to_hf
from strategies.config import StrategyConfig
from strategies.mesh import mesh_shape
from strategies.pp import stage_blocks, stage_ids, virtual_stages
from strategies.tp import tp_local_shape


def padded_numel(shape: tuple[int, ...], world: int) -> int:
    """Elements of a parameter after FSDP2 pads dim 0 to a multiple of ``world``."""
    rest = math.prod(shape[1:])
    return math.ceil(shape[0] / world) * world * rest


_SHAPES: dict = {}  # the config's fields -> its shapes list: one list per model, so ``param_groups`` caches hit


def param_shapes(cfg: GPTConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, global shape) of every parameter, from the config (models/gpt.py ``param_shapes``: no module, any
    size). Names are the family's; for the Hugging Face implementation each is listed with the shape(s) HF stores
    it in (models/weights.py ``to_hf`` on shape-only meta tensors: GPT-2's transposed Conv1D weights, Llama's
    three q/k/v projections), which is what FSDP pads and moves. The same list for the same config (cached)."""
    key = dataclasses.astuple(cfg)
    if key not in _SHAPES:
        if len(_SHAPES) > 64:
            _SHAPES.clear()
        _SHAPES[key] = _param_shapes(cfg)
    return _SHAPES[key]


def _param_shapes(cfg: GPTConfig) -> list[tuple[str, tuple[int, ...]]]:
    native = gpt_param_shapes(cfg)
    if cfg.source == "native":
        return native
    return [(name, tuple(t.shape)) for name, shape in native
            for _, t in to_hf(cfg, name, torch.empty(shape, device="meta"))]


@dataclass
class ParamGroups:
    """This rank's parameter shapes as FSDP groups them: the root (non-block params) and each block,
    after tensor parallelism (each split matrix's local shape) and the pipeline split (only the blocks,
    embedding and head of this rank's stages)."""

    root: list[tuple[int, ...]]
    blocks: list[list[tuple[int, ...]]]
    n_mm: int  # matmul weights (2-D params used in a matmul): autocast copies them
    replicated_norm: int = 0  # elements of norm parameters (replicated under TP): SP all-reduces their grads
    block_ids: tuple[int, ...] = ()  # global indices of the blocks held
    _padded: dict = field(default_factory=dict, repr=False, compare=False)  # world -> ``_sums``

    @classmethod
    def build(cls, cfg: GPTConfig, shapes: list[tuple[str, tuple[int, ...]]], tp: int = 1,
              stages: tuple[int, ...] = (0,), n_stages: int = 1) -> ParamGroups:
        held = {i for st in stages for i in stage_blocks(cfg.n_layer, n_stages)[st]}
        first, last = 0 in stages, n_stages - 1 in stages
        root, blocks, n_mm, norm = [], {}, 0, 0
        lookup_only = ("pos_emb",) + (() if cfg.tie_embeddings else ("tok_emb",))
        for name, shape in shapes:
            top = name.split(".")[0]
            if top == "blocks":
                i = int(name.split(".")[1])
                if i not in held:
                    continue
            elif (top in ("tok_emb", "pos_emb") and not first) or (top in ("norm_f", "lm_head") and not last):
                continue
            if cfg.tie_embeddings and top == "tok_emb" and not first:
                continue
            local = tp_local_shape(name, shape, tp)
            (blocks.setdefault(int(name.split(".")[1]), []) if top == "blocks" else root).append(local)
            if len(shape) == 2 and top not in lookup_only:
                n_mm += math.prod(local)
            if ".norm" in f".{name}" and len(shape) == 1:
                norm += math.prod(local)
        ids = tuple(sorted(blocks))
        return cls(root, [blocks[i] for i in ids], n_mm, norm, ids)

    @property
    def total(self) -> int:
        return sum(math.prod(s) for s in self.root) + sum(math.prod(s) for b in self.blocks for s in b)

    def padded(self, world: int) -> int:
        return self._sums(world)[0]

    def block_padded(self, i: int, world: int) -> int:
        return self._sums(world)[1][i]

    def _sums(self, world: int) -> tuple[int, list[int]]:
        """(all padded elements, each block's) for ``world`` shards, computed once per world (the planner asks
        for the same few thousands of times)."""
        if world not in self._padded:
            blocks = [sum(padded_numel(s, world) for s in b) for b in self.blocks]
            self._padded[world] = (sum(padded_numel(s, world) for s in self.root) + sum(blocks), blocks)
        return self._padded[world]


_GROUPS: dict = {}  # (id of a shapes list, tp, stages, n_stages) -> ParamGroups: the planner asks often


def param_groups(cfg: GPTConfig, s: StrategyConfig | None = None, world: int = 1, pp_rank: int = 0,
                 shapes: list | None = None) -> ParamGroups:
    """This rank's ParamGroups under strategy ``s`` on ``world`` ranks (the whole model without ``s``).
    Results are cached per shapes list (``param_shapes``'s, or the one given)."""
    if shapes is None:
        shapes = param_shapes(cfg)  # cached: the same list for the same config
    if s is None:
        key = (id(shapes), 1, (0,), 1)
    else:
        shape = mesh_shape(s, world)
        v = virtual_stages(s) if shape.pp > 1 else 1
        key = (id(shapes), shape.tp, tuple(stage_ids(pp_rank, shape.pp, v)), shape.pp * v)
    if key not in _GROUPS:
        if len(_GROUPS) > 4096:
            _GROUPS.clear()
        _GROUPS[key] = (shapes, ParamGroups.build(cfg, shapes, *key[1:]))  # holding shapes keeps its id unique
    return _GROUPS[key][1]


def block_activation_bytes(cfg: GPTConfig, tokens: int, mode: str, seq_len: int = 0, tp: int = 1,
                           sp: bool = False) -> int:
    """Bytes autograd saves for one block's backward, for ``tokens`` tokens, on one tensor-parallel rank.

    ``mode``: 'fp32'; 'autocast' (bf16/fp16 autocast: norms and the residual stream stay fp32, matmul
    inputs and outputs are 16-bit); 'half' (FSDP mixed precision: everything 16-bit except norm
    statistics and the attention log-sum-exp). Per token, d = width, h = MLP hidden, H = heads:

    gpt2: LN1 in (d) + 2 stats, qkv in (d), qkv out (3d: q, k, v are views of it), attention out (d) +
    log-sum-exp (H) -- the out-projection reads the attention output in place (SDPA returns it in
    (B, T, H, hd) layout when q, k, v are views of one qkv tensor, so transpose+reshape copies
    nothing), LN2 in (d) + 2 stats, fc in (d), GELU in (h), down-proj in (h). Under autocast the
    16-bit casts of the LN outputs replace the fp32 ones as the linears' saved inputs.
    llama: RMSNorm1 in (d) + rsqrt (1) + normalised (d), qkv in (d), qkv out (3d), rotated q and k (2d),
    attention out (d) + lse (H), out-proj in (d), the same norm again (2d + 1) + MLP in (d),
    gate out, SiLU out, up out and their product (4h); in 16-bit modes RoPE's cos/sin tables are cast
    per call (4 tables of seq_len x hd/2 per block, independent of the batch).

    Tensor parallelism (strategies/tp.py) splits each term by where it lives: inside attention and the
    MLP ('s': heads and MLP width are split) 1/tp; the norms ('q') 1/tp only with sequence parallelism;
    the column-parallel linears' inputs ('r': the full, all-gathered sequence) whole.
    """
    d, h, H = cfg.n_embd, cfg.hidden_dim, cfg.n_head
    lo = 2  # bytes of a 16-bit element
    # (elements per token, bytes per element, split) for each saved tensor
    if cfg.arch == "gpt2":
        norm_b, stat_b, mm_b = {"fp32": (4, 4, 4), "autocast": (4, 4, lo), "half": (lo, lo, lo)}[mode]
        terms = [(2 * d, norm_b, "q"), (4, stat_b, "q"), (2 * d, mm_b, "r"), (4 * d + 2 * h, mm_b, "s"),
                 (H, 4, "s")]
    else:
        norm_b, stat_b, mm_b = {"fp32": (4, 4, 4), "autocast": (4, 4, lo), "half": (lo, 4, lo)}[mode]
        mlp_in = 2 * d if mode == "autocast" else d  # autocast casts the MLP input twice (gate, up)
        # qkv in and MLP in are the norms' outputs in fp32/half (counted with the norms there)
        norms, inputs = (4 * d, d + mlp_in) if mode == "autocast" else (4 * d + 0, 2 * d)
        terms = [(norms, norm_b, "q"), (2, stat_b, "q"), (inputs, mm_b, "r"), (7 * d + 4 * h, mm_b, "s"),
                 (H, 4, "s")]
    split = {"s": tp, "q": tp if sp else 1, "r": 1}
    per_tok = sum(n * b / split[kind] for n, b, kind in terms)
    rope_casts = 4 * seq_len * (cfg.head_dim // 2) * lo if (mode != "fp32" and cfg.arch == "llama") else 0
    return round(per_tok * tokens) + rope_casts


def fused_loss(cfg: GPTConfig, s: StrategyConfig, tp: int, pp: int) -> bool:
    """Whether the training loss runs through the fused, chunked head (models/gpt.py ``head_loss``): with
    ``model.loss_chunk``, except under tp (loss_parallel), pp (the last stage hands logits to the schedule)
    and compile (torch.compile traces the plain path, which inductor fuses itself); never for the Hugging Face
    implementation (``model.source=hf``: HF's head materialises the logits)."""
    return bool(cfg.loss_chunk) and cfg.source == "native" and tp == 1 and pp == 1 and not s.compile


def head_bytes(cfg: GPTConfig, tokens: int, mode: str, tp: int = 1, sp: bool = False,
               fused: bool | None = None) -> dict[str, int]:
    """Saved (final norm, head input, fp32 log-softmax output, int64 inputs/targets) and transient
    (the loss backward's gradient buffers) bytes of the output stage, on one tensor-parallel rank (the
    vocabulary is split over tp; the norm over tp with sp; the head input is the full sequence).

    With the fused, chunked loss (``fused``; None = ``cfg.loss_chunk`` and tp == 1; see ``fused_loss``) no
    logits are kept: saved are the norm's
    tensors, the head input's gradient (tokens x d, the input's dtype), the weight's gradient (V x d,
    fp32) and the int64 inputs; transient the larger of one chunk's (chunk, V) fp32 block (plus its
    16-bit logits and gradient copies outside fp32) in forward and, in backward, the scaled copies of
    the two stored gradients."""
    d, V = cfg.n_embd, cfg.padded_vocab_size
    norm = (2 * d + 1) if cfg.arch == "llama" else (d + 2)
    act = 4 if mode in ("fp32", "autocast") else 2
    norm_split = tp if sp else 1
    if (bool(cfg.loss_chunk) and cfg.source == "native" and tp == 1) if fused is None else fused:
        c = min(cfg.loss_chunk, tokens)
        saved = tokens * (norm * act + d * act + 8) + 4 * V * d
        forward = c * V * (4 + (0 if mode == "fp32" else 4))
        backward = 4 * V * d + tokens * d * act
        return {"saved": round(saved), "transient": round(max(forward, backward))}
    saved = tokens * (norm * act / norm_split + d * (2 if mode != "fp32" else 4) + 4 * V / tp + 16) + 4
    # the loss backward's grad of the log-softmax output and grad of the fp32 logits, and the head
    # weight's gradient (V x d) that the logits gradient produces while both are alive; under tp,
    # loss_parallel's log-softmax over the vocabulary shard holds one more (n, V/tp) fp32 buffer (the
    # shifted logits beside their exp) at its forward peak (measured on CPU: +98 MiB on mini, tp=2)
    buffers = 3 if tp > 1 else 2
    transient = tokens * buffers * 4 * V / tp + V * d * (2 if mode == "half" else 4) / tp
    return {"saved": round(saved), "transient": round(transient)}


def cost_context(cfg: GPTConfig, s: StrategyConfig, world: int, micro_batch: int, seq_len: int,
                 grad_accum: int = 1, groups: ParamGroups | None = None, pp_rank: int = 0,
                 shapes: list | None = None) -> CostContext:
    """The techniques' view of pipeline rank ``pp_rank`` of one run, after every technique's ``cost_setup``
    (precision, sharding, the pipeline's micro-batches in flight)."""
    shape = mesh_shape(s, world)
    g = groups or param_groups(cfg, s, world, pp_rank, shapes)
    ctx = CostContext(
        model=cfg, s=s, world=world, micro_batch=micro_batch, seq_len=seq_len, grad_accum=grad_accum,
        P=g.total, n_mm=g.n_mm, L=len(g.blocks), padded=g.padded,
        root_padded=lambda w: sum(padded_numel(x, w) for x in g.root), block_padded=g.block_padded,
        block_bytes=lambda mode: block_activation_bytes(cfg, ctx.act_tokens, mode, seq_len, ctx.tp, ctx.s.sp),
        resid_bytes=lambda mode: round(ctx.act_tokens * cfg.n_embd * (4 if mode != "half" else 2)
                                       / (ctx.tp if ctx.s.sp else 1)),
        dp=shape.dp, tp=shape.tp, pp=shape.pp, pp_rank=pp_rank, block_ids=g.block_ids,
        has_embedding=shape.pp == 1 or 0 in stage_ids(pp_rank, shape.pp, virtual_stages(s)),
        has_head=shape.pp == 1 or shape.pp * virtual_stages(s) - 1 in stage_ids(pp_rank, shape.pp,
                                                                                  virtual_stages(s)),
        replicated_norm=g.replicated_norm, fused_head=fused_loss(cfg, s, shape.tp, shape.pp))
    ctx.act_tokens = ctx.head_tokens = ctx.head_step_tokens = ctx.tokens
    for t in TERMS:
        t.setup(ctx)
    return ctx


def _pp_ranks(s: StrategyConfig, world: int, pp_rank: int | None) -> list[int]:
    """The pipeline ranks to evaluate: ``pp_rank``, or the candidates for the extremes: the first (most
    micro-batches in flight, the embedding, the longest stage), the second (two stage boundaries) and
    the last (the output stage)."""
    pp = mesh_shape(s, world).pp
    return sorted({0, min(1, pp - 1), pp - 1}) if pp_rank is None else [pp_rank]


def predict_memory(cfg: GPTConfig, s: StrategyConfig, world: int, micro_batch: int, seq_len: int,
                   groups: ParamGroups | None = None, pp_rank: int | None = None,
                   shapes: list | None = None) -> dict[str, int]:
    """Per-rank bytes by part (see the module docstring); ``total`` is the predicted peak. The model's parts
    here, each technique's terms from bench/plan/terms.py. Under pipeline
    parallelism ranks differ: the pipeline rank ``pp_rank``, or (None) the one with the largest peak."""
    if groups is not None and mesh_shape(s, world).pp * mesh_shape(s, world).tp > 1:
        groups = None  # whole-model groups do not describe a tensor- or pipeline-parallel rank
    shapes = shapes if shapes is not None or groups is not None else param_shapes(cfg)
    best: dict[str, int] = {}
    for rank in _pp_ranks(s, world, pp_rank):
        ctx = cost_context(cfg, s, world, micro_batch, seq_len, groups=groups, pp_rank=rank, shapes=shapes)
        W = ctx.shard_world
        shard = ctx.padded(W) // W if W > 1 else ctx.P
        # the output stage: what its micro-batches in flight saved, and one backward's transients
        head = (head_bytes(cfg, ctx.head_tokens, ctx.mode, ctx.tp, s.sp, ctx.fused_head)["saved"]
                + head_bytes(cfg, ctx.head_step_tokens, ctx.mode, ctx.tp, s.sp, ctx.fused_head)["transient"]) \
            if ctx.has_head else 0
        parts = {"params": 4 * shard, "optimizer": 8 * shard, "autocast_weights": 0, "fsdp_unsharded": 0,
                 "activations": ctx.L * ctx.block_bytes(ctx.mode), "head": head,
                 "grads": None}
        for t in TERMS:
            t.memory(parts, ctx)
        if parts["grads"] is None:  # single process: freed by zero_grad(set_to_none), grow as activations free
            parts["grads"] = max(0, 4 * ctx.P - parts["activations"])
        parts["total"] = sum(parts.values())
        if parts["total"] > best.get("total", -1):
            best = parts
    return best


def comm_by_technique(cfg: GPTConfig, s: StrategyConfig, world: int, grad_accum: int = 1,
                      groups: ParamGroups | None = None, micro_batch: int = 1, seq_len: int = 0,
                      pp_rank: int | None = None, shapes: list | None = None,
                      without: tuple = ()) -> dict[str, tuple[int, dict[str, int]]]:
    """Per technique that communicates (bench/plan/terms.py): (the ranks in its collectives -- its ``group``: the
    data-parallel degree, the tensor-parallel degree, 2 for a pipeline's point-to-point sends -- and its bytes per
    step per rank by collective, full-tensor sizes, from its ``comm`` term). Tensor and pipeline parallelism move
    activations, so their terms need ``micro_batch`` and ``seq_len`` (0 = the model's context). Pipeline ranks
    differ: ``pp_rank``, or (None) the one that moves most in all. ``without``: names of techniques to leave
    out (the step model's measured tensor parallelism)."""
    if world <= 1:
        return {}
    if groups is not None and mesh_shape(s, world).pp * mesh_shape(s, world).tp > 1:
        groups = None
    shapes = shapes if shapes is not None or groups is not None else param_shapes(cfg)
    best: dict[str, tuple[int, dict[str, int]]] = {}
    most = -1
    for rank in _pp_ranks(s, world, pp_rank):
        ctx = cost_context(cfg, s, world, micro_batch, seq_len or cfg.block_size, grad_accum, groups, rank, shapes)
        out = {t.name: (t.group(ctx), t.comm(ctx)) for t in TERMS if t.name not in without}
        out = {name: (n, kinds) for name, (n, kinds) in out.items() if kinds}
        total = sum(sum(kinds.values()) for _, kinds in out.values())
        if total > most:
            best, most = out, total
    return best


def predict_comm(cfg: GPTConfig, s: StrategyConfig, world: int, grad_accum: int = 1,
                 groups: ParamGroups | None = None, micro_batch: int = 1, seq_len: int = 0,
                 pp_rank: int | None = None, shapes: list | None = None, without: tuple = ()) -> dict[str, int]:
    """Bytes per step per rank by collective (full-tensor sizes, every technique's summed: ``comm_by_technique``
    with the same arguments), and ``total``."""
    out: dict[str, int] = {}
    for _, kinds in comm_by_technique(cfg, s, world, grad_accum, groups, micro_batch, seq_len, pp_rank, shapes,
                                      without).values():
        for name, nbytes in kinds.items():
            out[name] = out.get(name, 0) + nbytes
    out["total"] = sum(out.values())
    return out
