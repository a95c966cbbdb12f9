"""Training helpers the correctness tests share: configs of the tiny models, a run's losses, a step's gradients
and parameters gathered whole, and the comparison of two sets of tensors. Used by tests/test_parity.py,
test_grads.py, test_mesh.py, test_hf.py, test_row_wiring.py and test_steptime.py; imported once by the forkserver
the gloo ranks fork from (conftest.py)."""

from __future__ import annotations

import dataclasses
import re

import torch

from bench.harness.config import RunConfig
from bench.harness.dist import DistInfo
from bench.harness.loop import build, make_step, param_groups, plan_batch, train
from models import get_config
from strategies import StrategyConfig

RTOL = 1e-5  # losses, fp32, 10 steps (docs/testing.md)
BF16_RTOL = 2e-2  # losses, bf16 matmuls (8-bit mantissa) against the fp32 reference, 5 steps
STEPS = 10


def model_cfg(model: str):
    """A preset by name, with variants after colons: ':untied' an untied head (pipeline parallelism needs one),
    ':hf' the Hugging Face implementation (models/hf.py), e.g. 'llama-tiny:untied:hf'."""
    name, *variants = model.split(":")
    cfg = get_config(name)
    if "untied" in variants:
        cfg = dataclasses.replace(cfg, tie_embeddings=False)
    return dataclasses.replace(cfg, source="hf") if "hf" in variants else cfg


def run_cfg(strategy: dict, micro_batch: int, grad_accum: int, model: str = "tiny", data: str = "",
            steps: int = STEPS, seq_len: int = 64) -> RunConfig:
    return RunConfig(model=model_cfg(model), strategy=StrategyConfig(**strategy), steps=steps, warmup=0,
                     micro_batch=micro_batch, grad_accum=grad_accum, seq_len=seq_len, log_every=0, lr=1e-3,
                     data=data or "synthetic", measure_comm=False, measure_overlap=False, measure_counters=False)


def losses_of(cfg: RunConfig, rank: int = 0, world_size: int = 1, observed: dict | None = None) -> list[float]:
    """The run's global loss per step; ``observed`` (a dict) receives the row's metric columns."""
    info = DistInfo(rank, rank, world_size, 1, torch.device("cpu"), "gloo" if world_size > 1 else None)
    out = train(cfg, info)
    if observed is not None:
        observed.update(out.metrics)
    # CPU bf16: the peak probe times aten's slow bf16 matmul, so a tiny model can compute faster than that
    # "peak" (mfu > 1); the run must then be marked suspect, never ok. Losses are what this file checks.
    impossible = out.metrics.get("mfu", 0) > 1 or out.metrics.get("hfu", 0) > 1
    assert out.status == ("suspect" if impossible else "ok") and len(out.losses) == cfg.steps
    return out.losses



GRAD_RTOL = 1e-4  # gradients and parameters after one SGD step, relative L2 (docs/testing.md)
GRAD_RTOL_ADAMW = 1e-2  # ... after 3 AdamW steps
LR = 0.5  # SGD: large enough that parameters move visibly in one step


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a full (unsharded) copy of every gradient it applies, by parameter name."""

    def __init__(self, named):
        self.names = {id(p): n for n, p in named}
        super().__init__([p for _, p in named], lr=LR)
        self.grads: list[dict[str, torch.Tensor]] = []

    @torch.no_grad()
    def step(self, closure=None):
        self.grads.append({self.names[id(p)]: _full(p.grad) for g in self.param_groups for p in g["params"]
                           if p.grad is not None})
        return super().step(closure)


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone().float()


def canonical(name: str) -> str:
    """The parameter's name in the plain model: without a pipeline's 'stages.N.', DDP's 'module.' and the
    checkpoint wrapper's 'block.'."""
    name = re.sub(r"^stages\.\d+\.", "", name)
    return re.sub(r"\.block\.", ".", name.removeprefix("module."))


def run_case(rank: int, world_size: int, fields: dict, micro_batch: int, grad_accum: int, opt: str, steps: int,
             data: str, model: str = "tiny") -> dict:
    cfg = run_cfg(fields, micro_batch, grad_accum, model=model, data=data, steps=steps, seq_len=32)
    info = DistInfo(rank, rank, world_size, 1, torch.device("cpu"), "gloo" if world_size > 1 else None)
    cfg.strategy.validate_for("cpu", world_size)
    b = build(cfg, info, plan_batch(cfg, info))
    named = [(canonical(n), p) for n, p in b.model.named_parameters()]
    b.opt = RecordingSGD(named) if opt == "sgd" else torch.optim.AdamW(
        param_groups(b.model), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    step = make_step(cfg, info, b)
    losses = [float(step(i)) for i in range(steps)]
    return {"grads": b.opt.grads[0] if opt == "sgd" else None,
            "params": {n: _full(p) for n, p in named}, "losses": losses}


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm().clamp_min(1e-12))


def assert_same(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], what: str, rtol: float = GRAD_RTOL,
                subset: bool = False) -> None:
    """Every tensor of ``got`` equals ``ref``'s within ``rtol`` (relative L2); the same names, or (``subset``:
    a pipeline stage's) a subset of them."""
    if subset:
        ref = {n: ref[n] for n in got if n in ref}
    assert set(got) == set(ref), f"{what}: parameter names differ: {sorted(set(got) ^ set(ref))[:5]}"
    worst = max(((rel_l2(got[n], ref[n]), n) for n in ref), key=lambda t: t[0])
    assert worst[0] < rtol, f"{what}: {worst[1]} differs from single by {worst[0]:.2e} (relative L2)"
