"""Tensor parallelism (Megatron-LM style) with optional sequence parallelism, on the mesh's ``tp`` dimension.

PyTorch's own SPMD machinery does the work (``parallelize_module`` with DTensor styles); nothing here
issues a collective by hand. Per block (torchtitan's plan for the same layout):

- ``attn.qkv``, ``mlp.fc`` (and ``mlp.gate``): ``ColwiseParallel`` -- weight rows split, so each rank
  holds whole heads (the fused q/k/v rows are head-major, models/gpt.py) and a slice of the MLP width;
- ``attn.proj``, ``mlp.proj``: ``RowwiseParallel`` -- the partial outputs are summed: an all-reduce
  (plain TP) or a reduce-scatter along the sequence (SP);
- with ``sp``: ``norm1``/``norm2`` run ``SequenceParallel`` on a sequence shard of the residual stream,
  and the attention/MLP inputs are all-gathered back to the full sequence (``PrepareModuleInput``).

Around the blocks: the token embedding is vocabulary-parallel (``RowwiseParallel`` on the embedding:
rows split, the partial lookups summed); the LM head (tied: the same Shard(0) matrix) produces logits
sharded along the vocabulary, and the loss runs under ``loss_parallel`` (``maybe_loss_parallel``, which
the training step enters for forward *and* backward), so no rank ever holds the full (B, T, V) logits.
With sp and learned positions (gpt2) the embedding output is all-reduced, the positions added, and the
sum split along the sequence locally; llama's embedding output is reduce-scattered straight into the
sequence shard.

Costs (bench/plan/costmodel.py's terms, per micro-batch of n tokens, element size e of the activations):
plain TP moves 2 all-reduces of n d e per block forward and 2 in backward, plus one for the embedding
and one for the head's input gradient; SP replaces each all-reduce by an all-gather + reduce-scatter of
the same size (half a ring all-reduce's traffic each). Parameters, gradients and optimizer state of the
split matrices are 1/tp per rank; activations inside attention and the MLP are 1/tp, and with SP the
norms and the residual stream are 1/tp too.
"""

from __future__ import annotations

import contextlib

from torch import nn

from strategies.base import Field, StrategyError, Technique

# Where each parameter is split (the plan below): column-parallel modules split dim 0 (output rows, or the
# vocabulary of the embedding), row-parallel weights split dim 1 (their biases stay whole); the rest
# (norms, positions) is replicated.
_COLWISE = ("attn.qkv", "mlp.fc", "mlp.gate", "lm_head", "tok_emb")
_ROWWISE = ("attn.proj", "mlp.proj")


def tp_local_shape(name: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """The shape of parameter ``name`` on one tensor-parallel rank (the cost model's view of the plan)."""
    if tp == 1:
        return shape
    module, kind = name.rsplit(".", 1)
    if module.endswith(_COLWISE):
        return (shape[0] // tp, *shape[1:])
    if module.endswith(_ROWWISE) and kind == "weight":
        return (shape[0], shape[1] // tp)
    return shape


def _block_plan(block: nn.Module, sp: bool) -> dict:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel
    resid = Shard(1) if sp else Replicate()  # layout of the residual stream between sub-layers
    plan = {
        "attn.qkv": ColwiseParallel(),
        "attn.proj": RowwiseParallel(output_layouts=resid),
        "mlp.fc": ColwiseParallel(),
        "mlp.proj": RowwiseParallel(output_layouts=resid),
    }
    if block.mlp.gate is not None:
        plan["mlp.gate"] = ColwiseParallel()
    if sp:
        plan.update({
            "norm1": SequenceParallel(),
            "norm2": SequenceParallel(),
            "attn": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        })
    return plan


def _replicate_output(mesh):
    """Forward hook: the final norm's output as a Replicate DTensor, the input the vocabulary-sharded head
    needs (an all-gather along the sequence under SP; a local wrap otherwise)."""

    from torch.distributed.tensor import DTensor, Replicate

    def hook(_module, _inputs, out):
        if isinstance(out, DTensor):
            return out.redistribute(placements=[Replicate()])
        return DTensor.from_local(out, mesh, [Replicate()], run_check=False)

    return hook


def apply_tp(model: nn.Module, tp_mesh, sp: bool) -> nn.Module:
    """Parallelize the (meta-device) model in place over ``tp_mesh``; see the module docstring."""
    # imported here: the planner and the cost model load this module without needing the machinery
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )
    top = {}
    if model.tok_emb is not None:  # a pipeline stage may own neither end (strategies/pp.py)
        learned_positions = model.pos_emb is not None
        emb_out = Shard(1) if sp and not learned_positions else Replicate()
        top["tok_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=emb_out)
        if sp and learned_positions:  # positions added to the full sequence, then each rank keeps its shard
            top["drop"] = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                             use_local_output=True)
    if model.lm_head is not None:
        top["lm_head"] = ColwiseParallel()  # only its weight's layout matters: head_loss uses it functionally
    if model.norm_f is not None and sp:
        top["norm_f"] = SequenceParallel()
    if top:
        parallelize_module(model, tp_mesh, top)
    for block in model.blocks.values():
        parallelize_module(block, tp_mesh, _block_plan(block, sp))
    if model.norm_f is not None:
        model.norm_f.register_forward_hook(_replicate_output(tp_mesh))
    return model


def finalize_grads(model: nn.Module) -> None:
    """All-reduce, once per step, the partial gradients of replicated parameters used on a sequence shard
    (SP norms, row-parallel biases): left Partial, every optimizer op that reads one would redistribute
    it again (AdamW reads each twice). Megatron-LM's ``finalize_model_grads`` does the same for its
    sequence-parallel norms. Under FSDP this is a no-op: its reduce-scatter resolves them."""
    from torch.distributed.tensor import DTensor, Replicate  # between steps; a cached module lookup

    for p in model.parameters():
        g = p.grad
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            p.grad = g.redistribute(placements=[Replicate()] * len(g.placements))


def maybe_loss_parallel(s):
    """The context the training step's forward *and* backward run in: ``loss_parallel`` under TP (cross
    entropy over vocabulary-sharded logits), else nothing."""
    if s.tp == 1:
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()


def _validate(s) -> None:
    if s.tp < 1:
        raise StrategyError(f"strategy.tp={s.tp} is invalid; must be >= 1 (1 = no tensor parallelism)")
    if s.sp and s.tp == 1:
        raise StrategyError("strategy.sp=true needs strategy.tp >= 2 (sequence parallelism splits the norms "
                            "across the tensor-parallel ranks)")


def validate_run(s, model_cfg, seq_len: int, micro_batch: int) -> None:
    """Shape checks: tp must divide the heads, the MLP width and the padded vocabulary, and (with sp) the
    sequence; dropout must be 0 (TP would need a per-rank RNG tracker)."""
    if s.tp == 1:
        return
    if getattr(model_cfg, "source", "native") != "native":
        raise StrategyError(f"strategy.tp={s.tp} with model.source={model_cfg.source}: tensor parallelism is built "
                            "for the family's model only; use model.source=native (same weights, models/convert.py)")
    checks = [("model.n_head", model_cfg.n_head), ("MLP width (model.mlp_hidden)", model_cfg.hidden_dim),
              ("padded vocabulary (model.vocab_size / model.pad_vocab_to)", model_cfg.padded_vocab_size)]
    if s.sp:
        checks.append(("seq_len", seq_len))
    for what, value in checks:
        if value % s.tp:
            raise StrategyError(f"strategy.tp={s.tp} does not divide {what}={value}; choose a tp that divides it")
    if model_cfg.dropout > 0:
        raise StrategyError(f"strategy.tp={s.tp} with model.dropout={model_cfg.dropout}: dropout under tensor "
                            "parallelism is not supported; use model.dropout=0")


def _validate_for(s, device_type: str, world_size: int) -> None:
    if s.tp > 1 and world_size % s.tp:
        raise StrategyError(f"strategy.tp={s.tp} does not divide the world size {world_size}; "
                            f"launch a multiple of {s.tp} processes")


def _name(s) -> str | None:
    if s.tp == 1:
        return None
    return f"tp{s.tp}" + ("+sp" if s.sp else "")


def _elem_bytes(mode: str) -> tuple[int, int, int]:
    """Bytes per element of (the column-parallel inputs and their gradients, the row-parallel outputs and
    their gradients, the embedding output) in activation precision ``mode``: fp32 all 4; autocast keeps
    norms and the residual stream in fp32 but the linears' outputs are 16-bit; FSDP's bf16 policy all 2."""
    return {"fp32": (4, 4, 4), "autocast": (4, 2, 4), "half": (2, 2, 2)}[mode]


def _comm(ctx) -> dict:
    """Bytes per step this rank's tensor-parallel group moves (full-tensor sizes, as the cost model counts):
    per micro-step of n tokens, with the blocks, embedding and head this rank holds (L blocks):

    - plain TP, all-reduce: forward 2 per block (attention and MLP outputs) + 1 (embedding); backward 1 per
      column-parallel input per block (qkv, fc, and llama's gate: each re-enters its own DTensor) + 1
      (head input); loss_parallel's 3 all-reduces of n fp32 values (max, sum of exp, target logit);
    - SP: all-gather 4 per block (2 forward inputs, 2 backward output gradients) + 1 (head input) + 1
      (embedding gradient); reduce-scatter 4 per block + 1 (head input gradient) + 1 (llama's embedding
      output; gpt2 all-reduces it to add positions); all-reduce: loss 3 x n fp32, plus once per step the
      replicated norm parameters' partial gradients.
    Sizes n d e with e from ``_elem_bytes``."""
    if ctx.tp == 1:
        return {}
    cfg, n, L, ga = ctx.model, ctx.tokens, ctx.L, ctx.grad_accum
    e_in, e_out, e_emb = _elem_bytes(ctx.mode)
    nd, emb, head = n * cfg.n_embd, ctx.has_embedding, ctx.has_head
    loss = 3 * n * 4 if head else 0
    if not ctx.s.sp:
        col_inputs = 3 if cfg.arch == "llama" else 2
        per_micro = nd * (L * (2 * e_out + col_inputs * e_in) + emb * e_emb + head * e_in) + loss
        return {"all_reduce": ga * per_micro}
    learned_positions = cfg.arch == "gpt2"
    gather = nd * (L * 2 * (e_in + e_out) + head * e_in + emb * e_emb)
    scatter = nd * (L * 2 * (e_out + e_in) + head * e_in + (emb and not learned_positions) * e_emb)
    reduce = ga * (nd * (emb and learned_positions) * e_emb + loss) + 4 * ctx.replicated_norm
    return {"all_gather": ga * gather, "reduce_scatter": ga * scatter, "all_reduce": reduce}


def _apply(model, s, ctx):
    if s.tp == 1:
        return model
    return apply_tp(model, ctx.mesh["tp"], s.sp)


TECHNIQUE = Technique(
    name="tp", order=5, name_order=5,
    fields=(Field("tp", int, 1, "Tensor-parallel degree (ranks per tensor-parallel group; 1 = off). The "
                  "data-parallel degree is world_size / tp."),
            Field("sp", bool, False, "With tp >= 2: sequence parallelism (norms on a sequence shard; "
                  "all-gather + reduce-scatter instead of all-reduce).")),
    apply=_apply, validate=_validate, validate_for=_validate_for, validate_run=validate_run, name_part=_name,
    comm=_comm,
    plan_axes=lambda world: {"tp": [t for t in (1, 2, 4, 8) if world % t == 0], "sp": [False, True]},
)
