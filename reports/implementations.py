"""The family's model and Hugging Face's, side by side: same architecture, same setup, same strategy.

From the per-setup summaries (reports/aggregate.py: medians over ok runs; a row's name is its variant label,
``fsdp`` for the family's model, ``fsdp [HF]`` for ``model.source=hf``): one row per setup and strategy that
has both implementations with an ok run, holding both implementations' tokens/s, peak memory and MFU and the
ratios HF / family (tokens/s: above 1 = HF faster; memory: above 1 = HF needs more).
"""

from __future__ import annotations

import pandas as pd

from reports.aggregate import format_value
from reports.glance import hardware_label

HF_SUFFIX = " [HF]"
HEADER = ["model", "hardware", "batch", "strategy", "tokens/s family", "tokens/s HF", "HF / family tokens/s",
          "peak mem family (GiB)", "peak mem HF (GiB)", "HF / family memory", "MFU family", "MFU HF"]
GROUPS = [("setup", 4), ("throughput", 3), ("memory", 3), ("MFU", 2)]


def pairs(setups: list[dict]) -> pd.DataFrame:
    """One row per (setup, strategy) run by both implementations (see the module docstring)."""
    rows = []
    for s in setups:
        model, device, ws, seq, mb, ga = s["key"]
        table = s["table"][s["table"].n_ok > 0]
        for name in table.index:
            if not name.endswith(HF_SUFFIX) or name.removesuffix(HF_SUFFIX) not in table.index:
                continue
            fam, hf = table.loc[name.removesuffix(HF_SUFFIX)], table.loc[name]
            rows.append({"model": model, "hardware": hardware_label(device, ws),
                         "batch": f"{mb} x {seq}" + (f", ga {ga}" if ga != 1 else ""),
                         "strategy": name.removesuffix(HF_SUFFIX),
                         "tokens_per_sec_family": fam.tokens_per_sec, "tokens_per_sec_hf": hf.tokens_per_sec,
                         "tokens_ratio": hf.tokens_per_sec / fam.tokens_per_sec,
                         "peak_mem_gib_family": fam.peak_mem_gib, "peak_mem_gib_hf": hf.peak_mem_gib,
                         "mem_ratio": hf.peak_mem_gib / fam.peak_mem_gib, "mfu_family": fam.mfu, "mfu_hf": hf.mfu})
    return pd.DataFrame(rows)


def table_rows(df: pd.DataFrame) -> list[list[str]]:
    """The rows as the reports print them, in HEADER order."""
    out = []
    for r in df.itertuples():
        out.append([r.model, r.hardware, r.batch, r.strategy,
                    format_value("tokens_per_sec", r.tokens_per_sec_family),
                    format_value("tokens_per_sec", r.tokens_per_sec_hf), f"{r.tokens_ratio:.2f}x",
                    format_value("peak_mem_gib", r.peak_mem_gib_family),
                    format_value("peak_mem_gib", r.peak_mem_gib_hf), f"{r.mem_ratio:.2f}x",
                    format_value("mfu", r.mfu_family), format_value("mfu", r.mfu_hf)])
    return out
