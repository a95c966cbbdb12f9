"""Training data: each (step, global micro-batch index) maps to one deterministic batch.

Global micro-batch index ``m = dp_rank * grad_accum + micro_step``: every data-parallel rank
reads its own shard of the global batch, and a single process with ``grad_accum * dp`` micro
steps reads exactly the same global batch -- which is what makes strategies comparable.

- ``synthetic``: uniform random tokens drawn on the device, each sequence from a generator
  seeded by (seed, step, global sequence id = m * micro_batch + row): no host-to-device copy,
  no hidden sync, and the same global batch however it is split into micro-batches.
- a path to a text file or folder: bytes are tokens (byte-level tokenizer, ids 0..255); the
  whole corpus is put on the device once and windows of seq_len+1 are gathered there, in a
  seeded shuffled order.
"""

from __future__ import annotations

from pathlib import Path

import torch

_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def batch_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed unique to (seed, step, sequence index)."""
    return (seed * _MIX[0] + (step + 1) * _MIX[1] + (index + 1) * _MIX[2]) % (2**63 - 1)


class SyntheticData:
    """Uniform random tokens in [0, vocab_size)."""

    def __init__(self, vocab_size: int, micro_batch: int, seq_len: int, seed: int, device: torch.device):
        self.vocab_size, self.B, self.T, self.seed, self.device = vocab_size, micro_batch, seq_len, seed, device

    def batch(self, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each (B, T) int64 on the device."""
        gen = torch.Generator(device=self.device)
        rows = []
        for b in range(self.B):
            gen.manual_seed(batch_seed(self.seed, step, index * self.B + b))
            rows.append(torch.randint(0, self.vocab_size, (self.T + 1,), generator=gen, device=self.device))
        seq = torch.stack(rows)  # (B, T+1)
        return seq[:, :-1], seq[:, 1:]


def read_bytes(path: str | Path) -> torch.Tensor:
    """All bytes of a file, or of every file under a folder (sorted paths), as a uint8 tensor."""
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    else:
        raise FileNotFoundError(f"data={str(path)!r}: no such file or folder (use data=synthetic or a text path)")
    blob = b"".join(f.read_bytes() for f in files)
    if not blob:
        raise ValueError(f"data={str(path)!r}: no bytes found")
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


class TextData:
    """Byte-level windows of a local corpus; ``n_micro`` = micro-batches per step in the whole job."""

    def __init__(self, path: str, micro_batch: int, seq_len: int, seed: int, device: torch.device, n_micro: int):
        data = read_bytes(path)
        self.n_windows = (data.numel() - 1) // seq_len
        if self.n_windows < micro_batch:
            raise ValueError(f"data={path!r}: {data.numel()} bytes hold only {self.n_windows} windows of "
                             f"seq_len={seq_len}+1; need at least micro_batch={micro_batch}")
        self.B, self.T, self.n_micro, self.device = micro_batch, seq_len, n_micro, device
        self.tokens = data.to(device)
        order = torch.randperm(self.n_windows, generator=torch.Generator().manual_seed(seed))
        self.order = order.to(device)
        self.offsets = torch.arange(seq_len + 1, device=device)
        self.rows = torch.arange(micro_batch, device=device)

    def batch(self, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = (step * self.n_micro + index) * self.B  # python int: no host-device traffic
        windows = self.order[(self.rows + first) % self.n_windows]  # (B,)
        seq = self.tokens[windows[:, None] * self.T + self.offsets].long()  # (B, T+1)
        return seq[:, :-1], seq[:, 1:]


def build_data(data: str, vocab_size: int, micro_batch: int, seq_len: int, seed: int, device: torch.device,
               n_micro: int):
    """``data='synthetic'`` or a path; text needs a vocabulary of at least 256 (byte ids)."""
    if data == "synthetic":
        return SyntheticData(vocab_size, micro_batch, seq_len, seed, device)
    if vocab_size < 256:
        raise ValueError(f"data={data!r} is byte-level text (ids 0..255) but the model's vocab_size={vocab_size}")
    return TextData(data, micro_batch, seq_len, seed, device, n_micro)
