"""The run's curves as TensorBoard event files (``tensorboard=DIR``): what ``tensorboard --logdir DIR`` plots.

Written once, by rank 0, after the row and the per-step log (never inside the training loop), from that log
(bench/run.py ``step_log``), into ``DIR/<run_id>/``, with torch's own writer (torch.utils.tensorboard, which
needs the optional ``tensorboard`` package: ``pip install -e '.[log]'``). Scalars, at global step = the optimizer
step (warm-up included):
- ``loss/train``: the global mean training loss of every step;
- ``loss/held_out``: the held-out loss at each evaluation (eval_every);
- ``time/step_s``: each timed step's time (max over ranks); ``time/train_s``: training time through the step;
- ``tokens/trained``: tokens trained through the step.
Each event's wall time is the run's start plus its training time through that step, so TensorBoard's
"relative" axis reads training seconds (evaluation excluded), the axis a time-to-target comparison needs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXTRA = "pip install -e '.[log]' (tensorboard)"


def missing() -> str | None:
    """Why event files cannot be written here (the package is absent), or None."""
    if importlib.util.find_spec("tensorboard") is None:
        return f"tensorboard= needs the tensorboard package: {EXTRA}"
    return None


def write_events(folder: str | Path, run_id: str, steps: list[dict], start_time: float) -> Path:
    """Event files for one run's per-step log in ``folder/run_id``; returns that folder."""
    from torch.utils.tensorboard import SummaryWriter

    out = Path(folder) / run_id
    writer = SummaryWriter(log_dir=str(out))
    try:
        for s in steps:
            step, wall = s["step"], start_time + (s.get("train_time_s") or 0.0)
            scalars = {"loss/train": s.get("loss"), "loss/held_out": s.get("eval_loss"),
                       "time/step_s": s.get("step_time_s"), "time/train_s": s.get("train_time_s"),
                       "tokens/trained": s.get("tokens")}
            for tag, value in scalars.items():
                if value is not None:
                    writer.add_scalar(tag, value, global_step=step, walltime=wall)
    finally:
        writer.close()
    return out
