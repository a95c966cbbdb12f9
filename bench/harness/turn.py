"""Step-by-step turn taking between two benchmark jobs that run at the same time (the A/B gate).

On a shared machine the speed changes from one second to the next (measured on this project's 2-core
host: the median step time of back-to-back 2-second runs of the same code varied by +-10 %, and within
one run it moved in blocks of a few steps). Two versions compared run after run see different moments;
compared *step after step* they see the same one. So bench/gate/ab.py starts the baseline's and the
candidate's job together and they take turns, one training step each: job F runs step k, then job S
runs step k, then F runs step k+1, ... Every rank of the waiting job sleeps (polling a small file every
millisecond, outside the timed step), so the running job has the machine to itself, and step k of the
two versions is measured about one step apart in time.

Enabled only by the environment the gate sets: ``N00BGPT_AB_TURN`` (the turn file, holding
``"<side> <step>"`` or ``"free"``) and ``N00BGPT_AB_SIDE`` (``F`` first or ``S`` second). Without them
``get_turnstile`` returns a no-op and the training loop is unchanged. A job that stops early (error,
NaN) or finishes frees the turn for good, so the other never waits for it; a wait longer than the
run's ``timeout_s`` is an error.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

ENV_FILE, ENV_SIDE = "N00BGPT_AB_TURN", "N00BGPT_AB_SIDE"
FREE = "free"


def write_turn(path: str | Path, text: str) -> None:
    """Atomically replace the turn file's content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class NoTurn:
    """Outside the A/B gate: every method does nothing."""

    def wait(self, step: int) -> None:
        pass

    def done(self, step: int) -> None:
        pass

    def finish(self, steps: int) -> None:
        pass

    def release(self) -> None:
        pass


class Turnstile(NoTurn):
    def __init__(self, path: str, side: str, rank: int, timeout_s: float):
        if side not in ("F", "S"):
            raise ValueError(f"{ENV_SIDE}={side!r}: must be F or S")
        self.path, self.side, self.rank, self.timeout_s = Path(path), side, rank, timeout_s

    def _read(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def wait(self, step: int) -> None:
        """Block (sleeping) until this job may run ``step``."""
        want = f"{self.side} {step}"
        deadline = time.monotonic() + self.timeout_s
        while True:
            now = self._read()
            if now == want or now == FREE:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"A/B turn: waited {self.timeout_s}s for turn {want!r}, the file says {now!r}: "
                                   "timed out")
            time.sleep(0.001)

    def done(self, step: int) -> None:
        """This job finished ``step`` on every rank: hand the turn to the other job."""
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the step's kernels are done, not only queued
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # the slowest rank has finished too
        if self.rank == 0 and self._read() != FREE:
            write_turn(self.path, f"S {step}" if self.side == "F" else f"F {step + 1}")

    def finish(self, steps: int) -> None:
        """After the last step: the first job waits until the second has run it too, then frees the turn."""
        if self.side == "F":
            self.wait(steps)
        self.release()

    def release(self) -> None:
        if self.rank == 0:
            write_turn(self.path, FREE)


def get_turnstile(rank: int, timeout_s: float) -> NoTurn:
    """The turnstile the A/B gate asked for, or a no-op."""
    path = os.environ.get(ENV_FILE)
    if not path:
        return NoTurn()
    return Turnstile(path, os.environ.get(ENV_SIDE, ""), rank, timeout_s)
