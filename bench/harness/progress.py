"""Rank 0's progress: a tqdm bar on a terminal, plain lines otherwise.

On a terminal the bar advances every step (host-side only: no device value is read, so nothing syncs)
and shows the step, the ETA and, from the loop's own every-``log_every`` loss all-reduce, the mean loss
and tokens/s. When the output is not a terminal (CI logs, torchrun's tee, a pipe) the same facts come as
one plain line per ``log_every`` steps, so logs stay greppable (also on a terminal that reports no
size). Other ranks print nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        return 0


class Progress:
    """``step()`` after each step; ``log(...)`` at each log_every step; ``close()`` at the end.
    ``enabled``: this rank reports (rank 0); ``bar``: None = a bar exactly when ``stream`` is a terminal."""

    def __init__(self, total: int, warmup: int, enabled: bool, say: Callable[[str], None],
                 stream: TextIO | None = None, bar: bool | None = None):
        stream = stream or sys.stderr
        self.total, self.warmup, self.enabled, self.say = total, warmup, enabled, say
        # a terminal that reports no size (a bare pty) cannot draw a bar: plain lines there
        use_bar = enabled and (stream.isatty() and _columns(stream) > 0 if bar is None else bar)
        self.bar = tqdm(total=total, file=stream, unit="step", dynamic_ncols=True, leave=True, mininterval=0.5,
                        desc="warm-up" if warmup else "train") if use_bar else None

    def step(self, step: int) -> None:
        """Step ``step`` (0-based) finished."""
        if self.bar is not None:
            if step == self.warmup and self.warmup:  # the first timed step
                self.bar.set_description("train")
            self.bar.update(1)

    def log(self, step: int, loss: float, tokens_per_s: float, eta_s: float) -> None:
        """The mean loss and throughput over the steps since the last call, at step ``step`` (0-based)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f} | {tokens_per_s:,.0f} tok/s", refresh=False)
            return
        phase = " (warm-up)" if step < self.warmup else ""
        self.say(f"step {step + 1}/{self.total}{phase} | loss {loss:.4f} | {tokens_per_s:,.0f} tok/s | "
                 f"ETA {eta_s:.0f}s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
