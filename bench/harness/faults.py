"""DEBUG fault injection, in one hook: what the failure-path tests and the gate study need, and nothing
when no ``debug_*`` option is set (``wrap`` then returns the step unchanged, ``after_step`` returns at once).

- ``debug_nan_step``: from that step on the step's loss is NaN (status nan);
- ``debug_delay_s`` / ``debug_slow_pct``: a timed step is made slower by a sleep / by busy-waiting that
  percentage of its own duration (the gate study's exact, CPU-competing slowdown). These two are meant to
  land inside the timed step: they simulate a regression;
- ``debug_fail_step`` / ``debug_hang_step`` (on ``debug_fail_rank``, -1 = all): after that step, outside the
  timed window, raise, or stop answering for ``timeout_s`` and then raise a timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from bench.harness.config import RunConfig


class InjectedFailure(RuntimeError):
    """Raised by ``debug_fail_step`` to test the failure path."""


def _spin(seconds: float) -> None:
    """Busy-wait (not sleep): an injected slowdown that competes for the CPU like real work."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class Faults:
    def __init__(self, cfg: RunConfig, rank: int, device: torch.device):
        self.cfg, self.rank, self.device = cfg, rank, device
        self.mine = cfg.debug_fail_rank in (-1, rank)

    def wrap(self, step_fn: Callable[[int], torch.Tensor]) -> Callable[[int], torch.Tensor]:
        """``step_fn`` itself, or a version that poisons the loss / slows the timed steps as configured."""
        c = self.cfg
        if c.debug_nan_step < 0 and not c.debug_delay_s and not c.debug_slow_pct:
            return step_fn

        def faulty(step: int) -> torch.Tensor:
            t0 = time.perf_counter()
            loss = step_fn(step)
            if 0 <= c.debug_nan_step <= step:
                loss = loss * float("nan")
            if step >= c.warmup:
                if c.debug_delay_s:
                    time.sleep(c.debug_delay_s)
                if c.debug_slow_pct:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)  # DEBUG only: the step's real duration
                    _spin(c.debug_slow_pct / 100 * (time.perf_counter() - t0))
            return loss

        return faulty

    def after_step(self, step: int) -> None:
        """Outside the timed window: the injected crash or hang of this rank at ``step``."""
        c = self.cfg
        if not self.mine:
            return
        if c.debug_fail_step == step:
            raise InjectedFailure(f"injected failure at step {step} on rank {self.rank} (debug_fail_step)")
        if c.debug_hang_step == step:
            # A rank that stops answering. Peers waiting in a collective fail at timeout_s; a rank hanging
            # outside one (or every rank) gives up after timeout_s too, so no run hangs for ever.
            time.sleep(c.timeout_s)
            raise TimeoutError(f"rank {self.rank} hung at step {step} (debug_hang_step) for timeout_s="
                               f"{c.timeout_s}s: timed out")
