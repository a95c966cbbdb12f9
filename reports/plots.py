"""Matplotlib figures for the report. Each function returns a Figure (tests inspect it); none writes files.

Strategies go on the y axis of horizontal bars, so 10+ long names never overlap; every axis says
its unit; bars carry their value as a label.
"""

from __future__ import annotations

import textwrap

import matplotlib
import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

_MPL = tuple(int(x) for x in matplotlib.__version__.split(".")[:2])

# Figures are built with the object API (no pyplot state): nothing is kept open between reports.


def _wrap(title: str, width: int = 80) -> str:
    return textwrap.fill(title, width)


def _subplots(nrows=1, ncols=1, figsize=(8, 5), **kw):
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kw)


def _height(n: int) -> float:
    return max(2.8, 0.45 * n + 1.4)


def throughput_mfu(table: pd.DataFrame, title: str) -> Figure:
    """tokens/s (error bars: spread, see aggregate.py) and MFU per strategy, side by side."""
    t = table.iloc[::-1]  # first strategy on top
    names = list(t.index)
    fig, (ax1, ax2) = _subplots(1, 2, figsize=(12, _height(len(t))), sharey=True)
    tps = t.tokens_per_sec.fillna(0)
    err = [(tps - t.tokens_per_sec_lo.fillna(tps)).clip(lower=0), (t.tokens_per_sec_hi.fillna(tps) - tps).clip(lower=0)]
    bars = ax1.barh(names, tps, xerr=err, color="tab:blue", capsize=3)
    ax1.bar_label(bars, labels=[f"{v:,.0f}" for v in tps], padding=4, fontsize=8)
    ax1.set_xlabel("tokens/s (global), error bar = spread")
    ax1.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax1.set_title("Throughput")
    mfu = (t.mfu * 100).fillna(0)
    bars = ax2.barh(names, mfu, color="tab:orange")
    ax2.bar_label(bars, labels=[f"{v:.1f}%" if v else "n/a" for v in mfu], padding=4, fontsize=8)
    ax2.set_xlabel("MFU (%)")
    ax2.set_title("Model FLOPs utilisation")
    for ax in (ax1, ax2):
        ax.margins(x=0.25)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(_wrap(title, 120), fontsize=10)
    fig.tight_layout()
    return fig


def memory(table: pd.DataFrame, title: str, predicted: pd.DataFrame | None = None) -> Figure:
    """Measured peak memory per strategy (GiB); with ``predicted`` (columns = parts, GiB, indexed by
    strategy) the predicted parts are stacked on a second bar beside each measured one."""
    t = table.iloc[::-1]
    names = list(t.index)
    fig, ax = _subplots(figsize=(9 if predicted is None else 12, _height(len(t)) * (1.4 if predicted is not None
                                                                                    else 1)))
    if predicted is None:
        bars = ax.barh(names, t.peak_mem_gib.fillna(0), color="tab:green", label="measured peak")
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in t.peak_mem_gib.fillna(0)], padding=4, fontsize=8)
    else:
        y = np.arange(len(names))
        bars = ax.barh(y + 0.2, t.peak_mem_gib.fillna(0), height=0.4, color="0.3", label="measured peak")
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in t.peak_mem_gib.fillna(0)], padding=4, fontsize=8)
        left = np.zeros(len(names))
        pred = predicted.reindex(names).fillna(0)
        colors = ["#c7c7c7", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
                  "tab:pink", "tab:olive", "tab:cyan"]
        for i, part in enumerate(pred.columns):
            label = "measured: process before the model" if part == "process baseline" else f"predicted: {part}"
            ax.barh(y - 0.2, pred[part], height=0.4, left=left, label=label, color=colors[i % len(colors)])
            left += pred[part].to_numpy()
        ax.bar_label(ax.containers[-1], labels=[f"{v:.2f}" for v in left], padding=4, fontsize=8)
        ax.set_yticks(y, names)
    ax.set_xlabel("peak memory per rank (GiB)")
    ax.set_title(_wrap(title), fontsize=10)
    if predicted is None:
        ax.legend(fontsize=8, loc="lower right")
    else:  # many parts: legend beside the axes, never over the bars
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.margins(x=0.2)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def meshes(table: pd.DataFrame, title: str) -> Figure:
    """One setup's strategies grouped by device mesh (the ``mesh`` column: 'dp4', 'dp2xtp2', 'pp2xdp2', ...):
    tokens/s per device and peak memory per rank, one colour per mesh, meshes in order of their first
    strategy's throughput."""
    t = table.dropna(subset=["tokens_per_sec_per_device"]).copy()
    t["mesh"] = t["mesh"].replace("", "unknown")
    order = t.groupby("mesh").tokens_per_sec_per_device.max().sort_values(ascending=False).index
    t = pd.concat([t[t.mesh == m].sort_values("tokens_per_sec_per_device", ascending=False) for m in order])
    t = t.iloc[::-1]  # best on top
    labels = [f"{name}  [{m}]" for name, m in zip(t.index, t.mesh)]
    colours = {m: f"C{i}" for i, m in enumerate(order)}
    fig, (ax1, ax2) = _subplots(1, 2, figsize=(12, _height(len(t))), sharey=True)
    bars = ax1.barh(labels, t.tokens_per_sec_per_device, color=[colours[m] for m in t.mesh])
    ax1.bar_label(bars, labels=[f"{v:,.0f}" for v in t.tokens_per_sec_per_device], padding=4, fontsize=8)
    ax1.set_xlabel("tokens/s per device")
    ax1.set_title("Throughput per device")
    mem = t.peak_mem_gib.fillna(0)
    bars = ax2.barh(labels, mem, color=[colours[m] for m in t.mesh])
    ax2.bar_label(bars, labels=[f"{v:.2f}" for v in mem], padding=4, fontsize=8)
    ax2.set_xlabel("peak memory per rank (GiB)")
    ax2.set_title("Memory")
    for ax in (ax1, ax2):
        ax.margins(x=0.25)
        ax.grid(axis="x", alpha=0.3)
    ax2.legend(handles=[plt_patch(colours[m], m) for m in order], title="mesh", fontsize=8, loc="lower right")
    fig.suptitle(_wrap(f"Device meshes compared — {title}", 120), fontsize=10)
    fig.tight_layout()
    return fig


def plt_patch(colour: str, label: str):
    from matplotlib.patches import Patch

    return Patch(color=colour, label=label)


def scaling(points: pd.DataFrame, x: str, xlabel: str, title: str, ideal: bool) -> Figure:
    """tokens/s against ``x`` (world_size or params), one line per strategy; with ``ideal`` a dashed
    linear-scaling line per strategy from its smallest x, and a second panel with scaling efficiency."""
    ncols = 2 if ideal else 1
    fig, axes = _subplots(1, ncols, figsize=(6 * ncols, 4.5), squeeze=False)
    ax = axes[0][0]
    for strategy, s in points.groupby("strategy"):
        s = s.sort_values(x)
        line, = ax.plot(s[x], s.tokens_per_sec, marker="o", label=strategy)
        if ideal and len(s) > 1:
            base = s.iloc[0]
            ax.plot(s[x], base.tokens_per_sec * s[x] / base[x], ls="--", color=line.get_color(), alpha=0.5)
            eff = s.tokens_per_sec / (base.tokens_per_sec * s[x] / base[x]) * 100
            axes[0][1].plot(s[x], eff, marker="o", color=line.get_color(), label=strategy)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("tokens/s (global)")
    ax.set_title(_wrap(title + (" (dashed: ideal linear)" if ideal else ""), 60), fontsize=10)
    if x == "params":
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if ideal:
        axes[0][1].set_xlabel(xlabel)
        axes[0][1].set_ylabel("scaling efficiency (% of ideal)")
        axes[0][1].axhline(100, color="grey", lw=0.8)
        axes[0][1].set_title("Scaling efficiency", fontsize=10)
        axes[0][1].grid(alpha=0.3)
    fig.tight_layout()
    return fig


def step_times(per_strategy: dict[str, list[float]], title: str) -> Figure:
    """Distribution of timed step times (ms) per strategy, as horizontal box plots."""
    names = list(per_strategy)[::-1]
    fig, ax = _subplots(figsize=(9, _height(len(names))))
    data = [[t * 1e3 for t in per_strategy[n]] for n in names]
    if _MPL >= (3, 10):
        ax.boxplot(data, orientation="horizontal", tick_labels=names, whis=(0, 100))
    else:  # older matplotlib spells it vert=False (and labels=)
        ax.boxplot(data, vert=False, labels=names, whis=(0, 100))
    ax.set_xlabel("step time (ms); box = quartiles, whiskers = min/max")
    ax.set_title(_wrap(f"Step-time distribution — {title}"), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def loss_curves(per_strategy: dict[str, pd.DataFrame], title: str) -> Figure:
    """Training loss per step, one line per strategy on the same axes (parity is visible at a glance)."""
    fig, ax = _subplots(figsize=(8, 5))
    for name, steps in per_strategy.items():
        ax.plot(steps.step, steps.loss, marker=".", label=name, alpha=0.8)
    ax.set_xlabel("step (warm-up included)")
    ax.set_ylabel("training loss")
    ax.set_title(_wrap(f"Loss curves — {title}"), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def comparison(table: pd.DataFrame, metric: str, label: str, title: str, fmt=lambda v: f"{v:,.4g}") -> Figure:
    """Baseline vs candidate bars per strategy for ``metric`` (columns metric_baseline/_candidate); the
    baseline bar labelled with its value (``fmt``, as the tables print it), the candidate's with its delta."""
    t = table.iloc[::-1]
    y = np.arange(len(t))
    fig, ax = _subplots(figsize=(10, _height(len(t))))
    b = ax.barh(y + 0.2, t[f"{metric}_baseline"], height=0.4, label="baseline", color="tab:gray")
    c = ax.barh(y - 0.2, t[f"{metric}_candidate"], height=0.4, label="candidate", color="tab:blue")
    ax.bar_label(b, labels=[fmt(v) for v in t[f"{metric}_baseline"]], fontsize=7, padding=3)
    ax.bar_label(c, labels=[f"{d:+.1f}%" if d == d else "" for d in t[f"{metric}_delta_pct"]], fontsize=7, padding=3)
    ax.set_yticks(y, list(t.index))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: fmt(v)))
    ax.set_xlabel(label)
    ax.set_title(_wrap(title, 90), fontsize=10)
    ax.legend(fontsize=8)
    ax.margins(x=0.25)
    fig.tight_layout()
    return fig


def pareto(table: pd.DataFrame, title: str) -> Figure:
    """Throughput vs memory for one model on one hardware: every (setup, strategy) a point, the Pareto
    front (``pareto`` column: nothing both faster and leaner) in colour and joined, the rest grey; every
    point labelled. Up and to the left is better."""
    fig, ax = _subplots(figsize=(5.6, 3.5))
    t = table.dropna(subset=["peak_mem_gib", "tokens_per_sec"])
    front = t[t.pareto].sort_values("peak_mem_gib")
    rest = t[~t.pareto]
    ax.scatter(rest.peak_mem_gib, rest.tokens_per_sec, s=30, color="0.6", zorder=3, label="dominated")
    ax.plot(front.peak_mem_gib, front.tokens_per_sec, marker="o", color="tab:red", zorder=4, label="Pareto front")
    rank = t.tokens_per_sec.rank(method="first").astype(int)  # neighbours in throughput: labels above / below
    for (idx, r) in zip(t.index, t.itertuples()):
        label = r.strategy if t.micro_batch.nunique() == 1 else f"{r.strategy} (mb {r.micro_batch})"
        ax.annotate(label, (r.peak_mem_gib, r.tokens_per_sec), textcoords="offset points",
                    xytext=(5, 4 if rank[idx] % 2 else -10), fontsize=7, color="tab:red" if r.pareto else "0.35")
    ax.set_xlabel("peak memory per rank (GiB)")
    ax.set_ylabel("tokens/s (global)")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_title(_wrap(f"Throughput vs memory — {title}", 60), fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(0.25)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def heatmap(matrix: pd.DataFrame, title: str) -> Figure:
    """Strategy (rows) x model (columns) MFU in %, each cell annotated; a blank cell = not measured."""
    values = matrix.to_numpy(dtype=float) * 100
    fig, ax = _subplots(figsize=(5.6, 0.28 * matrix.shape[0] + 1.4))
    masked = np.ma.masked_invalid(values)
    im = ax.imshow(masked, cmap="viridis", aspect="auto", vmin=0, vmax=max(1.0, float(np.nanmax(values))))
    ax.set_xticks(range(matrix.shape[1]), list(matrix.columns))
    ax.set_yticks(range(matrix.shape[0]), list(matrix.index))
    for (i, j), v in np.ndenumerate(values):
        if v == v:
            ax.text(j, i, f"{v:.1f}%", ha="center", va="center", fontsize=8,
                    color="white" if v < 0.6 * np.nanmax(values) else "black")
    fig.colorbar(im, ax=ax, label="MFU (%)")
    ax.set_title(_wrap(f"MFU by strategy and model — {title}", 48), fontsize=10)
    fig.tight_layout()
    return fig


def implementations(pairs: pd.DataFrame, title: str) -> Figure:
    """The family's model against Hugging Face's per (model, strategy): tokens/s and peak memory, two bars each
    (reports/implementations.py ``pairs``)."""
    t = pairs.iloc[::-1]
    names = [f"{r.model} · {r.strategy}\n({r.hardware}, {r.batch})" for r in t.itertuples()]
    y = np.arange(len(names))
    fig, (ax1, ax2) = _subplots(1, 2, figsize=(12, _height(2 * len(t))), sharey=True)
    for ax, (fam, hf), unit, fmt in ((ax1, ("tokens_per_sec_family", "tokens_per_sec_hf"), "tokens/s (global)",
                                      "{:,.0f}"),
                                     (ax2, ("peak_mem_gib_family", "peak_mem_gib_hf"), "peak memory (GiB)", "{:.2f}")):
        for offset, col, label, color in ((0.2, fam, "family (models/gpt.py)", "tab:blue"),
                                          (-0.2, hf, "Hugging Face transformers", "tab:orange")):
            bars = ax.barh(y + offset, t[col].fillna(0), height=0.4, label=label, color=color)
            ax.bar_label(bars, labels=[fmt.format(v) for v in t[col].fillna(0)], padding=4, fontsize=8)
        ax.set_xlabel(unit)
        ax.margins(x=0.25)
        ax.grid(axis="x", alpha=0.3)
    ax1.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax1.set_yticks(y, names, fontsize=8)
    ax1.set_title("Throughput")
    ax2.set_title("Peak memory")
    ax1.legend(loc="lower right", fontsize=8)
    fig.suptitle(_wrap(title, 120), fontsize=10)
    fig.tight_layout()
    return fig


def quality_curves(per_recipe: dict[str, list[pd.DataFrame]], title: str, target: float | None = None) -> Figure:
    """Held-out loss (solid, with a band from the lowest to the highest seed) and training loss (dashed, median
    over seeds) per recipe, against steps, tokens and training seconds (eval excluded); one colour per recipe.
    The seconds axis puts each evaluation at the seeds' median training time to it."""
    fig, axes = _subplots(1, 3, figsize=(14, 4.5), sharey=True)
    for i, (name, logs) in enumerate(per_recipe.items()):
        colour = f"C{i % 10}"
        frame = pd.concat(logs, ignore_index=True)
        for c in ("step", "tokens", "train_time_s", "loss", "eval_loss"):
            frame[c] = pd.to_numeric(frame[c], errors="coerce") if c in frame else float("nan")
        train = frame.groupby("step")[["tokens", "train_time_s", "loss"]].median().reset_index()
        evals = frame.dropna(subset=["eval_loss"]).groupby("step").agg(
            tokens=("tokens", "median"), train_time_s=("train_time_s", "median"), lo=("eval_loss", "min"),
            hi=("eval_loss", "max"), mid=("eval_loss", "median")).reset_index()
        for ax, x in zip(axes, ("step", "tokens", "train_time_s")):
            ax.plot(train[x], train.loss, linestyle="--", color=colour, alpha=0.5, linewidth=1)
            if not evals.empty:
                ax.fill_between(evals[x], evals.lo, evals.hi, color=colour, alpha=0.2, linewidth=0)
                ax.plot(evals[x], evals.mid, color=colour, marker=".",
                        label=f"{name} ({len(logs)} seed{'s' if len(logs) > 1 else ''})" if x == "step" else None)
    for ax, xlabel in zip(axes, ("step (warm-up included)", "tokens trained", "training seconds (eval excluded)")):
        if target:
            ax.axhline(target, color="black", linewidth=0.8, linestyle=":")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (solid: held-out, band: seeds' range; dashed: training)")
    axes[0].legend(fontsize=8)
    fig.suptitle(_wrap(f"Loss curves — {title}", 140), fontsize=10)
    fig.tight_layout()
    return fig
