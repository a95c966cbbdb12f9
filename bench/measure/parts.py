"""Forward + backward time of the run's own model parts at the run's shapes (``probe_parts=true``).

A device's generic rates (the square-matmul peak, a streaming add's bandwidth) mispredict a real model's
operators on a CPU: measured on this class of host (mini, 2 gloo ranks, 1 thread each), the head's thin GEMMs
(1024 x 256 x 50304) ran at 52-55 GFLOP/s against a 73 GFLOP/s probe, and the cross-entropy over 50,304 classes
took ~0.5 s per micro-batch where its bytes at streaming bandwidth say 0.07 s. This probe times the parts the
step is made of, on every local rank at once (the timed steps' conditions: same threads, the neighbouring ranks
computing too), after the timed window so it cannot disturb it:

- ``block_s``: one block's forward + backward on a (micro_batch, seq_len, d) input -- the model built with one
  layer and cut to it as a pipeline stage is (``keep_stage``), so the family's and HF's blocks alike;
- ``block_matmul_s``: the GEMMs of that block (q/k/v, output projection, MLP; forward and the two backward
  GEMMs each) plus causal SDPA forward + backward, alone at the same shapes;
- ``rest_s``: the parts outside the blocks -- token (+ position) embedding, final norm, head and loss --
  forward + backward (the one-layer model cut to a stage holding no block);
- ``rest_matmul_s``: the head's three GEMMs alone (in the fused loss's chunks when the model uses it);
- ``adamw_s_per_param``: one AdamW step per parameter, fused (plain tensors) and foreach (DTensors), over the
  one-layer model's parameters.

Every figure is the median of ``repeats`` timings after one untimed warm-up, seconds per micro-batch (per
parameter for AdamW), on this rank; the row keeps the slowest rank's (max: the ranks of a step finish
together). bench/plan/steptime.py turns them into per-strategy step times (``Parts``).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import torch
import torch.nn.functional as F

from models import build_model
from models.config import GPTConfig


@dataclasses.dataclass
class Parts:
    block_s: float
    block_matmul_s: float
    rest_s: float
    rest_matmul_s: float
    adamw_fused_s_per_param: float
    adamw_foreach_s_per_param: float


def _median_time(fn, repeats: int, barrier) -> float:
    fn()  # warm-up: allocator, lazily built kernels
    times = []
    for _ in range(repeats):
        barrier()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _part(cfg: GPTConfig, device: torch.device, with_block: bool) -> torch.nn.Module:
    m = build_model(cfg, "meta")
    m.keep_stage({"0"} if with_block else set(), first=not with_block, last=not with_block)
    m.to_empty(device=device)
    m.init_weights(0)
    return m


def _step(module: torch.nn.Module, args: tuple, grad: torch.Tensor | None, sync):
    """Forward + backward of ``module(*args)`` (with ``grad`` as the output's gradient, or a scalar loss)."""
    def run():
        module(*args).backward(grad)
        sync()
    return run


def _gemm_shapes(cfg: GPTConfig) -> list[tuple[int, int]]:
    """(in, out) features of one block's matrices."""
    d, h = cfg.n_embd, cfg.hidden_dim
    mlp = [(d, h), (d, h), (h, d)] if cfg.arch == "llama" else [(d, h), (h, d)]
    return [(d, 3 * d), (d, d), *mlp]


def _gemms(rows: int, shapes: list[tuple[int, int]], device, repeat: int = 1):
    """A function running, ``repeat`` times, forward + both backward GEMMs of each (in, out) at ``rows`` rows."""
    g = torch.Generator(device=device).manual_seed(0)
    mats = [(torch.randn(rows, i, device=device, generator=g), torch.randn(o, i, device=device, generator=g),
             torch.randn(rows, o, device=device, generator=g)) for i, o in shapes]

    def run():
        for _ in range(repeat):
            for x, w, gy in mats:
                torch.mm(x, w.t())
                torch.mm(gy, w)
                torch.mm(gy.t(), x)
    return run


def probe_parts(cfg: GPTConfig, micro_batch: int, seq_len: int, device: torch.device, repeats: int = 3,
                barrier=lambda: None) -> Parts:
    """Time the parts (module docstring) of ``cfg``'s model at ``micro_batch`` x ``seq_len`` on ``device``; each
    timing starts with ``barrier()`` (the harness passes a process-group barrier, so the local ranks probe
    together)."""
    one = dataclasses.replace(cfg, n_layer=1, hf_path=None, dropout=0.0)
    B, T, d = micro_batch, seq_len, cfg.n_embd
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (B, T), device=device, generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (B, T), device=device, generator=gen)

    x = torch.randn(B, T, d, device=device, generator=gen, requires_grad=True)
    gy = torch.randn(B, T, d, device=device, generator=gen)
    block_s = _median_time(_step(_part(one, device, with_block=True), (x,), gy, sync), repeats, barrier)

    H = cfg.n_head
    q, k, v = (torch.randn(B, H, T, d // H, device=device, generator=gen, requires_grad=True) for _ in range(3))
    go = torch.randn(B, H, T, d // H, device=device, generator=gen)
    gemm = _gemms(B * T, _gemm_shapes(cfg), device)

    def block_matmuls():
        gemm()
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(go)
        sync()
    block_matmul_s = _median_time(block_matmuls, repeats, barrier)

    rest = _part(one, device, with_block=False)
    rest_s = _median_time(_step(rest, (idx, targets), None, sync), repeats, barrier)

    chunk = cfg.loss_chunk if cfg.loss_chunk and cfg.source == "native" else B * T
    chunk = min(chunk, B * T)
    head = _gemms(chunk, [(d, cfg.padded_vocab_size)], device, repeat=math.ceil(B * T / chunk))
    rest_matmul_s = _median_time(lambda: (head(), sync()), repeats, barrier)

    params = [p for p in rest.parameters()]
    for p in params:
        p.grad = torch.zeros_like(p)
    n = sum(p.numel() for p in params)
    adamw = {}
    for kind in ("fused", "foreach"):
        opt = torch.optim.AdamW(params, lr=1e-4, fused=kind == "fused" or None, foreach=kind == "foreach" or None)
        adamw[kind] = _median_time(lambda o=opt: (o.step(), sync()), repeats, barrier) / n
    return Parts(block_s, block_matmul_s, rest_s, rest_matmul_s, adamw["fused"], adamw["foreach"])
