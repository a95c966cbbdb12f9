"""Reports on synthetic and real result tables: numbers equal the data, figures hold the expected
series and labels (inspected as objects), the HTML references every plot, bad input fails clearly."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from bench.harness.table import append_row, write_steps
from reports import build, compare, load
from reports.aggregate import summarise
from reports.record import REQUIRED_COLUMNS
from tests.helpers import ROOT, md_rows

pytestmark = pytest.mark.unit

GIB = 2**30


def row(run_id, strategy, ws, tps, mem_gib, mfu, status="ok", model="tiny", error=None, loss=2.0):
    r = {c: None for c in REQUIRED_COLUMNS}
    tps = tps or 1.0
    r.update(run_id=run_id, model=model, strategy=strategy, world_size=ws, device="cpu", device_name="TestCPU",
             seq_len=32, micro_batch=2, grad_accum=1, global_batch_tokens=64 * ws, steps=4, warmup=1,
             tokens_per_sec=tps, tokens_per_sec_per_device=tps / ws, mfu=mfu, hfu=mfu,
             peak_mem_bytes=int(mem_gib * GIB), loss=loss, status=status, error=error, params=1000,
             step_time_median_s=64 * ws / tps, step_time_p10_s=0.9 * 64 * ws / tps, step_time_p90_s=1.2 * 64 * ws / tps)
    if status != "ok":
        for k in ("tokens_per_sec", "tokens_per_sec_per_device", "mfu", "hfu", "peak_mem_bytes", "loss"):
            r[k] = None
    return r


@pytest.fixture
def results(tmp_path):
    """2 world sizes x 3 strategies x 2 repeats, plus one failed run; per-step logs for every ok run."""
    d = tmp_path / "results"
    base = {"ddp": 1000.0, "fsdp": 800.0, "fsdp+ac(full)": 600.0}
    mem = {"ddp": 2.0, "fsdp": 1.5, "fsdp+ac(full)": 1.0}
    for (s, ws, rep) in itertools.product(base, (1, 2), (0, 1)):
        rid = f"{s}-{ws}-{rep}"
        tps = base[s] * ws * (0.9 if ws == 2 else 1.0) * (1 + 0.02 * rep)
        append_row(d, row(rid, s, ws, tps, mem[s] + 0.1 * rep, 0.1 * tps / 1000))
        write_steps(d, rid, [{"step": i, "phase": "warmup" if i == 0 else "timed", "loss": 5.0 - i * 0.1,
                              "step_time_s": None if i == 0 else 0.05 + 0.001 * i} for i in range(5)])
    append_row(d, row("boom", "ddp", 2, 0, 0, 0, status="error", error="rank 1: RuntimeError: boom"))
    return d


def test_tables_hold_the_medians_of_the_data(results):
    df = load(results)
    setups = summarise(df)
    assert [s["key"][2] for s in setups] == [1, 2]  # world sizes never mixed
    for s in setups:
        ws = s["key"][2]
        raw = df[(df.world_size == ws) & (df.status == "ok")]
        for strategy, r in s["table"].iterrows():
            runs = raw[raw.strategy == strategy]
            assert r.tokens_per_sec == pytest.approx(runs.tokens_per_sec.median())
            assert r.peak_mem_gib == pytest.approx((runs.peak_mem_bytes / GIB).median())
            assert r.tokens_per_sec_lo == pytest.approx(runs.tokens_per_sec.min())
            assert r.tokens_per_sec_hi == pytest.approx(runs.tokens_per_sec.max())
            assert sorted(r.run_ids) == sorted(runs.run_id)
    failed = setups[1]["failed"]
    assert failed == [{"strategy": "ddp", "status": "error", "error": "rank 1: RuntimeError: boom", "run_id": "boom"}]
    assert setups[1]["table"].loc["ddp", "runs"] == "2/3"


def test_figures_show_the_data(results):
    rep = build.build(load(results))
    setup = summarise(load(results))[0]
    stem = "tiny-1x-testcpu-s32-mb2-ga1"
    table = setup["table"]
    ax_tps, ax_mfu = rep.figures[f"{stem}-throughput"].axes
    widths = [p.get_width() for p in ax_tps.patches]
    assert widths == pytest.approx(list(table.tokens_per_sec[::-1]))
    assert [t.get_text() for t in ax_tps.get_yticklabels()] == list(table.index[::-1])
    assert "tokens/s" in ax_tps.get_xlabel() and "MFU" in ax_mfu.get_xlabel()
    assert [p.get_width() for p in ax_mfu.patches] == pytest.approx(list(table.mfu[::-1] * 100))
    mem_ax = rep.figures[f"{stem}-memory"].axes[0]
    assert [p.get_width() for p in mem_ax.patches] == pytest.approx(list(table.peak_mem_gib[::-1]))
    assert "GiB" in mem_ax.get_xlabel()
    assert list(table.index) == ["ddp", "fsdp", "fsdp+ac(full)"]  # fastest first
    board = next(b for b in rep.boards if b["title"] == "tiny on 1x TestCPU")
    assert list(board["table"].strategy) == list(table.index)
    assert list(board["table"].tokens_per_sec) == pytest.approx(list(table.tokens_per_sec))
    assert board["table"].pareto.all()  # each is faster but bigger than the next: all on the front
    pa_ax = rep.figures[board["figure"]].axes[0]
    front = next(ln for ln in pa_ax.lines if ln.get_label() == "Pareto front")
    assert list(front.get_xdata()) == pytest.approx(sorted(table.peak_mem_gib))
    assert sorted(t.get_text() for t in pa_ax.texts) == sorted(table.index)
    loss_ax = rep.figures[f"{stem}-loss"].axes[0]
    assert [ln.get_label() for ln in loss_ax.lines] == list(table.index)
    assert list(loss_ax.lines[0].get_ydata()) == pytest.approx([5.0 - i * 0.1 for i in range(5)])
    box_ax = rep.figures[f"{stem}-steptimes"].axes[0]
    assert [t.get_text() for t in box_ax.get_yticklabels()] == list(table.index[::-1])
    scaling = [k for k in rep.figures if k.startswith("scaling-world")]
    assert len(scaling) == 1
    sc_ax, eff_ax = rep.figures[scaling[0]].axes
    solid = [ln for ln in sc_ax.lines if ln.get_linestyle() == "-"]
    assert sorted(ln.get_label() for ln in solid) == sorted(table.index)
    ddp = next(ln for ln in eff_ax.lines if ln.get_label() == "ddp")
    assert list(ddp.get_ydata()) == pytest.approx([100.0, 90.0])  # 2 ranks at 0.9x ideal


def test_glance_leaderboard_pareto_front_and_mfu_heat_map(tmp_path):
    """Two models on one hardware: leaderboards smallest model first, fastest first, the dominated strategy
    off the front; the heat map holds the best MFU per strategy and model; no figure for a lone point."""
    d = tmp_path / "r"
    for i, (model, params, strategy, tps, mem, mfu) in enumerate([
            ("big", 9000, "ddp", 500.0, 4.0, 0.30), ("big", 9000, "fsdp", 400.0, 3.0, 0.24),
            ("big", 9000, "fsdp+ac(full)", 300.0, 3.5, 0.18),  # slower and bigger than fsdp: dominated
            ("small", 1000, "ddp", 2000.0, 1.0, 0.20), ("small", 1000, "fsdp", 1500.0, 0.8, 0.15),
            ("lone", 5000, "ddp", 700.0, 2.0, 0.25)]):
        append_row(d, row(f"r{i}", strategy, 1, tps, mem, mfu, model=model) | {"params": params})
    rep = build.build(load(d))
    assert [b["model"] for b in rep.boards] == ["small", "lone", "big"]  # by parameter count
    big = rep.boards[2]["table"]
    assert list(big.strategy) == ["ddp", "fsdp", "fsdp+ac(full)"]
    assert list(big.pareto) == [True, True, False]
    assert rep.boards[1]["figure"] is None  # one point: no scatter
    (key,) = rep.heatmaps
    ax = rep.figures[key].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["small", "lone", "big"]
    cells = {t.get_text() for t in ax.texts}
    assert {"30.0%", "24.0%", "18.0%", "20.0%", "15.0%", "25.0%"} == cells
    image = ax.images[0].get_array()
    assert image[0, 2] == pytest.approx(30.0) and np.ma.is_masked(image[2, 0])  # ddp row first; ac on small: none
    html = build.to_html(rep)
    assert html.index("At a glance") < html.index("Per setup") and "<th>batch</th>" in html
    assert '<td class="best">fsdp</td>' in html and "<td>fsdp+ac(full)</td>" in html


def test_many_strategies_do_not_overlap(tmp_path):
    d = tmp_path / "r"
    names = [f"fsdp+ac(selective/{k})+bf16+compile(model)" for k in range(12)]
    for i, n in enumerate(names):
        append_row(d, row(f"r{i}", n, 1, 100.0 + i, 1.0, 0.1))
    rep = build.build(load(d))
    fig = next(f for k, f in rep.figures.items() if k.endswith("-throughput"))
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in fig.axes[0].get_yticklabels()]
    assert len(boxes) == 12
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    assert all(b.x0 >= 0 for b in boxes)  # not cut off on the left


@pytest.mark.e2e
def test_cli_writes_self_contained_html_png_svg_and_markdown(results, tmp_path):
    out = tmp_path / "report"
    res = subprocess.run([sys.executable, "-m", "reports", f"results={results}", f"out={out}"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    page = (out / "index.html").read_text()
    pngs = sorted(p.stem for p in out.glob("*.png"))
    assert pngs and sorted(p.stem for p in out.glob("*.svg")) == pngs
    for stem in pngs:
        assert f'id="{stem}"' in page and f'href="{stem}.png"' in page
    assert page.count("data:image/png;base64,") == len(pngs)
    assert "rank 1: RuntimeError: boom" in page
    md = (out / "summary.md").read_text()
    assert re.search(r"\| ddp +\| 2/2 +\| \*\*", md)  # ddp has the best tokens/s at world size 1 and is marked
    assert all(f"({stem}.png)" in md for stem in pngs)


@pytest.mark.e2e
def test_baseline_vs_candidate(results, tmp_path):
    cand = tmp_path / "cand"
    for r in load(results).to_dict("records"):
        r = {k: v for k, v in r.items() if k != "source_file" and not (isinstance(v, float) and v != v)}
        if r.get("status") == "ok" and r["strategy"] == "fsdp":
            r["tokens_per_sec"] *= 0.9
            r["peak_mem_bytes"] = int(r["peak_mem_bytes"] * 0.5)
        append_row(cand, {c: r.get(c) for c in REQUIRED_COLUMNS} | r)
    cmp = compare.compare(load(results), load(cand))
    fsdp = cmp[cmp.strategy == "fsdp"].iloc[0]
    assert fsdp.tokens_per_sec_delta_pct == pytest.approx(-10.0)
    assert fsdp.tokens_per_sec_verdict == "worse" and fsdp.peak_mem_gib_verdict == "better"
    assert cmp[cmp.strategy == "ddp"].iloc[0].tokens_per_sec_delta_pct == pytest.approx(0.0)
    out = tmp_path / "cmpout"
    res = subprocess.run([sys.executable, "-m", "reports", f"baseline={results}", f"candidate={cand}",
                          f"out={out}"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    page = (out / "index.html").read_text()
    assert '<td class="worse">-10.0%</td>' in page and '<td class="better">-50.0%</td>' in page
    figs = [f for k, f in compare.report(load(results), load(cand))[0].figures.items() if "tokens" in k]
    assert len(figs) == 2  # one per setup (world size 1 and 2)
    for fig in figs:
        texts = [t.get_text() for t in fig.axes[0].texts]
        assert texts.count("-10.0%") == 1
        assert all(re.fullmatch(r"\d{1,3}(,\d{3})*", t) for t in texts[:3])  # baselines as the table prints them
    ws1 = cmp[(cmp.strategy == "ddp") & cmp.setup.str.contains(" 1x ")].iloc[0]
    assert f"{ws1.tokens_per_sec_baseline:,.0f}" in [t.get_text() for t in figs[0].axes[0].texts]


@pytest.mark.e2e
def test_comparison_without_common_setups_is_an_error(results, tmp_path):
    other = tmp_path / "other"
    append_row(other, row("x", "ddp", 1, 10.0, 1.0, 0.1, model="mini"))
    res = subprocess.run([sys.executable, "-m", "reports", f"baseline={results}", f"candidate={other}",
                          f"out={tmp_path / 'o'}"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "share no setup" in res.stderr


@pytest.mark.e2e
def test_torn_line_is_skipped_with_a_warning_or_refused_when_strict(tmp_path):
    d = tmp_path / "torn"
    d.mkdir()
    (d / "runs.jsonl").write_text(json.dumps(row("a", "ddp", 1, 1.0, 1.0, 0.1)) + "\n{\"run_id\": \"b\", \"mo")
    res = subprocess.run([sys.executable, "-m", "reports", f"results={d}", f"out={tmp_path / 'o'}"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"warning: {d / 'runs.jsonl'}:2: skipped: malformed JSON (truncated" in res.stderr
    assert "ddp" in [r[0] for r in md_rows((tmp_path / "o" / "summary.md").read_text())]  # the complete row
    res = subprocess.run([sys.executable, "-m", "reports", f"results={d}", f"out={tmp_path / 's'}", "strict=true"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "runs.jsonl:2: malformed JSON (truncated" in res.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("problem", ["empty", "not-object", "missing-column"])
def test_bad_input_is_a_clear_error(tmp_path, problem):
    d = tmp_path / "bad"
    d.mkdir()
    if problem == "not-object":  # no complete row at all: nothing to report
        (d / "runs.jsonl").write_text("[1, 2]\n")
        expect = "runs.jsonl: no result rows"
    elif problem == "missing-column":
        r = row("a", "ddp", 1, 1.0, 1.0, 0.1)
        del r["peak_mem_bytes"]
        (d / "runs.jsonl").write_text(json.dumps(r) + "\n")
        expect = "missing required columns ['peak_mem_bytes']"
    else:
        expect = "holds no result tables"
    res = subprocess.run([sys.executable, "-m", "reports", f"results={d}", f"out={tmp_path / 'o'}"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 2 and expect in res.stderr and str(d) in res.stderr
    assert not (tmp_path / "o").exists()


def test_real_gpu_results_report(tmp_path):
    df = load(ROOT / "results" / "gpu")
    rep = build.build(df)
    covered = {rid for s in rep.setups for ids in s["table"].run_ids for rid in ids}
    assert covered == set(df.run_id)  # every run appears
    small = next(s for s in rep.setups if s["key"][0] == "gpt2-small" and s["key"][4] == 16)
    assert small["table"].loc["single+bf16+compile(model)", "mfu"] == pytest.approx(
        df[(df.strategy == "single+bf16+compile(model)") & (df.micro_batch == 16)].mfu.iloc[0])
    assert [b["model"] for b in rep.boards] == ["gpt2-small", "gpt2-medium", "gpt2-large"]
    assert rep.heatmaps and all(b["figure"] for b in rep.boards if len(b["table"]) > 1)


def test_memory_plot_stacks_predicted_parts_beside_measured(tmp_path):
    d = tmp_path / "r"
    parts = {"params": 1 * GIB, "optimizer": 2 * GIB, "activations": 3 * GIB}
    for i, s in enumerate(["ddp", "fsdp"]):
        r = row(f"m{i}", s, 1, 100.0, 7.5 + i, 0.1)
        r.update(pred_mem_breakdown={k: v * (1 + i) for k, v in parts.items()}, mem_baseline_bytes=GIB // 2)
        append_row(d, r)
    rep = build.build(load(d))
    ax = next(f for k, f in rep.figures.items() if k.endswith("-memory")).axes[0]
    measured = [c for c in ax.containers if c.get_label() == "measured peak"][0]
    assert [p.get_width() for p in measured] == pytest.approx([8.5, 7.5])  # y order: fsdp (bottom), ddp (top)
    stacked = [c for c in ax.containers if c.get_label() != "measured peak"]
    labels = [c.get_label() for c in stacked]
    assert labels == ["measured: process before the model", "predicted: params", "predicted: optimizer",
                      "predicted: activations"]
    ends = [c.patches[-1].get_x() + c.patches[-1].get_width() for c in stacked]  # ddp row (bottom)
    assert ends[-1] == pytest.approx(0.5 + 6.0)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["fsdp", "ddp"]


def test_meshes_are_compared_per_setup(tmp_path):
    """A setup whose strategies run on different device meshes gets a figure grouping them by mesh: bars are
    the rows' tokens/s per device and peak memory, labels carry the mesh, one legend entry per mesh."""
    d = tmp_path / "results"
    rows = {"fsdp": ("dp4", 4000.0, 1.0), "fsdp+tp2+sp": ("dp2xtp2", 3000.0, 0.6), "tp2": ("dp2xtp2", 2000.0, 0.8),
            "fsdp+pp2(1f1b)": ("pp2xdp2", 3500.0, 0.7)}
    for name, (mesh, tps, mem) in rows.items():
        r = row(name, name, 4, tps, mem, 0.1)
        r["mesh"] = mesh
        append_row(d, r)
    rep = build.build(load(d))
    fig = rep.figures["tiny-4x-testcpu-s32-mb2-ga1-meshes"]
    ax_tps, ax_mem = fig.axes
    labels = [t.get_text() for t in ax_tps.get_yticklabels()]
    assert labels == ["tp2  [dp2xtp2]", "fsdp+tp2+sp  [dp2xtp2]", "fsdp+pp2(1f1b)  [pp2xdp2]", "fsdp  [dp4]"]
    per_device = {n: tps / 4 for n, (_, tps, _) in rows.items()}
    assert [p.get_width() for p in ax_tps.patches] == pytest.approx([per_device[lab.split("  ")[0]] for lab in labels])
    assert [p.get_width() for p in ax_mem.patches] == pytest.approx([rows[lab.split("  ")[0]][2] for lab in labels])
    assert [t.get_text() for t in ax_mem.get_legend().get_texts()] == ["dp4", "pp2xdp2", "dp2xtp2"]
    # one mesh only: no such figure
    d2 = tmp_path / "one"
    append_row(d2, {**row("a", "fsdp", 4, 10.0, 1.0, 0.1), "mesh": "dp4"})
    append_row(d2, {**row("b", "ddp", 4, 10.0, 1.0, 0.1), "mesh": "dp4"})
    assert not any(k.endswith("-meshes") for k in build.build(load(d2)).figures)
