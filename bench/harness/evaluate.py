"""Held-out loss: the strategy's own model (sharded, pipelined, tensor-parallel as it trains) on batches no
training step reads (bench/harness/data.py, ``split="eval"``), between training steps and outside their timing.

One evaluation reads ``eval_batches`` global batches of the held-out split, each exactly as a training step
splits its global batch (data-parallel rank r reads micro-batches r x grad_accum ... r x grad_accum + grad_accum
- 1), so the held-out set is the same for every strategy with the same global batch, and the loss is the same as
one process's within the parity tolerance (tests/test_eval.py):

    eval_loss = sum over ranks holding a loss of sum_k sum_micro loss(k, micro) / grad_accum
                / (ranks holding a loss) / eval_batches          [nats per token, natural log]

Ranks holding a loss: all of them, except under pipelining, where only the last stage's do (world / pp).
Gradients are off (``torch.no_grad``) and so is dropout (``model.eval()``, the training mode restored after); the
model's own autocast and loss_parallel apply as in training.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from models.weights import local_part
from strategies import get_autocast, maybe_loss_parallel
from strategies.pp import Pipeline


def held_out_loss(model: torch.nn.Module, data, strategy, device: torch.device, dp_rank: int, grad_accum: int,
                  eval_batches: int, holders: int) -> float:
    """The global mean held-out loss (module docstring); every rank returns the same value. One all-reduce."""
    total = torch.zeros((), device=device, dtype=torch.float32)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for k in range(eval_batches):
            for micro in range(grad_accum):
                x, y = data.batch(k, dp_rank * grad_accum + micro)
                with maybe_loss_parallel(strategy), get_autocast(strategy.amp, strategy.dp, device.type):
                    if isinstance(model, Pipeline):
                        part = model.evaluate(x, y)  # already divided by grad_accum; 0 off the last stage
                    else:
                        loss = model(x, y)
                        part = local_part(loss).float() / grad_accum
                total += part
    model.train(was_training)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        total = total / holders
    return float(total) / eval_batches
