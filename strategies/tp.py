"""Tensor parallelism (Megatron-LM style) with optional sequence parallelism, on the mesh's ``tp`` dimension.

PyTorch's own SPMD machinery does the work (``parallelize_module`` with DTensor styles); nothing here
issues a collective by hand. The model's parts are found through its layout (models/parts.py), so the same
plan runs on the family's model and on Hugging Face's (GPT-2's ``Conv1D`` gets the same styles with its
transposed weight split the other way; its fused ``c_attn`` is regrouped so each rank's columns are its own
heads' q, k and v, models/hf.py ``prepare_tp``). Per block, in the family's names (torchtitan's plan):

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
from functools import cache, partial

from torch import nn

from models.parts import NATIVE_LLAMA, TPLayout, submodule, tp_layout
from strategies.base import StrategyError


def tp_local_shape(name: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """The shape of the family's parameter ``name`` on one tensor-parallel rank (the cost model's view of the plan:
    the cost model counts the family's parameters, whichever implementation runs): column-parallel modules (and
    the vocabulary of the embedding and head) split dim 0, row-parallel weights dim 1 (their biases stay whole);
    the rest (norms, positions) is replicated."""
    if tp == 1:
        return shape
    module, kind = name.rsplit(".", 1)
    layout = NATIVE_LLAMA  # the family's names (gpt2's are a subset)
    if module.endswith((*layout.colwise, "lm_head", "tok_emb")):
        return (shape[0] // tp, *shape[1:])
    if module.endswith(layout.rowwise) and kind == "weight":
        return (shape[0], shape[1] // tp)
    return shape


@cache
def _styles(conv1d: bool):
    """(column-parallel, row-parallel) style classes: torch's for ``nn.Linear``; for GPT-2's ``Conv1D`` (weight
    stored (in, out), ``y = x @ W + b``) the same styles with the weight split along the other dimension --
    columns: weight Shard(1), bias Shard(0); rows: weight Shard(0), bias whole. Forward and backward are then
    DTensor's own ``addmm`` sharding rules, as for a Linear. Built on first use (this module is imported by
    the planner without torch's tensor-parallel machinery) and once per process (cached)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    if not conv1d:
        return ColwiseParallel, RowwiseParallel

    def shard(module, mesh, placements: dict):
        for pname, param in list(module.named_parameters(recurse=False)):
            module.register_parameter(pname, nn.Parameter(distribute_tensor(param, mesh, [placements[pname]]),
                                                          requires_grad=param.requires_grad))

    class Conv1DColwise(ColwiseParallel):
        def _apply(self, module, device_mesh):
            from torch.distributed.tensor import distribute_module
            return distribute_module(module, device_mesh,
                                     lambda _n, m, mesh: shard(m, mesh, {"weight": Shard(1), "bias": Shard(0)}),
                                     partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                                     partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))

    class Conv1DRowwise(RowwiseParallel):
        def _apply(self, module, device_mesh):
            from torch.distributed.tensor import distribute_module
            self.desired_input_layouts = (Shard(-1),)
            return distribute_module(module, device_mesh,
                                     lambda _n, m, mesh: shard(m, mesh, {"weight": Shard(0), "bias": Replicate()}),
                                     partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                                     partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))

    return Conv1DColwise, Conv1DRowwise


def _block_plan(block: nn.Module, layout: TPLayout, sp: bool) -> dict:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput, SequenceParallel
    colwise, rowwise = _styles(layout.conv1d)
    resid = Shard(1) if sp else Replicate()  # layout of the residual stream between sub-layers
    plan = {name: colwise() for name in layout.colwise if submodule(block, name) is not None}
    plan.update({name: rowwise(output_layouts=resid) for name in layout.rowwise})
    if sp:
        plan.update({name: SequenceParallel() for name in layout.norms})
        if isinstance(layout.attn_input, int):  # the hidden states first, then e.g. the family's rope tables
            rest = (None,) * (layout.attn_input - 1)
            plan[layout.attn] = PrepareModuleInput(input_layouts=(Shard(1), *rest),
                                                   desired_input_layouts=(Replicate(), *rest))
        else:
            plan[layout.attn] = PrepareModuleInput(input_kwarg_layouts={layout.attn_input: Shard(1)},
                                                   desired_input_kwarg_layouts={layout.attn_input: Replicate()})
        plan[layout.mlp] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
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
    """Parallelize the (meta-device) model in place over ``tp_mesh``, finding its parts through its layout
    (models/parts.py); see the module docstring."""
    # imported here: the planner and the cost model load this module without needing the machinery
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )
    layout = tp_layout(model.cfg)
    model.prepare_tp(tp_mesh.size(), sp)  # the model's local facts (HF GPT-2's fused q/k/v split), or nothing
    emb, head, norm = (submodule(model, p) for p in (layout.embedding, layout.head, layout.final_norm))
    top = {}
    if emb is not None:  # a pipeline stage may own neither end (strategies/pp.py)
        emb_out = Shard(1) if sp and layout.sp_split == "embedding" else Replicate()
        top[layout.embedding] = RowwiseParallel(input_layouts=Replicate(), output_layouts=emb_out)
        if sp and layout.sp_split == "drop":  # positions added to the full sequence, then each rank keeps its shard
            top[layout.drop] = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                                  use_local_output=True)
        if sp and layout.sp_split == "first_block":  # cut before the first block; with none (the parts probe's
            first = next(iter(model.blocks.values()), None)  # embeddings + head: bench/measure/parts.py), before
            target = first if first is not None else norm  # the final norm, ahead of its own input hook
            target.register_forward_pre_hook(_split_sequence(tp_mesh), prepend=first is None)
    if head is not None:  # logits stay a vocabulary-sharded DTensor for loss_parallel
        top[layout.head] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    if norm is not None and sp:
        top[layout.final_norm] = SequenceParallel()
    for block in model.blocks.values():
        parallelize_module(block, tp_mesh, _block_plan(block, layout, sp))
    if top:
        parallelize_module(model, tp_mesh, top)
    if emb is not None and head is not None and model.cfg.tie_embeddings:
        head.weight = emb.weight  # HF's tied head: each style made its own DTensor of the one tensor; tie them again
    if norm is not None:
        norm.register_forward_hook(_replicate_output(tp_mesh))
    return model


def _split_sequence(mesh):
    """Forward pre-hook: the block's first argument (the replicated hidden states) cut to this rank's sequence
    shard -- a local slice forward, an all-gather of the gradient backward (Replicate -> Shard(1))."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def hook(_module, args):
        x = DTensor.from_local(args[0], mesh, [Replicate()], run_check=False)
        return (x.redistribute(placements=[Shard(1)]).to_local(), *args[1:])

    return hook


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


def validate(s) -> None:
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


def validate_for(s, device_type: str, world_size: int) -> None:
    if s.tp > 1 and world_size % s.tp:
        raise StrategyError(f"strategy.tp={s.tp} does not divide the world size {world_size}; "
                            f"launch a multiple of {s.tp} processes")


def name_part(s) -> str | None:
    if s.tp == 1:
        return None
    return f"tp{s.tp}" + ("+sp" if s.sp else "")
