"""Pipeline parallelism on the mesh's ``pp`` dimension, with ``torch.distributed.pipelining``'s schedules.

The split comes first (torchtitan's order): the meta-device model is cut into ``pp x pp_virtual``
stages of consecutive blocks, each stage the same GPT with the parts it does not own removed (the
first keeps the embeddings, the last the final norm and head; block names stay global, so every stage
initialises to exactly the whole model's values). Every later strategy (TP, checkpointing, compile,
FSDP/DDP) is then applied to each stage module, and ``Pipeline.finish`` wraps them in ``PipelineStage``s
and the schedule:

- ``gpipe``: all forwards, then all backwards (activations of every micro-batch alive at once);
- ``1f1b``: one forward, one backward in the steady state (at most ``pp`` micro-batches in flight);
- ``interleaved1f1b``: ``pp_virtual`` stages per rank, looped placement (rank r holds stages r, r + pp,
  ...), a bubble ``pp_virtual`` times smaller (Narayanan et al. 2021).

The training step's batch (``micro_batch`` sequences) is cut into ``pp_microbatches`` pipeline
micro-batches; the loss of each is divided by their number (and by grad_accum), so the update equals
one over the whole batch. Bubble fraction (idle share of a rank's step): (p - 1) / (m + p - 1) for gpipe and 1f1b,
(p - 1) / (v m + p - 1) interleaved, for p = pp, m = micro-batches, v = virtual stages; the bubble counts
against MFU (FLOPs per token are the model's, time is the step's).

Between stages, each micro-batch sends its hidden states (mb x T x d in the activation dtype) forward
and their gradient backward: point-to-point ``send``/``recv``. A tied head would need the embedding's
gradient summed across the first and last stage, which pipelining does not do: pp needs
``model.tie_embeddings=false``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from models.gpt import lm_loss
from models.weights import local_part
from strategies.base import StrategyError

# torch.distributed.pipelining's schedule classes by name (imported when a pipeline is built: the planner
# and the cost model load this module without needing them)
SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved1f1b": "ScheduleInterleaved1F1B"}


def virtual_stages(s) -> int:
    """Stages per pipeline rank: ``pp_virtual`` for the interleaved schedule, else 1."""
    return s.pp_virtual if s.pp_schedule == "interleaved1f1b" else 1


def n_microbatches(s) -> int:
    """Pipeline micro-batches per training micro-batch (``pp_microbatches``; 0 = pp)."""
    return s.pp_microbatches or s.pp


def pipeline_micro_batch(s, micro_batch: int) -> int:
    """The micro-batch a strategy's blocks and head run at: a pipeline micro-batch (``micro_batch / m``) under pp,
    else the micro-batch itself (the shape the model's parts are timed at, bench/measure/parts.py)."""
    return micro_batch // n_microbatches(s) if s.pp > 1 else micro_batch


def stage_blocks(n_layer: int, n_stages: int) -> list[range]:
    """Consecutive block indices of each stage: as even as possible, the first stages one longer."""
    base, extra = divmod(n_layer, n_stages)
    out, start = [], 0
    for i in range(n_stages):
        size = base + (1 if i < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def stage_ids(pp_rank: int, pp: int, virtual: int) -> list[int]:
    """Stages this pipeline rank holds (looped placement): pp_rank, pp_rank + pp, ..."""
    return [pp_rank + k * pp for k in range(virtual)]


def split_stage(model: nn.Module, stage: int, n_stages: int) -> nn.Module:
    """The (meta-device) stage module: a copy of ``model`` keeping only stage ``stage``'s parts."""
    part = copy.deepcopy(model)
    part.keep_stage({str(i) for i in stage_blocks(model.cfg.n_layer, n_stages)[stage]},
                    first=stage == 0, last=stage == n_stages - 1)
    return part


class Pipeline(nn.Module):
    """This rank's stage modules (``stages``: what the optimizer trains) and, after ``finish``, the
    schedule that runs one training micro-batch through the whole pipeline (forward and backward)."""

    def __init__(self, stages: list[nn.Module], ids: list[int], n_stages: int):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.ids, self.n_stages = ids, n_stages
        self.schedule = None
        self._has_last = n_stages - 1 in ids

    def finish(self, s, pp_group, device: torch.device, loss_scale: float) -> None:
        """Wrap the (fully strategised) stage modules in PipelineStages and build the schedule; the
        loss of each pipeline micro-batch is multiplied by ``loss_scale`` (1 / grad_accum)."""
        from torch.distributed import pipelining

        stages = [pipelining.PipelineStage(m, i, self.n_stages, device, group=pp_group)
                  for m, i in zip(self.stages, self.ids)]
        cls = getattr(pipelining, SCHEDULES[s.pp_schedule])
        # The mean over pipeline micro-batches is taken in the loss (scale 1 / (m x grad_accum)), not by the
        # schedule's scale_grads: that divides every accumulated gradient at the end of each step, so under
        # gradient accumulation the earlier micro-steps' gradients would be divided again.
        scale = loss_scale / n_microbatches(s)
        self.schedule = cls(stages if virtual_stages(s) > 1 else stages[0], n_microbatches=n_microbatches(s),
                            loss_fn=lambda logits, y: lm_loss(logits, y) * scale, scale_grads=False)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one training micro-batch; returns its mean loss over the pipeline
        micro-batches, divided by grad_accum, on ranks holding the last stage; 0 on the others."""
        losses: list[torch.Tensor] = []
        # return_outputs=False: the last stage would otherwise keep every micro-batch's logits to merge them
        self.schedule.step(x, target=y, losses=losses, return_outputs=False)
        if not self._has_last:
            return torch.zeros((), device=x.device)
        # under loss_parallel (pp x tp) each loss is a replicated DTensor: its local value is the loss
        return torch.stack([local_part(loss).detach() for loss in losses]).sum()

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward only (the schedule's ``eval``: no backward, no gradients) of one held-out micro-batch; its
        loss scaled as ``step``'s, on ranks holding the last stage; 0 on the others."""
        losses: list[torch.Tensor] = []
        self.schedule.eval(x, target=y, losses=losses)
        if not self._has_last:
            return torch.zeros((), device=x.device)
        return torch.stack([local_part(loss).detach() for loss in losses]).sum()

    def forward(self, *_args):
        raise RuntimeError("a Pipeline trains through step(x, y) (its schedule runs forward and backward); "
                           "held-out loss through evaluate(x, y)")


def validate(s) -> None:
    if s.pp < 1:
        raise StrategyError(f"strategy.pp={s.pp} is invalid; must be >= 1 (1 = no pipeline parallelism)")
    if s.pp > 1 and s.dp == "ddp":
        # torch 2.13: DDP's reducer asserts when a pipeline runs several backwards per step ("rebuilt
        # parameter indices size is not same as original model parameters size"); torchtitan pairs PP with
        # FSDP too.
        raise StrategyError(f"strategy.pp={s.pp} with dp=ddp is not supported (DDP's gradient buckets break under "
                            "a pipeline schedule in this torch release); use dp=fsdp or dp=none")
    if s.pp_microbatches < 0:
        raise StrategyError(f"strategy.pp_microbatches={s.pp_microbatches} is invalid; must be >= 0 (0 = pp)")
    if s.pp_virtual < 2 and s.pp_schedule == "interleaved1f1b" and s.pp > 1:
        raise StrategyError(f"strategy.pp_virtual={s.pp_virtual} is invalid for pp_schedule=interleaved1f1b; "
                            "must be >= 2 (stages per rank)")
    if s.pp > 1 and s.pp_schedule in ("1f1b", "interleaved1f1b") and n_microbatches(s) < s.pp:
        raise StrategyError(f"strategy.pp_microbatches={s.pp_microbatches} is too few for pp_schedule="
                            f"{s.pp_schedule} with pp={s.pp}; needs >= {s.pp} (or 0 = pp)")


def validate_run(s, model_cfg, seq_len: int, micro_batch: int) -> None:
    """Checks against the model and batch: enough blocks for every stage, micro_batch divisible by the
    pipeline micro-batches, an untied head."""
    if s.pp == 1:
        return
    stages = s.pp * virtual_stages(s)
    if model_cfg.n_layer < stages:
        raise StrategyError(f"strategy.pp={s.pp} x {virtual_stages(s)} stage(s) per rank needs at least {stages} "
                            f"blocks but model.n_layer={model_cfg.n_layer}; lower pp or pp_virtual")
    m = n_microbatches(s)
    if micro_batch % m:
        given = (f"strategy.pp_microbatches={m}" if s.pp_microbatches
                 else f"the pipeline micro-batches, {m} (strategy.pp_microbatches=0: as many as strategy.pp={s.pp})")
        raise StrategyError(f"micro_batch={micro_batch} is not divisible by {given}: each pipeline micro-batch "
                            "gets micro_batch / pp_microbatches sequences")
    if model_cfg.tie_embeddings:
        raise StrategyError(f"strategy.pp={s.pp} with a tied head: the embedding (first stage) and the head "
                            "(last stage) cannot share one matrix; use model.tie_embeddings=false")


def validate_for(s, device_type: str, world_size: int) -> None:
    if s.pp > 1 and world_size % (s.pp * s.tp):
        raise StrategyError(f"strategy.pp={s.pp} x tp={s.tp} does not divide the world size {world_size}; "
                            f"launch a multiple of {s.pp * s.tp} processes")


def name_part(s) -> str | None:
    if s.pp == 1:
        return None
    v = virtual_stages(s)
    return f"pp{s.pp}({s.pp_schedule}" + (f"/v{v}" if v > 1 else "") + ")"


def bubble_fraction(s) -> float:
    """The share of a pipeline rank's step spent idle in the schedule's fill and drain: (p - 1) / (m + p - 1)
    for gpipe and 1f1b, (p - 1) / (v m + p - 1) interleaved (Narayanan et al. 2021); 0 without a pipeline."""
    if s.pp == 1:
        return 0.0
    p, m, v = s.pp, n_microbatches(s), virtual_stages(s)
    return (p - 1) / (v * m + p - 1)


def in_flight_chunks(s, pp_rank: int) -> int:
    """Stage-chunks (one stage's blocks for one pipeline micro-batch) whose activations pipeline rank
    ``pp_rank`` holds at its peak: gpipe all m x v; 1f1b its warm-up forwards + 1 = pp - rank (at most m);
    interleaved 1f1b Megatron-LM's warm-up, (pp - rank - 1) x 2 + (v - 1) x pp, + 1 (at most m x v)."""
    m, v = n_microbatches(s), virtual_stages(s)
    if s.pp_schedule == "gpipe":
        return m * v
    if v == 1:
        return min(m, s.pp - pp_rank)
    return min(m * v, (s.pp - pp_rank - 1) * 2 + (v - 1) * s.pp + 1)


def split_pipeline(model: nn.Module, s, pp_mesh) -> Pipeline:
    """The (meta-device) model cut into this pipeline rank's stages (``stage_ids``), in a ``Pipeline``."""
    pp_rank = pp_mesh.get_local_rank()
    n_stages = s.pp * virtual_stages(s)
    ids = stage_ids(pp_rank, s.pp, virtual_stages(s))
    return Pipeline([split_stage(model, i, n_stages) for i in ids], ids, n_stages)
