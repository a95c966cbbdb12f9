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
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from strategies.base import Field, StrategyError, Technique


def _block_plan(block: nn.Module, sp: bool) -> dict:
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

    def hook(_module, _inputs, out):
        if isinstance(out, DTensor):
            return out.redistribute(placements=[Replicate()])
        return DTensor.from_local(out, mesh, [Replicate()], run_check=False)

    return hook


def apply_tp(model: nn.Module, tp_mesh, sp: bool) -> nn.Module:
    """Parallelize the (meta-device) model in place over ``tp_mesh``; see the module docstring."""
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
    for p in model.parameters():
        g = p.grad
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            p.grad = g.redistribute(placements=[Replicate()] * len(g.placements))


def maybe_loss_parallel(s):
    """The context the training step's forward *and* backward run in: ``loss_parallel`` under TP (cross
    entropy over vocabulary-sharded logits), else nothing."""
    return loss_parallel() if s.tp > 1 else contextlib.nullcontext()


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
)
