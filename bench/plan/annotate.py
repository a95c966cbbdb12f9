"""A run's prediction columns, from the config, the strategy and the rates: one pure call beside the run.

bench/run.py calls ``annotate`` once the run is over and before its row is written: the timed loop
(bench/harness/loop.py) imports nothing from bench/plan/, and the rates are inputs (the run's own peak FLOP/s,
the MFU denominator; the probes of bench/harness/rates.py), not steps of the run.

- predicted memory and communication (bench/plan/costmodel.py) need the config alone: every row has them, a
  failed run's too (an out-of-memory row says what the model predicted);
- predicted step time (bench/plan/steptime.py) needs ``rates``; its columns say which rates it used.
"""

from __future__ import annotations

from bench.plan.costmodel import predict_comm, predict_memory
from bench.plan.steptime import Rates, predict_step
from models.config import GPTConfig
from strategies.config import StrategyConfig
from strategies.pp import bubble_fraction


def annotate(model: GPTConfig, s: StrategyConfig, world_size: int, micro_batch: int, seq_len: int,
             grad_accum: int, rates: Rates | None = None, rate_columns: dict | None = None,
             overlap: bool = False) -> dict:
    """The prediction columns of a row (reports/record.py defines each): memory and communication always; with
    ``rates`` the step time, beside ``rate_columns`` (the rates as measured, with their sources)."""
    mem = predict_memory(model, s, world_size, micro_batch, seq_len)
    comm = predict_comm(model, s, world_size, grad_accum, micro_batch=micro_batch, seq_len=seq_len)
    out = {"pred_peak_mem_bytes": mem["total"],
           "pred_mem_breakdown": {k: v for k, v in mem.items() if k != "total"},
           "pred_comm_bytes_per_step": comm["total"],
           "pred_comm_breakdown": {k: v for k, v in comm.items() if k != "total"},
           "pred_bubble_fraction": bubble_fraction(s), **(rate_columns or {})}
    if rates is not None:
        p = predict_step(model, s, world_size, micro_batch, seq_len, grad_accum, rates, overlap)
        out.update(pred_step_time_s=p["step_s"], pred_tokens_per_sec=p["tokens_per_sec"],
                   pred_step_breakdown={k: v for k, v in p.items() if k not in ("step_s", "tokens_per_sec")})
    return out
