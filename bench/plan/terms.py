"""Each technique's cost terms: what it adds to a rank's memory and communication, next to the formulas.

bench/plan/costmodel.py builds one ``CostContext`` per (pipeline) rank of a run, runs every technique's setup
term (precision, sharding, the pipeline's micro-batches in flight), starts the memory parts from the model's
own (parameters, optimizer state, activations, the head) and lets each technique's memory term edit them, and
sums the techniques' communication terms. ``TERMS`` lists them in the order they run (the apply order,
strategies/__init__.py); a technique without a cost has no entry. The runtime code of each technique
(strategies/<name>.py) knows nothing of these: they are the planner's model of it, tested against what the
runs measure (tests/test_costmodel.py, tests/test_mesh.py).

Adding a technique with a cost: its functions here and one ``Terms`` line in ``TERMS`` (docs/strategies.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from models.parts import tp_layout
from strategies.ac import checkpointed_block_ids
from strategies.dp import shard_degree
from strategies.pp import in_flight_chunks, n_microbatches, stage_ids, virtual_stages

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class CostContext:
    """The cost model's view of one run (all sizes per rank). Set by bench/plan/costmodel.py; the techniques'
    setup terms below may change ``mode``, ``shard_world`` and ``param_bytes``.

    P params (elements, this rank's: tp-local, this pipeline stage's), n_mm matmul weights, L blocks held,
    tokens = micro_batch x seq_len per micro-step; ``world`` all ranks, ``dp`` the data-parallel degree;
    ``mode``: activation precision, 'fp32' | 'autocast' | 'half'; ``shard_world``: ranks the parameters
    and optimizer state are sharded over (1 = replicated); ``param_bytes``: bytes per gathered parameter;
    ``padded(world)``, ``root_padded(world)``, ``block_padded(i, world)``: element counts after FSDP-style
    dim-0 padding; ``block_bytes(mode)``: one block's saved activations; ``resid_bytes(mode)``: one
    block's input (what full checkpointing keeps)."""

    model: Any
    s: Any
    world: int
    micro_batch: int
    seq_len: int
    grad_accum: int
    P: int
    n_mm: int
    L: int
    padded: Callable[[int], int]
    root_padded: Callable[[int], int]
    block_padded: Callable[[int, int], int]
    block_bytes: Callable[[str], int]
    resid_bytes: Callable[[str], int]
    mode: str = "fp32"
    shard_world: int = 1
    param_bytes: int = 4
    dp: int = 1  # data-parallel degree: world / (tp x pp)
    tp: int = 1
    pp: int = 1
    pp_rank: int = 0
    block_ids: tuple = ()  # global indices of the blocks this rank holds (all of them without pp)
    has_embedding: bool = True  # this rank holds the first stage (embeddings)
    has_head: bool = True  # ... the last stage (final norm, head, loss)
    replicated_norm: int = 0  # elements of this rank's norm parameters (replicated under tp)
    fused_head: bool = False  # the loss runs through models/loss.py (no logits; its weight cast is transient)
    act_tokens: int = 0  # tokens whose block activations are alive at once (pp: micro-batches in flight)
    head_tokens: int = 0  # ... whose output-stage activations are
    head_step_tokens: int = 0  # tokens of one output-stage backward (its transient buffers)

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


# ---------------------------------------------------------------------------------------------------- pp

def pp_setup(ctx) -> None:
    """Activations held at the peak: the in-flight chunks' tokens (per block of this rank); the output
    stage's: all micro-batches under gpipe, one otherwise (the last stage runs each backward at once)."""
    if ctx.pp == 1:
        return
    s, per_mb = ctx.s, ctx.tokens / n_microbatches(ctx.s)
    ctx.act_tokens = round(per_mb * in_flight_chunks(s, ctx.pp_rank) / virtual_stages(s))
    ctx.head_tokens = ctx.tokens if s.pp_schedule == "gpipe" else round(per_mb)
    ctx.head_step_tokens = round(per_mb)


def pp_memory(parts: dict, ctx) -> None:
    """The last stage's PipelineStage keeps each micro-batch's output (the logits, in the matmul dtype) until
    that micro-batch's backward: one (mb/m, T, V/tp) buffer beside the output stage's usual terms."""
    if ctx.pp > 1 and ctx.has_head:
        parts["head"] += ctx.head_tokens * ctx.model.padded_vocab_size * (4 if ctx.mode == "fp32" else 2) // ctx.tp


def pp_comm(ctx) -> dict:
    """Point-to-point bytes per step of this pipeline rank: per pipeline micro-batch and stage boundary of
    each stage it holds, the hidden states forward (mb/m x T x d) and their gradient backward, in the
    residual stream's dtype (fp32, or 16-bit under FSDP's bf16 policy); a sequence shard of them with sp."""
    if ctx.pp == 1:
        return {}
    s, n_stages = ctx.s, ctx.pp * virtual_stages(ctx.s)
    ids = stage_ids(ctx.pp_rank, ctx.pp, virtual_stages(s))
    inner = sum(1 for i in ids if i < n_stages - 1)  # boundaries after a held stage
    outer = sum(1 for i in ids if i > 0)  # ... before one
    size = ctx.grad_accum * ctx.tokens * ctx.model.n_embd * (2 if ctx.mode == "half" else 4)
    size //= ctx.tp if s.sp else 1
    return {"send": size * (inner + outer), "recv": size * (inner + outer)}


# ---------------------------------------------------------------------------------------------------- tp

def _tp_elem_bytes(mode: str) -> tuple[int, int, int]:
    """Bytes per element of (the column-parallel inputs and their gradients, the row-parallel outputs and
    their gradients, the embedding output) in activation precision ``mode``: fp32 all 4; autocast keeps
    norms and the residual stream in fp32 but the linears' outputs are 16-bit; FSDP's bf16 policy all 2."""
    return {"fp32": (4, 4, 4), "autocast": (4, 2, 4), "half": (2, 2, 2)}[mode]


def tp_comm(ctx) -> dict:
    """Bytes per step this rank's tensor-parallel group moves (full-tensor sizes, as the cost model counts):
    per micro-step of n tokens, with the blocks, embedding and head this rank holds (L blocks):

    - plain TP, all-reduce: forward 2 per block (attention and MLP outputs) + 1 (embedding); backward 1 per
      column-parallel module per block (``TPLayout.column_inputs``: each re-enters its own DTensor) + 1
      (head input); loss_parallel's 3 all-reduces of n fp32 values (max, sum of exp, target logit);
    - SP: all-gather 4 per block (2 forward inputs, 2 backward output gradients) + 1 (head input) + 1
      (embedding gradient); reduce-scatter 4 per block + 1 (head input gradient) + 1 (the family's llama's
      embedding output; gpt2 and HF models all-reduce it and cut it locally); all-reduce: loss 3 x n fp32,
      plus once per step the replicated norm parameters' partial gradients.
    Sizes n d e with e from ``_elem_bytes``."""
    if ctx.tp == 1:
        return {}
    cfg, n, L, ga = ctx.model, ctx.tokens, ctx.L, ctx.grad_accum
    e_in, e_out, e_emb = _tp_elem_bytes(ctx.mode)
    nd, emb, head = n * cfg.n_embd, ctx.has_embedding, ctx.has_head
    loss = 3 * n * 4 if head else 0
    layout = tp_layout(cfg)
    if not ctx.s.sp:
        per_micro = nd * (L * (2 * e_out + layout.column_inputs * e_in) + emb * e_emb + head * e_in) + loss
        return {"all_reduce": ga * per_micro}
    emb_whole = layout.sp_split != "embedding"  # all-reduced whole (positions added, or HF), then cut locally
    gather = nd * (L * 2 * (e_in + e_out) + head * e_in + emb * e_emb)
    scatter = nd * (L * 2 * (e_out + e_in) + head * e_in + (emb and not emb_whole) * e_emb)
    reduce = ga * (nd * (emb and emb_whole) * e_emb + loss) + 4 * ctx.replicated_norm
    return {"all_gather": ga * gather, "reduce_scatter": ga * scatter, "all_reduce": reduce}


# ---------------------------------------------------------------------------------------------------- ac

def ac_memory(parts: dict, ctx) -> None:
    """Full/selective checkpointing keeps each checkpointed block's input instead of its activations, plus, in
    backward, one checkpointed block's recomputed activations at a time: what the block saves minus its input,
    which the checkpoint already holds (``block - resid``; under autocast the recompute also recasts that
    block's weights, inside the ``autocast_weights`` bound: the checkpointed blocks' forward copies are freed
    by then). Measured per block in tests/test_costmodel.py. Op-level is predicted as none (an upper bound)."""
    if ctx.s.ac not in ("full", "selective"):
        return
    ck = len(set(checkpointed_block_ids(ctx.model.n_layer, ctx.s.ac, ctx.s.ac_every)) & set(ctx.block_ids))
    block, resid = ctx.block_bytes(ctx.mode), ctx.resid_bytes(ctx.mode)
    recomputed = block - resid if ck else 0
    parts["activations"] = ck * resid + (ctx.L - ck) * block + recomputed


# ---------------------------------------------------------------------------------------------------- dp

def dp_setup(ctx) -> None:
    if ctx.s.dp == "fsdp":  # FSDP2 shards (and pads) even on one rank; HSDP over dp / dp_replicate ranks
        ctx.shard_world = shard_degree(ctx.s, ctx.dp)
        ctx.param_bytes = BYTES[ctx.s.amp]
        if ctx.s.amp != "fp32":
            ctx.mode = "half"  # MixedPrecisionPolicy: parameters and activations in the 16-bit dtype


def dp_memory(parts: dict, ctx) -> None:
    if ctx.s.dp == "ddp":
        parts["grads"] = 4 * ctx.P  # bucket views, alive all run
    elif ctx.s.dp == "fsdp":
        W = ctx.shard_world
        # a pipeline schedule keeps its stages' blocks unsharded from the first backward to the last
        inflight = ctx.L if (not ctx.s.reshard_after_forward or ctx.pp > 1) else min(2, ctx.L)
        parts["fsdp_unsharded"] = ctx.param_bytes * (ctx.root_padded(W) + sum(ctx.block_padded(i, W)
                                                                              for i in range(inflight)))
        parts["grads"] = 0  # sharded grads appear after reduce-scatter, when activations are gone


def dp_comm(ctx) -> dict:
    """DDP: one all-reduce of the fp32 gradients, 4 P. FSDP (HSDP: within its shard group of W = dp / dp_replicate
    ranks): per micro-step an all-gather of every unit (and of every block again in backward when resharding;
    under a pipeline every pipeline micro-batch's forward gathers the blocks again) in the parameter dtype, and
    one reduce-scatter of the padded fp32 gradients per step."""
    if ctx.world <= 1 or ctx.s.dp == "none":
        return {}
    if ctx.s.dp == "ddp":
        # DDP all-reduces even over a one-rank group (dp = 1 beside tp). (Its one-time broadcast of the
        # rebuilt bucket order on the second iteration is not part of a step.)
        return {"all_reduce": 4 * ctx.P}
    W = ctx.shard_world
    if W <= 1:  # FSDP2 issues nothing on a one-rank shard dimension
        return {}
    padded = ctx.padded(W)
    blocks = sum(ctx.block_padded(i, W) for i in range(ctx.L))
    # Under a pipeline schedule every pipeline micro-batch's forward gathers the (resharded) blocks again,
    # and backward gathers them once (the schedule keeps them unsharded until the last backward).
    forwards = n_microbatches(ctx.s) if ctx.pp > 1 else 1
    per_micro = padded + (forwards - 1) * blocks if ctx.s.reshard_after_forward else padded
    gather = ctx.grad_accum * BYTES[ctx.s.amp] * (per_micro + (blocks if ctx.s.reshard_after_forward else 0))
    return {"all_gather": gather, "reduce_scatter": 4 * padded}  # reduce dtype fp32


def hsdp_comm(ctx) -> dict:
    """HSDP's replicas: once per step each rank all-reduces its reduce-scattered gradient shard (padded P / W
    elements, fp32, the whole padded gradient when W = 1) with the same shard on the other dp_replicate - 1
    replicas."""
    if ctx.s.dp != "fsdp" or ctx.s.dp_replicate <= 1:
        return {}
    W = ctx.shard_world
    return {"all_reduce": 4 * ctx.padded(W) // W}


# ---------------------------------------------------------------------------------------------------- amp

def amp_setup(ctx) -> None:
    """Autocast (when no sharding technique already set a 16-bit mode): 16-bit matmul inputs and outputs."""
    if ctx.s.amp != "fp32" and ctx.mode == "fp32":
        ctx.mode = "autocast"


def amp_memory(parts: dict, ctx) -> None:
    """Autocast keeps 16-bit copies of the matmul weights (made per forward, saved for backward): 2 n_mm; the
    fused loss (models/loss.py) casts the head inside its forward and keeps no copy: 2 (n_mm - V d) then."""
    if ctx.mode == "autocast":
        head = ctx.model.padded_vocab_size * ctx.model.n_embd if ctx.fused_head and ctx.has_head else 0
        parts["autocast_weights"] = 2 * (ctx.n_mm - head)


def _nothing(*_args) -> None:
    return None


@dataclass(frozen=True)
class Terms:
    """One technique's cost terms: ``setup(ctx)`` may change the context's precision and sharding; ``memory(parts,
    ctx)`` edits the per-rank bytes by part; ``comm(ctx)`` gives its bytes per step by collective; ``group(ctx)``
    the ranks its collectives ring over (a ring's n)."""

    name: str
    setup: Callable = _nothing
    memory: Callable = _nothing
    comm: Callable = field(default=lambda ctx: {})
    group: Callable = field(default=lambda ctx: ctx.world)


TERMS: list[Terms] = [
    Terms("pp", setup=pp_setup, memory=pp_memory, comm=pp_comm, group=lambda ctx: 2),  # point to point
    Terms("tp", comm=tp_comm, group=lambda ctx: ctx.tp),
    Terms("ac", memory=ac_memory),
    # data parallelism rings over the dp ranks (HSDP's shards: a shard group): beside tp on one data-parallel rank
    # nothing crosses a link; HSDP's replicas all-reduce across the dp_replicate groups
    Terms("dp", setup=dp_setup, memory=dp_memory, comm=dp_comm,
          group=lambda ctx: ctx.shard_world if ctx.s.dp == "fsdp" else ctx.dp),
    Terms("hsdp", comm=hsdp_comm, group=lambda ctx: ctx.s.dp_replicate),
    Terms("amp", setup=amp_setup, memory=amp_memory),
]
