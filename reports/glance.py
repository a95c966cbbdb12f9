"""The report's first screen: which strategy is fastest for this model on this hardware, and at what memory.

From the per-setup summaries (reports/aggregate.py: medians over ok runs, one row per setup and variant):

- ``entries``: one row per (setup, variant) with at least one ok run;
- ``leaderboards``: per model and hardware (device name x world size), those rows sorted by tokens/s
  (global), fastest first; setups with other sequence lengths, micro-batches or grad-accum appear as
  their own rows, their batch shown as "micro-batch x seq" (plus "ga N" when accumulating);
- ``pareto_front``: within a leaderboard, the rows no other row beats on both throughput and memory
  (another row with tokens/s >= and peak memory <=, one of them strictly);
- ``mfu_matrix``: per hardware, strategy x model of the best MFU over that model's setups (only where
  two models and two strategies exist: a single row or column says nothing a leaderboard does not).
Models are ordered by parameter count (gpt2-small before gpt2-large), never alphabetically.
"""

from __future__ import annotations

import pandas as pd

from reports.aggregate import format_value

BOARD_COLUMNS = ["strategy", "batch", "tokens/s", "tokens/s/device", "MFU", "peak mem (GiB)", "runs ok"]


def hardware_label(device: str, world_size: int) -> str:
    return f"{world_size}x {device}"


def entries(setups: list[dict]) -> pd.DataFrame:
    rows = []
    for s in setups:
        model, device, ws, seq, mb, ga = s["key"]
        for strategy, r in s["table"][s["table"].n_ok > 0].iterrows():
            rows.append({"model": model, "params": s["params"], "hardware": hardware_label(device, ws),
                         "seq": seq, "micro_batch": mb, "grad_accum": ga, "strategy": strategy,
                         "tokens_per_sec": r.tokens_per_sec, "tokens_per_sec_per_device": r.tokens_per_sec_per_device,
                         "mfu": r.mfu, "peak_mem_gib": r.peak_mem_gib, "runs": r.runs})
    return pd.DataFrame(rows)


def _model_order(e: pd.DataFrame) -> list[str]:
    first = e.groupby("model").params.first().fillna(float("inf"))
    return sorted(first.index, key=lambda m: (first[m], m))


def pareto_front(points: pd.DataFrame) -> pd.Series:
    """True for the rows that no other row dominates (tokens/s >= and peak memory <=, one strictly)."""
    tps, mem = points.tokens_per_sec.to_numpy(), points.peak_mem_gib.to_numpy()
    on = []
    for i in range(len(points)):
        dominated = ((tps >= tps[i]) & (mem <= mem[i]) & ((tps > tps[i]) | (mem < mem[i]))).any()
        on.append(bool(not dominated and tps[i] == tps[i] and mem[i] == mem[i]))
    return pd.Series(on, index=points.index)


def leaderboards(setups: list[dict]) -> list[dict]:
    """``[{"model", "hardware", "title", "table" (sorted by tokens/s, with a "pareto" column)}]``."""
    e = entries(setups)
    if e.empty:
        return []
    out = []
    for hardware in sorted(e.hardware.unique()):
        h = e[e.hardware == hardware]
        for model in _model_order(h):
            t = h[h.model == model].sort_values("tokens_per_sec", ascending=False, na_position="last")
            t = t.reset_index(drop=True)
            t["pareto"] = pareto_front(t)
            out.append({"model": model, "hardware": hardware, "title": f"{model} on {hardware}", "table": t})
    return out


def batch_label(micro_batch: int, seq: int, grad_accum: int) -> str:
    """'16 x 1024' (micro-batch x sequence length), '+ ga 2' when accumulating."""
    return f"{micro_batch} x {seq}" + (f" ga {grad_accum}" if grad_accum != 1 else "")


def board_rows(t: pd.DataFrame) -> list[list[str]]:
    """A leaderboard's cells, formatted as in the per-setup tables, in BOARD_COLUMNS order."""
    return [[r.strategy, batch_label(r.micro_batch, r.seq, r.grad_accum),
             format_value("tokens_per_sec", r.tokens_per_sec),
             format_value("tokens_per_sec_per_device", r.tokens_per_sec_per_device),
             format_value("mfu", r.mfu), format_value("peak_mem_gib", r.peak_mem_gib), r.runs]
            for r in t.itertuples()]


def mfu_matrix(setups: list[dict]) -> list[tuple[str, pd.DataFrame]]:
    """Per hardware: (label, DataFrame strategies x models of the best MFU), strategies by their mean MFU."""
    e = entries(setups)
    out = []
    if e.empty:
        return out
    for hardware in sorted(e.hardware.unique()):
        h = e[e.hardware == hardware].dropna(subset=["mfu"])
        if h.model.nunique() < 2 or h.strategy.nunique() < 2:
            continue
        m = h.pivot_table(index="strategy", columns="model", values="mfu", aggfunc="max")
        m = m[[c for c in _model_order(h) if c in m.columns]]
        m = m.loc[m.mean(axis=1).sort_values(ascending=False).index]
        out.append((hardware, m))
    return out
