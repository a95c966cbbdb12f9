"""Group result rows into comparable setups and summarise repeated runs.

A **setup** is what must be equal for two strategies to be compared side by side
(``SETUP_KEYS`` in reports/record.py: model, device name, world size, sequence length, micro-batch,
grad-accum); within a setup a row is a **variant**: its strategy, dtype and implementation (``variant_label``: the
strategy name, plus the dtype where the name does not imply it, e.g. ``single (tf32)``). Rows from
different setups or variants are never averaged together. The reports' tables, ``reports.compare`` and
the regression gate (bench/gate/) all group this way.

Setups are listed smallest model first (by parameter count), strategies within a setup fastest first.
Per (setup, variant), over the runs with status ``ok`` or ``not_reached`` (``MEASURED``: finished, every number
true; a run that did not reach its target_loss measured its speed all the same):
- every metric is the **median** over runs;
- ``tokens_per_sec_lo`` / ``_hi``: with several runs, the min / max of the runs' tokens/s; with one
  run, global_batch_tokens / step_time_p90_s and / step_time_p10_s (the step-to-step spread);
- ``step_time_spread_pct`` = (p90 - p10) / median step time x 100, median over runs;
- ``runs`` = ok runs / all runs. Failed and suspect runs are listed separately with their error or reason.
"""

from __future__ import annotations

import pandas as pd

from reports.record import MEASURED, SETUP_KEYS, VARIANT_KEYS, variant_label

GIB = 2**30

# column -> (label, unit/format, which direction is better)
COLUMNS = {
    "tokens_per_sec": ("tokens/s", "{:,.0f}", "max"),
    "tokens_per_sec_per_device": ("tokens/s/device", "{:,.0f}", "max"),
    "mfu": ("MFU", "{:.1%}", "max"),
    "hfu": ("HFU", "{:.1%}", "max"),
    "peak_mem_gib": ("peak mem (GiB)", "{:.2f}", "min"),
    "step_time_median_s": ("step (ms)", "ms", "min"),
    "step_time_spread_pct": ("step spread p10-p90 (%)", "{:.1f}", "min"),
    "loss": ("loss", "{:.4f}", None),
}
# Every column a comparison reports: the table's columns plus the raw ones the gate's thresholds name.
MEDIANS = [*COLUMNS, "peak_mem_bytes"]
_FORMATS = {**{c: v[1] for c, v in COLUMNS.items()}, "peak_mem_bytes": "GiB"}


def _prepare(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for col in ("tokens_per_sec", "tokens_per_sec_per_device", "mfu", "hfu", "peak_mem_bytes", "loss",
                "step_time_median_s", "step_time_p10_s", "step_time_p90_s", "global_batch_tokens"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df["peak_mem_gib"] = df["peak_mem_bytes"] / GIB
    df["step_time_spread_pct"] = (df["step_time_p90_s"] - df["step_time_p10_s"]) / df["step_time_median_s"] * 100
    return df


def setup_label(key: tuple) -> str:
    model, device, ws, seq, mb, ga = key
    return f"{model} on {ws}x {device}, seq {seq}, micro-batch {mb}, grad-accum {ga}"


def summarise(df: pd.DataFrame) -> list[dict]:
    """One entry per setup: ``{"key", "label", "table" (DataFrame indexed by strategy), "failed"}``."""
    df = _prepare(df)
    out = []
    for key, group in df.groupby(SETUP_KEYS, sort=True, dropna=False):
        rows = []
        for (strategy, dtype, source), runs in group.groupby(VARIANT_KEYS, sort=False, dropna=False):
            ok = runs[runs.status.isin(MEASURED)]
            rec = {"strategy": variant_label(strategy, dtype, source), "runs": f"{len(ok)}/{len(runs)}",
                   "n_ok": len(ok),
                   "n_runs": len(runs), "status": ",".join(sorted(set(runs.status))),
                   "hosts": ",".join(sorted({str(h) for h in ok.hostname})) if "hostname" in ok else ""}
            for col in MEDIANS:
                rec[col] = ok[col].median() if len(ok) else float("nan")
            if len(ok) > 1:
                rec["tokens_per_sec_lo"], rec["tokens_per_sec_hi"] = ok.tokens_per_sec.min(), ok.tokens_per_sec.max()
            elif len(ok) == 1:  # one run: the step-to-step spread, p90 and p10 step times as throughput
                r = ok.iloc[0]
                lo = r.global_batch_tokens / r.step_time_p90_s if r.step_time_p90_s else r.tokens_per_sec
                hi = r.global_batch_tokens / r.step_time_p10_s if r.step_time_p10_s else r.tokens_per_sec
                rec["tokens_per_sec_lo"] = min(lo, r.tokens_per_sec)
                rec["tokens_per_sec_hi"] = max(hi, r.tokens_per_sec)
            else:
                rec["tokens_per_sec_lo"] = rec["tokens_per_sec_hi"] = float("nan")
            meshes = ok["mesh"].dropna() if "mesh" in ok else pd.Series(dtype=object)
            rec["mesh"] = str(meshes.iloc[0]) if len(meshes) else ""  # rows before meshes: unknown
            rec["pred_parts_gib"] = _pred_parts(ok)
            rec["run_ids"] = list(ok.run_id)
            rec["source_files"] = list(ok.source_file) if "source_file" in ok else []
            rows.append(rec)
        table = pd.DataFrame(rows).set_index("strategy").sort_values("tokens_per_sec", ascending=False,
                                                                     na_position="last", kind="stable")
        failed = group[~group.status.isin(MEASURED)][["strategy", "status", "error", "run_id"]].to_dict("records")
        out.append({"key": key, "label": setup_label(key), "table": table, "failed": failed,
                    "params": group["params"].dropna().iloc[0] if "params" in group and group["params"].notna().any()
                    else None})
    # smaller models first (gpt2-small before gpt2-large), then the setup key
    out.sort(key=lambda s: (s["params"] if s["params"] is not None and s["params"] == s["params"] else float("inf"),
                            tuple(str(k) for k in s["key"])))
    return out


def _pred_parts(ok: pd.DataFrame) -> dict[str, float]:
    """Median predicted memory parts (GiB) over runs, plus the measured process baseline (CPU: the
    interpreter and libraries, which the prediction does not model), or {} for rows without them."""
    if "pred_mem_breakdown" not in ok or not ok["pred_mem_breakdown"].map(lambda v: isinstance(v, dict)).any():
        return {}
    parts = pd.DataFrame([v for v in ok["pred_mem_breakdown"] if isinstance(v, dict)]).median() / GIB
    out = {k: float(v) for k, v in parts.items() if v > 0}
    if "mem_baseline_bytes" in ok and ok["mem_baseline_bytes"].notna().any():
        base = float(pd.to_numeric(ok["mem_baseline_bytes"], errors="coerce").median()) / GIB
        if base > 0:
            out = {"process baseline": base, **out}
    return out


def best_strategies(table: pd.DataFrame) -> dict[str, str]:
    """Column -> strategy holding the best value (max or min per COLUMNS), among runs that succeeded."""
    best = {}
    if len(table) < 2:  # nothing to compare against
        return best
    for col, (_, _, direction) in COLUMNS.items():
        values = table[col].dropna()
        if direction and len(values):
            best[col] = values.idxmax() if direction == "max" else values.idxmin()
    return best


def format_value(col: str, value) -> str:
    """A value as the reports print it (``–`` for none); columns without a format as ``{:.4g}``."""
    if value is None or value != value:
        return "–"
    fmt = _FORMATS.get(col)
    if fmt == "ms":
        return f"{value * 1e3:.1f}"
    if fmt == "GiB":
        return f"{value / GIB:.2f} GiB"
    if fmt is None:
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    return fmt.format(value)
