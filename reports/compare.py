"""Baseline vs candidate: the one comparison engine (the reports' comparison page and the regression gate,
bench/gate/regress.py, which adds thresholds to it).

Rows are matched on the setup (SETUP_KEYS) and the variant (strategy + dtype), as reports/aggregate.py
groups them; each side is the median over its ok runs. ``delta_pct`` = (candidate - baseline) / baseline
x 100; a delta is *better* or *worse* by the metric's direction (more tokens/s and MFU, less memory and
step time).
"""

from __future__ import annotations

import pandas as pd

from reports import plots
from reports.aggregate import COLUMNS, MEDIANS, format_value, setup_label, summarise
from reports.build import Report, figures_for, markdown_table, render_page, slug
from reports.load import ResultsError
from reports.record import SETUP_KEYS, VARIANT_KEYS

METRICS = ["tokens_per_sec", "tokens_per_sec_per_device", "mfu", "peak_mem_gib", "step_time_median_s", "loss"]


def medians(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (setup, variant): its key, label, ok/all run counts, status set, hosts and metric medians."""
    rows = []
    for s in summarise(df):
        for strategy, r in s["table"].iterrows():
            rows.append({"setup": setup_label(s["key"]), "key": s["key"], "strategy": strategy, "n_ok": r.n_ok,
                         "n_runs": r.n_runs, "status": r.status, "hosts": r.hosts, **{m: r[m] for m in MEDIANS}})
    return pd.DataFrame(rows)


def compare(baseline: pd.DataFrame, candidate: pd.DataFrame, keep_unmatched: bool = False) -> pd.DataFrame:
    """One row per matched (setup, variant): ``<col>_baseline``, ``_candidate`` for the counts, hosts and
    medians, ``<metric>_delta_pct`` and ``_verdict`` (better/worse/same). ``keep_unmatched``: baseline rows
    without a candidate are kept (candidate side NaN, ``matched`` False) -- the gate fails them.
    Raises ResultsError when nothing matches."""
    b, c = medians(baseline), medians(candidate).drop(columns="key")
    merged = b.merge(c, on=["setup", "strategy"], how="left" if keep_unmatched else "inner",
                     suffixes=("_baseline", "_candidate"), indicator=True)
    merged["matched"] = merged.pop("_merge") == "both"
    if not merged.matched.any():
        raise ResultsError("baseline and candidate share no setup (" + ", ".join(SETUP_KEYS + VARIANT_KEYS) + ")")
    for m in MEDIANS:
        base, cand = merged[f"{m}_baseline"], merged[f"{m}_candidate"]
        merged[f"{m}_delta_pct"] = (cand - base) / base.abs() * 100
        direction = COLUMNS.get(m, ("", "", "min"))[2]
        sign = 1 if direction == "max" else -1

        def verdict(d, sign=sign, direction=direction):
            if d != d or not direction:
                return ""
            return "better" if d * sign > 0 else ("worse" if d * sign < 0 else "same")

        merged[f"{m}_verdict"] = merged[f"{m}_delta_pct"].map(verdict)
    merged.index = merged.setup + " | " + merged.strategy
    return merged


# The page's columns: tokens/s per device is left out (= tokens/s / world size, and the setup fixes the
# world size), so the table fits a 1280 px window; the gate (bench/gate/regress.py) still judges it.
PAGE_METRICS = [m for m in METRICS if m != "tokens_per_sec_per_device"]


def report(baseline: pd.DataFrame, candidate: pd.DataFrame) -> tuple[Report, str, str]:
    """(figures, html, markdown) for a baseline/candidate comparison: per setup, a table (strategies fastest
    first, per metric baseline, candidate and delta) and, with two strategies or more, bar charts."""
    cmp = compare(baseline, candidate)
    rep = Report()
    groups = [["", 1]] + [[COLUMNS[m][0], 3] for m in PAGE_METRICS]
    header = ["strategy"] + [k for _ in PAGE_METRICS for k in ("base", "cand", "Δ%")]
    md_header = ["strategy"] + [f"{COLUMNS[m][0]} {k}" for m in PAGE_METRICS for k in ("base", "cand", "Δ%")]
    md = ["# n00bGPT: baseline vs candidate", "", "▲ better, ▼ worse (by each metric's direction).", ""]
    sections = []
    order = cmp.groupby("setup", sort=False).tokens_per_sec_baseline.max().index  # aggregate's setup order
    for setup in order:
        g = cmp[cmp.setup == setup].sort_values("tokens_per_sec_baseline", ascending=False, kind="stable")
        rows_md, rows_html = [], []
        for _, r in g.iterrows():
            cells_md, cells_html = [r.strategy], [{"text": r.strategy}]
            for m in PAGE_METRICS:
                d, v = r[f"{m}_delta_pct"], r[f"{m}_verdict"]
                dtxt = f"{d:+.1f}%" if d == d else "–"
                b, c = format_value(m, r[f"{m}_baseline"]), format_value(m, r[f"{m}_candidate"])
                cells_md += [b, c, f"{dtxt} {'▲' if v == 'better' else '▼' if v == 'worse' else ''}".strip()]
                cells_html += [{"text": b}, {"text": c}, {"text": dtxt, "cls": v}]
            rows_md.append(cells_md)
            rows_html.append(cells_html)
        keys = []
        if len(g) > 1:  # one strategy: the table says it all, no one-bar chart
            t = g.set_index("strategy")
            stem = slug(setup)
            for metric, label, what in (("tokens_per_sec", "tokens/s (global)", "Throughput"),
                                        ("peak_mem_gib", "peak memory per rank (GiB)", "Peak memory")):
                key = f"compare-{stem}-{metric}"
                rep.figures[key] = plots.comparison(t, metric, label, f"{what}: baseline vs candidate — {setup}",
                                                    fmt=lambda v, m=metric: format_value(m, v))
                rep.captions[key] = f"{what}, baseline vs candidate (label: % delta) — {setup}"
                keys.append(key)
        md += [f"## {setup}", "", markdown_table(md_header, rows_md), ""]
        md += [f"![{rep.captions[k]}]({k}.png)" for k in keys] + ([""] if keys else [])
        sections.append({"heading": setup, "groups": groups, "header": header, "rows": rows_html,
                         "figures": figures_for(rep, keys)})
    page = render_page("Baseline vs candidate", "Per setup, strategies fastest first. Green: better, red: worse "
                       "(by each metric's direction). Tokens/s per device = tokens/s / world size.", sections)
    return rep, page, "\n".join(md)
