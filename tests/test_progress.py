"""Rank 0's progress (bench/harness/progress.py): a tqdm bar with step, loss, tokens/s and ETA on a terminal,
plain lines otherwise, nothing from other ranks; and the real CLI drawing the bar in a pseudo-terminal."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

from bench.harness.progress import Progress
from reports import load
from tests.helpers import ROOT

pytestmark = pytest.mark.e2e


def drive(p: Progress, total: int, log_every: int) -> None:
    for step in range(total):
        p.step(step)
        if (step + 1) % log_every == 0 or step == total - 1:
            p.log(step, loss=10.0 / (step + 1), tokens_per_s=1234.5, eta_s=total - step - 1)
    p.close()


def test_plain_lines_when_not_a_terminal_and_nothing_from_other_ranks():
    lines: list[str] = []
    drive(Progress(6, 2, True, lines.append, stream=io.StringIO()), 6, 3)
    assert lines == ["step 3/6 | loss 3.3333 | 1,234 tok/s | ETA 3s", "step 6/6 | loss 1.6667 | 1,234 tok/s | ETA 0s"]
    quiet: list[str] = []
    stream = io.StringIO()
    drive(Progress(6, 2, False, quiet.append, stream=stream, bar=True), 6, 3)
    assert quiet == [] and stream.getvalue() == ""


def test_bar_shows_step_loss_throughput_and_eta():
    stream, lines = io.StringIO(), []
    drive(Progress(6, 2, True, lines.append, stream=stream, bar=True), 6, 3)
    frames = stream.getvalue().replace("\n", "\r").split("\r")
    last = [f for f in frames if f.strip()][-1]
    assert lines == []  # the bar replaces the plain lines
    assert last.startswith("train: 100%") and "6/6" in last and "loss 1.6667" in last and "1,234 tok/s" in last
    assert "<" in last  # tqdm's elapsed<remaining (the ETA)
    assert any(f.startswith("warm-up:") for f in frames)


def run_in_terminal(cmd: list[str], cols: int = 120) -> tuple[int, str]:
    """``cmd`` with stdin/stdout/stderr on a pseudo-terminal of ``cols`` columns; (exit code, what it drew)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=120)
    os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def test_cli_draws_the_bar_on_a_terminal(tmp_path):
    rc, text = run_in_terminal([sys.executable, "bench/run.py", "model=tiny", "steps=6", "warmup=2", "log_every=3",
                                "micro_batch=2", "seq_len=32", f"results_dir={tmp_path}"])
    assert rc == 0, text
    frames = text.replace("\n", "\r").split("\r")
    bars = [f for f in frames if f.startswith("train: ")]
    assert bars and "8/8" in bars[-1] and "tok/s" in bars[-1] and "loss" in bars[-1]
    assert "step 3/8" not in text  # no plain lines on a terminal
    df = load(tmp_path)
    assert len(df) == 1 and df.status[0] == "ok" and f"loss {df.loss[0]:.4f}" in bars[-1]
