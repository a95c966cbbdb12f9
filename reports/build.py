"""Turn result rows into a report: figures, tables, ``index.html`` (self-contained), ``summary.md``.

    python -m reports results/ --out report/          # see reports/__main__.py
"""

from __future__ import annotations

import base64
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from reports import glance, implementations, plots, quality
from reports.aggregate import COLUMNS, best_strategies, format_value, summarise
from reports.load import ResultsError, load_steps


@dataclass
class Report:
    figures: dict[str, Figure] = field(default_factory=dict)  # file stem -> figure
    captions: dict[str, str] = field(default_factory=dict)
    setups: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    boards: list[dict] = field(default_factory=list)  # reports/glance.py leaderboards (+ "figure" key or None)
    heatmaps: list[str] = field(default_factory=list)  # figure keys of the MFU heat maps
    pairs: pd.DataFrame = field(default_factory=pd.DataFrame)  # reports/implementations.py: family vs HF
    races: list[dict] = field(default_factory=list)  # reports/quality.py: time to a target over seeds, shown first


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:80]


def _steps_for(rec_row: pd.Series) -> pd.DataFrame | None:
    """The per-step log of the first ok run behind an aggregated row (None if absent)."""
    for run_id, src in zip(rec_row.run_ids, rec_row.source_files):
        try:
            return load_steps(Path(src).parent, run_id)
        except ResultsError:
            continue
    return None


def build(df: pd.DataFrame) -> Report:
    """All figures and tables for the rows in ``df``: first the glance (leaderboards, Pareto fronts, MFU heat
    maps), then per setup. No figure is made for fewer than two things to compare."""
    rep = Report(setups=summarise(df))
    _quality(rep, df)
    _glance(rep)
    rep.pairs = implementations.pairs(rep.setups)
    if not rep.pairs.empty:
        rep.figures["implementations"] = plots.implementations(rep.pairs, PAIRS_TITLE)
        rep.captions["implementations"] = f"{PAIRS_TITLE}: tokens/s and peak memory"
    for setup in rep.setups:
        table, label = setup["table"], setup["label"]
        model, device, ws, seq, mb, ga = setup["key"]
        stem = slug(f"{model}-{ws}x-{device}-s{seq}-mb{mb}-ga{ga}")
        setup["stem"] = stem
        ok = table[table.n_ok > 0]
        if ok.empty:
            rep.notes.append(f"{label}: no successful run, no plots")
            continue
        if len(ok) > 1:  # one strategy: its numbers are in the table and the leaderboard, no one-bar chart
            rep.figures[f"{stem}-throughput"] = plots.throughput_mfu(ok, label)
            rep.captions[f"{stem}-throughput"] = f"Throughput and MFU per strategy — {label}"
        pred = pd.DataFrame({name: r.pred_parts_gib for name, r in ok.iterrows()}).T \
            if any(r.pred_parts_gib for _, r in ok.iterrows()) else None
        if len(ok) > 1 or pred is not None:  # with predicted parts, one strategy is still two bars
            rep.figures[f"{stem}-memory"] = plots.memory(ok, label, predicted=pred)
            beside = " beside the predicted parts (bench/plan/costmodel.py)" if pred is not None else ""
            rep.captions[f"{stem}-memory"] = f"Peak memory per strategy, measured{beside} — {label}"
        if "mesh" in ok and ok["mesh"].replace("", None).dropna().nunique() > 1:
            rep.figures[f"{stem}-meshes"] = plots.meshes(ok, label)
            rep.captions[f"{stem}-meshes"] = f"Device meshes compared (tokens/s per device, memory per rank) — {label}"
        steps = {name: _steps_for(r) for name, r in ok.iterrows()}
        missing = [n for n, s in steps.items() if s is None]
        if missing:
            rep.notes.append(f"{label}: no per-step log for {', '.join(missing)}")
        steps = {n: s for n, s in steps.items() if s is not None}
        timed = {n: list(s[s.phase == "timed"].step_time_s.dropna()) for n, s in steps.items()}
        timed = {n: t for n, t in timed.items() if t}
        if len(timed) > 1:
            rep.figures[f"{stem}-steptimes"] = plots.step_times(timed, label)
            rep.captions[f"{stem}-steptimes"] = f"Step-time distribution — {label}"
        if steps:
            rep.figures[f"{stem}-loss"] = plots.loss_curves(steps, label)
            rep.captions[f"{stem}-loss"] = f"Loss curves — {label}"
    _scaling(rep)
    return rep


def _quality(rep: Report, df: pd.DataFrame) -> None:
    """The races to a target loss (reports/quality.py): leaderboard, verdicts against the soonest, loss curves."""
    for race in quality.races(df):
        table = quality.board(race)
        calls = quality.verdicts(race, table)
        logs = {}
        for _, r in table.iterrows():
            got = []
            for run_id, src in zip(r.run_ids, r.source_files):
                try:
                    got.append(load_steps(Path(src).parent, run_id))
                except ResultsError:
                    rep.notes.append(f"{race['label']}: no per-step log for run {run_id}")
            if got:
                logs[r.recipe] = got
        key = None
        if logs:
            key = "quality-" + slug(race["label"])
            rep.figures[key] = plots.quality_curves(logs, race["label"], race["key"][-1])
            rep.captions[key] = f"Held-out and training loss per recipe, seeds as a band — {race['label']}"
        rep.races.append({"label": race["label"], "table": table, "calls": calls, "figure": key})


QUALITY_INTRO = ("Time to the target held-out loss: training seconds (evaluation excluded), median over seeds "
                 "(min-max); each recipe against the soonest by an exact one-sided permutation test over the "
                 "seeds (reports/quality.py), sure when p < 0.01.")


def _glance(rep: Report) -> None:
    """Leaderboards with their Pareto-front figure (two points or more), and the MFU heat maps."""
    for board in glance.leaderboards(rep.setups):
        key = None
        if board["table"].dropna(subset=["peak_mem_gib", "tokens_per_sec"]).shape[0] > 1:
            key = "glance-pareto-" + slug(board["title"])
            rep.figures[key] = plots.pareto(board["table"], board["title"])
            rep.captions[key] = f"Throughput vs memory, Pareto front in red — {board['title']}"
        rep.boards.append({**board, "figure": key})
    for hardware, matrix in glance.mfu_matrix(rep.setups):
        key = "glance-mfu-" + slug(hardware)
        rep.figures[key] = plots.heatmap(matrix, hardware)
        rep.captions[key] = f"Best MFU per strategy and model (over sequence lengths and micro-batches) — {hardware}"
        rep.heatmaps.append(key)


def _scaling(rep: Report) -> None:
    rows = []
    for s in rep.setups:
        model, device, ws, seq, mb, ga = s["key"]
        for strategy, r in s["table"][s["table"].n_ok > 0].iterrows():
            rows.append({"model": model, "device_name": device, "world_size": ws, "seq_len": seq, "micro_batch": mb,
                         "grad_accum": ga, "strategy": strategy, "tokens_per_sec": r.tokens_per_sec,
                         "params": s["params"]})
    pts = pd.DataFrame(rows)
    if pts.empty:
        return
    for key, g in pts.groupby(["model", "device_name", "seq_len", "micro_batch", "grad_accum"]):
        g = g.groupby("strategy").filter(lambda s: s.world_size.nunique() > 1)  # a line needs two points
        if not g.empty:
            stem = slug(f"scaling-world-{key[0]}-{key[1]}-mb{key[3]}")
            title = f"{key[0]} on {key[1]}, micro-batch {key[3]}: scaling with world size"
            rep.figures[stem] = plots.scaling(g, "world_size", "world size (devices)", title, ideal=True)
            rep.captions[stem] = title
    for key, g in pts.dropna(subset=["params"]).groupby(["device_name", "world_size", "seq_len", "micro_batch",
                                                         "grad_accum"]):
        g = g.groupby("strategy").filter(lambda s: s.model.nunique() > 1)  # same setup but the model
        if not g.empty:
            stem = slug(f"scaling-model-{key[0]}-{key[1]}-s{key[2]}-mb{key[3]}-ga{key[4]}")
            title = f"{key[1]}x {key[0]}, seq {key[2]}, micro-batch {key[3]}: scaling with model size"
            rep.figures[stem] = plots.scaling(g, "params", "parameters", title, ideal=False)
            rep.captions[stem] = title


def _table_rows(table: pd.DataFrame, best: dict) -> list[list[tuple[str, bool]]]:
    """Per strategy: (text, is the best in its column) cells in HEADER order."""
    rows = []
    for name, r in table.iterrows():
        cells = [(name, False), (r.runs, False)]
        cells += [(format_value(c, r[c]), best.get(c) == name) for c in COLUMNS]
        cells.append((r.status, False))
        rows.append(cells)
    return rows


HEADER = ["strategy", "runs ok"] + [COLUMNS[c][0] for c in COLUMNS] + ["status"]
# Fits a 1280 px window: cells never wrap mid-value, headers may; a wide table scrolls inside its own box.
CSS = """body{font-family:system-ui,sans-serif;margin:1em auto;padding:0 1em;max-width:1240px;box-sizing:border-box}
.tw{overflow-x:auto;max-width:100%}table{border-collapse:collapse;margin:.5em 0;font-size:12px}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td{white-space:nowrap}th{font-weight:600}
td:first-child,th:first-child{text-align:left}td.best{font-weight:bold;background:#dff5df}
td.better{color:#11772b;font-weight:bold}td.worse{color:#b3261e;font-weight:bold}
img{max-width:100%;height:auto;border:1px solid #eee}figure{margin:.5em 0}
.pair{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}.pair>div{flex:1 1 560px;min-width:0}
.pair>div.figs{flex:0 1 540px}h3{margin:.6em 0 .2em;font-size:1em}.failed{color:#b3261e}"""
_TEMPLATES = Path(__file__).with_name("templates")


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table (pandas' to_markdown)."""
    return pd.DataFrame(rows, columns=header).to_markdown(index=False)


def render_page(title: str, intro: str, sections: list[dict]) -> str:
    """The one HTML page template (reports/templates/page.html.j2, autoescaped). A section may have
    heading, header + rows (cells: {text, cls}), failed (run dicts), figures ({key, caption, png}), bullets."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(_TEMPLATES), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True)
    return env.get_template("page.html.j2").render(title=title, intro=intro, css=CSS, sections=sections)


def figures_for(rep: Report, keys: list[str]) -> list[dict]:
    return [{"key": k, "caption": rep.captions[k], "png": _png_b64(rep.figures[k])} for k in keys]


GLANCE_INTRO = ("Fastest first, per model and hardware (medians over repeated runs). Highlighted: the Pareto "
                "front (nothing else is both faster and leaner).")


PAIRS_TITLE = "The family's model and Hugging Face's, same setup and strategy"
PAIRS_INTRO = ("model.source=native (models/gpt.py) against model.source=hf (transformers, models/hf.py): same "
               "architecture and starting weights; HF / family above 1 = HF faster (tokens/s) or larger (memory).")


def _board_cells(board: dict) -> list[list[tuple[str, bool]]]:
    return [[(v, i == 0 and front) for i, v in enumerate(cells)]
            for cells, front in zip(glance.board_rows(board["table"]), board["table"].pareto)]


def to_markdown(rep: Report, image_ext: str = "png") -> str:
    out = ["# n00bGPT report", ""]
    for race in rep.races:
        out += [f"## Time to target: {race['label']}", "", QUALITY_INTRO, "",
                markdown_table(quality.BOARD_COLUMNS, quality.board_rows(race["table"], race["calls"])), ""]
        out += [f"- {c['text']}" for c in race["calls"]] + ([""] if race["calls"] else [])
        if race["figure"]:
            out += [f"![{rep.captions[race['figure']]}]({race['figure']}.{image_ext})", ""]
    if rep.boards:
        out += ["## At a glance", "", GLANCE_INTRO.replace("Highlighted", "In **bold**"), ""]
        out += [f"![{rep.captions[k]}]({k}.{image_ext})" for k in rep.heatmaps] + ([""] if rep.heatmaps else [])
        for board in rep.boards:
            out += [f"### {board['title']}", "", markdown_table(glance.BOARD_COLUMNS, [
                [f"**{v}**" if b else v for v, b in row] for row in _board_cells(board)]), ""]
            if board["figure"]:
                out += [f"![{rep.captions[board['figure']]}]({board['figure']}.{image_ext})", ""]
    if not rep.pairs.empty:
        out += [f"## {PAIRS_TITLE}", "", PAIRS_INTRO, "",
                markdown_table(implementations.HEADER, implementations.table_rows(rep.pairs)), "",
                f"![{rep.captions['implementations']}](implementations.{image_ext})", ""]
    out += ["## Per setup", "", "Best value per column in **bold**. Medians over repeated runs; "
            "definitions in bench/measure/metrics.py and reports/aggregate.py.", ""]
    for s in rep.setups:
        cells = _table_rows(s["table"], best_strategies(s["table"]))
        out += [f"### {s['label']}", "", markdown_table(HEADER, [[f"**{v}**" if b else v for v, b in row]
                                                                  for row in cells])]
        if s["failed"]:
            out += ["", "Runs left out (failed, or suspect: a number that cannot be true):", ""]
            out += [f"- `{f['strategy']}` ({f['status']}, run {f['run_id']}): {f['error']}" for f in s["failed"]]
        out.append("")
        out += [f"![{rep.captions[k]}]({k}.{image_ext})" for k in rep.figures if k.startswith(s.get("stem", "\0"))]
        out.append("")
    scaling = [k for k in rep.figures if k.startswith("scaling-")]
    if scaling:
        out += ["## Scaling", ""] + [f"![{rep.captions[k]}]({k}.{image_ext})" for k in scaling] + [""]
    if rep.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in rep.notes] + [""]
    return "\n".join(out)


def _png_b64(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode()


def to_html(rep: Report, title: str = "n00bGPT report") -> str:
    sections = []
    if rep.boards:  # per hardware: the leaderboards' tables on the left, the heat map and Pareto fronts right
        blocks = []
        for hardware in dict.fromkeys(b["hardware"] for b in rep.boards):
            boards = [b for b in rep.boards if b["hardware"] == hardware]
            keys = [k for k in rep.heatmaps if k == "glance-mfu-" + slug(hardware)]  # all models at once first
            keys += [b["figure"] for b in boards if b["figure"]]
            blocks.append({"hardware": hardware, "figures": figures_for(rep, keys), "boards": [
                {"title": b["title"], "header": glance.BOARD_COLUMNS,
                 "rows": [[{"text": v, "cls": "best" if f else ""} for v, f in row] for row in _board_cells(b)]}
                for b in boards]})
        sections.append({"heading": "At a glance", "intro": GLANCE_INTRO, "glance": blocks})
    if not rep.pairs.empty:
        sections.append({"heading": PAIRS_TITLE, "intro": PAIRS_INTRO, "header": implementations.HEADER,
                         "groups": implementations.GROUPS,
                         "rows": [[{"text": v, "cls": ""} for v in row]
                                  for row in implementations.table_rows(rep.pairs)],
                         "figures": figures_for(rep, ["implementations"])})
    for s in rep.setups:
        rows = [[{"text": v, "cls": "best" if b else ""} for v, b in row]
                for row in _table_rows(s["table"], best_strategies(s["table"]))]
        sections.append({"heading": s["label"], "header": HEADER, "rows": rows, "failed": s["failed"],
                         "figures": figures_for(rep, [k for k in rep.figures if k.startswith(s.get("stem", "\0"))])})
    scaling = [k for k in rep.figures if k.startswith("scaling-")]
    if scaling:
        sections.append({"heading": "Scaling", "figures": figures_for(rep, scaling)})
    if rep.notes:
        sections.append({"heading": "Notes", "bullets": rep.notes})
    if rep.boards:
        at = 2 if not rep.pairs.empty else 1  # after the glance (and the implementations)
        sections.insert(at, {"heading": "Per setup", "intro": "Best value per column highlighted. Medians over "
                            "repeated runs; definitions in bench/measure/metrics.py and reports/aggregate.py."})
    races = [{"heading": f"Time to target: {race['label']}", "intro": QUALITY_INTRO, "header": quality.BOARD_COLUMNS,
              "rows": [[{"text": v, "cls": "best" if i == 0 and j == 0 else ""} for j, v in enumerate(row)]
                       for i, row in enumerate(quality.board_rows(race["table"], race["calls"]))],
              "bullets": [c["text"] for c in race["calls"]],
              "figures": figures_for(rep, [race["figure"]] if race["figure"] else [])} for race in rep.races]
    return render_page(title, "", races + sections)  # the races first: quality is what they were run for


def check_out(out_dir: str | Path) -> None:
    """ResultsError unless the report's folder can be made and written, found by doing it: the folder made (as
    ``write`` will), a file created and removed in it, and the folders this made removed again."""
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise ResultsError(f"out={str(out_dir)!r} exists and is not a folder (the report is a folder of files)")
    made = [p for p in [out, *out.parents] if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ResultsError(f"out={str(out_dir)!r}: cannot write the report there: {exc.strerror or exc}") from None
    finally:
        for p in made:  # deepest first
            if p.is_dir():
                p.rmdir()


def write(rep: Report, out_dir: str | Path, html_text: str | None = None, markdown: str | None = None) -> Path:
    """Write every figure as PNG and SVG, then index.html and summary.md; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stem, fig in rep.figures.items():
        fig.savefig(out / f"{stem}.png", dpi=100)
        fig.savefig(out / f"{stem}.svg")
    (out / "summary.md").write_text(markdown if markdown is not None else to_markdown(rep))
    index = out / "index.html"
    index.write_text(html_text if html_text is not None else to_html(rep))
    return index
