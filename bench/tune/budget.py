"""The step-time model's error budget: how far its predictions are from committed measured rows (docs/planner.md).

    python -m bench.tune.budget        # the table docs/planner.md shows: results/tune-cpu*, and gpu

Two kinds of rows:

- **the tuner's** (``python -m bench.tune``; results/tune-cpu, results/tune-cpu-all): every row carries the
  prediction its own run made from the rates it measured (the probes, the model's parts: ``pred_step_time_s``,
  ``pred_step_breakdown``), set against the measured step and components (the profiled steps);
- **rows without a prediction** (results/gpu: H100 rows measured before the step model existed): predicted here
  the way the planner predicts a device not at hand (``python -m bench.plan device=...``): the row's model,
  strategy and shape, its GPU's datasheet rates from bench/hardware.py (the dense peak in the row's compute
  dtype, the HBM bandwidth; no efficiency factor, no parts). Their errors say how far datasheet rates alone are
  from a measured GPU, which is what a user of the planner gets before renting one.

Errors are signed, (predicted - measured) / measured. The top-3 check compares the three fastest predicted with
the three fastest measured among the rows of the most common shape (model, micro-batch, sequence, ranks), so
runs of different models are never ranked against each other; two runs whose p10-p90 step ranges overlap are
not ordered by the measurement, and an order that differs only among such runs is reported as agreeing up
to those ties, with both lists and the number of reversed pairs (``order_verdict``).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections import Counter
from pathlib import Path

from bench.gate.paired import median
from bench.hardware import lookup_device
from bench.plan.steptime import Rates, predict_step
from bench.tune.efficiency import Point, loo_efficiencies
from models.config import GPTConfig, get_config
from strategies.config import StrategyConfig

ROOT = Path(__file__).resolve().parents[2]
SETS = {  # docs/planner.md's budget lines: label -> (folder(s) of committed rows, how they are predicted)
    "results/tune-cpu (mini, 2 gloo ranks, CPU fp32; the runs' own probes)": ("results/tune-cpu", "row"),
    "results/tune-cpu-all (the same with every strategy: + tp, sp, pp; tp from unsplit parts)":
        ("results/tune-cpu-all", "row"),
    "results/tune-cpu-tp (the 16 tensor-parallel ones again, parts timed as tp splits them)":
        ("results/tune-cpu-tp", "row"),
    "results/tune-cpu-tp-r2 (the same again, each collective rung over its own group)":
        ("results/tune-cpu-tp-r2", "row"),
    "results/tune-cpu-tp-ab (the same, repeats=2 pooled; parts probed beside other work)":
        ("results/tune-cpu-tp-ab", "row"),
    "results/tune-cpu-tp-ab2 (the same, repeats=2 pooled; probes tried 3 times)":
        ("results/tune-cpu-tp-ab2", "row"),
    "every strategy, today's model (tune-cpu-all's dp and pp rows + tune-cpu-tp-ab2; two hosts)":
        ("results/tune-cpu-all+results/tune-cpu-tp-ab2", "row"),
    "results/gpu (H100, 1 GPU; datasheet rates only)": ("results/gpu", "datasheet"),
    "results/gpu calibrated (each row from efficiencies fitted without it: bench/tune/efficiency.py)":
        ("results/gpu", "calibrated"),
}


def _err(pred, meas) -> float | None:
    if pred is None or meas is None or not meas or meas != meas:
        return None
    return (pred - meas) / meas


def errors(row: dict) -> dict:
    """Signed relative errors (predicted - measured) / measured of one row: step and components (None where the
    row has no measured component). Measured compute is the profiled steps' matmul time, memory-bound the rest
    of their compute time, exposed communication the time only communication ran -- which on a pipeline rank
    includes the bubble, spent waiting in a receive, so the prediction compared with it is exposed + bubble."""
    b = row.get("pred_step_breakdown") or {}
    matmul, compute = row.get("matmul_time_s"), row.get("compute_time_s")
    if isinstance(matmul, float) and math.isnan(matmul):
        matmul = None
    exposed = b.get("exposed_comm_s")
    if exposed is not None:
        exposed += b.get("bubble_s") or 0.0  # a pipeline rank waits out its bubble in a receive: measured as comm
    return {"step": _err(row.get("pred_step_time_s"), row.get("step_time_median_s")),
            "compute": _err(b.get("compute_s"), matmul),
            "memory": _err(b.get("memory_s"), None if matmul is None or compute is None else compute - matmul),
            "exposed_comm": _err(exposed, row.get("exposed_comm_s"))}


def datasheet_prediction(row: dict, link_bw: float | None = None) -> dict:
    """The planner's prediction for a committed GPU row from its device's datasheet rates (module docstring):
    ``pred_step_time_s``, ``pred_tokens_per_sec``, ``pred_step_breakdown`` and ``pred_rates_source``.
    ``link_bw`` (bus bytes/s) is needed beyond one rank."""
    conf = row["config"]
    known = {f.name for f in dataclasses.fields(GPTConfig)} - {"name"}
    model = {k: v for k, v in conf["model"].items() if k in known}
    model.setdefault("loss_chunk", 0)  # rows from before the chunked loss existed ran the plain head
    cfg = get_config(conf["model"]["name"], **model)
    s = StrategyConfig(**{k: v for k, v in conf["strategy"].items()
                          if k in {f.name for f in dataclasses.fields(StrategyConfig)}})
    found = lookup_device(row["device_name"])
    if found is None:
        raise ValueError(f"device {row['device_name']!r} is not in bench/hardware.py's table")
    label, peaks, hbm = found
    dtype = s.compute_dtype_name("cuda")
    t = predict_step(cfg, s, row["world_size"], row["micro_batch"], row["seq_len"], row["grad_accum"],
                     Rates(peaks[dtype], hbm, link_bw))
    return {"pred_step_time_s": t["step_s"], "pred_tokens_per_sec": t["tokens_per_sec"],
            "pred_step_breakdown": {k: v for k, v in t.items() if k.endswith("_s") and k != "step_s"},
            "pred_rates_source": f"datasheet:{label} {dtype}"}


def faster(a: dict, b: dict) -> bool:
    """Whether the measurement orders run ``a`` before run ``b``: a's throughput at its slowest usual step beats
    b's at its fastest (global tokens per step / ``step_time_p90_s`` of a > the same / ``step_time_p10_s`` of b;
    runs of one shape can differ in tokens per step -- 2 data-parallel ranks take twice a tp2 pair's). Runs
    whose p10-p90 ranges overlap are tied: their medians' order is within their own step-to-step spread, which
    a re-run can reverse."""
    return a["global_batch_tokens"] / a["step_time_p90_s"] > b["global_batch_tokens"] / b["step_time_p10_s"]


def order_verdict(rows: list[dict], k: int = 3) -> str:
    """Whether the ``k`` fastest predicted runs (tokens/s) are the ``k`` fastest measured, in order: 'agrees'
    (same names, same order); 'agrees up to ties (...)' when the predicted list contradicts no order
    the measurement establishes (``faster``): no run it leaves out was measured faster than one it names, and
    no run it names was measured faster than one it ranks above it; else 'differs (...)'. Both name the
    predicted and the measured lists; the ties say how many pairs the medians order against the prediction."""
    pred = sorted(rows, key=lambda r: -r["pred_tokens_per_sec"])[:k]
    meas = sorted(rows, key=lambda r: -r["tokens_per_sec"])[:k]
    names, measured = [r["strategy"] for r in pred], [r["strategy"] for r in meas]
    if names == measured:
        return "agrees"
    lists = f"predicted {', '.join(names)}; measured {', '.join(measured)}"
    rest = [r for r in rows if all(r is not q for q in pred)]
    if any(faster(o, q) for o in rest for q in pred) or \
            any(faster(pred[j], pred[i]) for i in range(len(pred)) for j in range(i + 1, len(pred))):
        return f"differs ({lists})"
    rank = {id(r): i for i, r in enumerate(pred)}
    ties = sum(1 for a in pred for b in rows if b is not a and b["tokens_per_sec"] > a["tokens_per_sec"]
               and rank.get(id(b), k) > rank[id(a)])
    return f"agrees up to ties ({lists}; {ties} reversed pair{'s' * (ties != 1)}, each within the other's p10-p90 " \
           f"step range)"


def _top3(rows: list[dict]) -> str:
    shape = Counter((r["model"], r["micro_batch"], r["seq_len"], r["world_size"]) for r in rows).most_common(1)[0][0]
    return order_verdict([r for r in rows if (r["model"], r["micro_batch"], r["seq_len"], r["world_size"]) == shape])


def budget_row(name: str, rows: list[dict]) -> dict:
    """One line of docs/planner.md's error budget: the median and largest |step error| over ``rows``, the median
    signed error of each component ('–' where no row measured it), and the top-3 check."""
    errs = [errors(r) for r in rows]

    def pct(v):
        return "–" if math.isnan(v) else f"{v:+.1%}"

    steps = [abs(e["step"]) for e in errs]
    return {"rows": name, "runs": len(rows), "median abs step error": f"{median(steps):.1%}",
            "max abs step error": f"{max(steps):.1%}",
            **{f"median {k} error": pct(median(e[k] for e in errs)) for k in ("compute", "memory", "exposed_comm")},
            "top 3 order": _top3(rows)}


def combine_repeats(rows: list[dict], folder: Path | None = None) -> list[dict]:
    """One row per (tag, strategy): the repeats of one sweep (``python -m bench.tune repeats=N``) pooled, in the
    order of their first run. The step statistics and throughput are those of every repeat's timed steps
    together (their per-step logs under ``folder``, bench/measure/metrics.py's definitions), so a repeat that
    ran beside a busy neighbour widens the p10-p90 range instead of deciding the order alone; without the logs,
    the median of the repeats' medians and the widest p10-p90. The prediction, its breakdown and the measured
    components are the repeats' medians; ``repeats`` counts them, ``steal_pct`` is the largest. A row that is
    its sweep's only run of a strategy is returned as it is."""
    from bench.measure.metrics import step_time_stats, throughput

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("tag"), r["strategy"]), []).append(r)
    out = []
    for group in groups.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        steps = _pooled_steps(group, folder)
        first = group[0]
        row = {**first, "repeats": len(group), "run_ids": [r["run_id"] for r in group]}
        if steps:
            row.update(step_time_stats(steps), **throughput(steps, first["global_batch_tokens"],
                                                            first["world_size"]))
        else:
            row.update(step_time_median_s=median(r["step_time_median_s"] for r in group),
                       step_time_p10_s=min(r["step_time_p10_s"] for r in group),
                       step_time_p90_s=max(r["step_time_p90_s"] for r in group),
                       tokens_per_sec=median(r["tokens_per_sec"] for r in group))
        for key in ("pred_step_time_s", "pred_tokens_per_sec", "matmul_time_s", "compute_time_s", "exposed_comm_s",
                    "comm_time_s"):
            row[key] = median(r.get(key) for r in group)
        row["pred_step_breakdown"] = {k: median((r.get("pred_step_breakdown") or {}).get(k) for r in group)
                                      for k in first.get("pred_step_breakdown") or {}}
        row["steal_pct"] = max((r.get("steal_pct") for r in group if r.get("steal_pct") is not None), default=None)
        out.append(row)
    return out


def _pooled_steps(group: list[dict], folder: Path | None) -> list[float]:
    """Every timed step time of the group's runs (their per-step logs), or [] if any log is missing."""
    from reports.load import ResultsError, load_steps

    if folder is None:
        return []
    steps: list[float] = []
    for r in group:
        try:
            log = load_steps(folder, r["run_id"])
        except ResultsError:
            return []
        steps += [float(v) for v in log[log.phase == "timed"].step_time_s]
    return steps


def load_set(folder: str, how: str) -> list[dict]:
    """The ok rows of a committed folder (a sweep's repeats of one strategy pooled: ``combine_repeats``), each
    with its prediction (its own, or the datasheet one). Several
    folders joined by '+': a later folder's rows supersede the earlier ones' rows of the same strategies (a
    family run again after the step model changed)."""
    from reports.load import load

    rows: list[dict] = []
    for one in folder.split("+"):
        later = combine_repeats(load(ROOT / one).query("status == 'ok'").to_dict("records"), ROOT / one)
        again = {r["strategy"] for r in later}
        rows = [r for r in rows if r["strategy"] not in again] + later
    if how == "datasheet":
        rows = [{**r, **datasheet_prediction(r)} for r in rows]
    if how == "calibrated":
        rows = [{**r, **loo_prediction(r, rows)} for r in rows]
    return rows


def loo_prediction(row: dict, rows: list[dict]) -> dict:
    """``datasheet_prediction`` of ``row`` with its compute and memory-bound seconds divided by the efficiencies
    fitted on the other ``rows`` of its device (bench/tune/efficiency.py ``loo_efficiencies``: leave-one-out)."""

    if row["world_size"] != 1:  # calibrated on single-GPU rows only (links are the user's link_gbps=)
        return datasheet_prediction(row)
    mine = [r for r in rows if r["device_name"] == row["device_name"] and r["world_size"] == 1]
    eff = dict(zip((id(r) for r in mine), loo_efficiencies(points_of(mine))))[id(row)]
    pred = datasheet_prediction(row)
    b = dict(pred["pred_step_breakdown"], compute_s=pred["pred_step_breakdown"]["compute_s"] / eff[0],
             memory_s=pred["pred_step_breakdown"]["memory_s"] / eff[1])
    step = pred["pred_step_time_s"] + b["compute_s"] + b["memory_s"] - sum(
        pred["pred_step_breakdown"][k] for k in ("compute_s", "memory_s"))
    return {"pred_step_time_s": step, "pred_tokens_per_sec": row["global_batch_tokens"] / step,
            "pred_step_breakdown": b, "pred_rates_source": pred["pred_rates_source"] + " x leave-one-out efficiencies"}


def mode(row: dict) -> str:
    """'compiled' or 'eager': whether the row's strategy ran torch.compile."""
    return "compiled" if row["config"]["strategy"].get("compile") else "eager"


def points_of(rows: list[dict]) -> list[Point]:
    """Each row as a point of the GPU calibration (bench/tune/efficiency.py): its device's label, compile mode,
    datasheet prediction's compute and memory-bound seconds and measured median step."""
    out = []
    for r in rows:
        b = datasheet_prediction(r)["pred_step_breakdown"]
        out.append(Point(lookup_device(r["device_name"])[0], mode(r), b["compute_s"], b["memory_s"],
                         r["step_time_median_s"], f"{r['model']} {r['strategy']} mb{r['micro_batch']}"))
    return out


def budget_table(sets: dict[str, list[dict]] | None = None) -> str:
    """docs/planner.md's error-budget table (markdown) from ``sets`` (label -> rows; default: ``SETS`` loaded)."""
    import pandas as pd

    sets = sets if sets is not None else {label: load_set(*where) for label, where in SETS.items()}
    return pd.DataFrame([budget_row(name, rows) for name, rows in sets.items()]).to_markdown(index=False)


def main() -> int:
    print(budget_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
