"""Measure the same-run A/B gate's false-alarm and detection rates on this machine, the hard way.

    python -m bench.gate.study gates=2 out=results/noise/$(date +%F)   # 8 gates, ~35 min; nothing else may run

Runs whole gates (``python -m bench.gate ab=true rev=HEAD``: every CI entry, the two jobs taking turns step
by step, default rounds) again and
again: unchanged code against itself (A/A) and the same code with the candidate slowed by exactly
``slow_pct`` (default 10) of each entry's step time (``debug_slow_pct``, a busy-wait), each both on
a quiet machine and while another process keeps one core busy (``--load``: a spinning child). Order:
for each repetition, quiet A/A, quiet slowed, loaded A/A, loaded slowed. Every gate's ``ab.json`` is
kept as ``<out>/<condition>-<i>.json``; ``study.md`` counts, per entry and per whole gate:
- false alarms: A/A entries (gates) that FAIL;
- detection: slowed entries (gates) whose step_time check FAILs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.gate.ab import ROOT
from models.cli import opt, parse
from reports.build import markdown_table


def spin_forever() -> subprocess.Popen:
    """A neighbour that keeps one core busy."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def run_gate(out: Path, name: str, slow_pct: float, rounds: int | None) -> dict:
    tmp = out / f".{name}"
    cmd = [sys.executable, "-m", "bench.gate", "ab=true", "rev=HEAD", f"out={tmp}"]
    if rounds:
        cmd += [f"rounds={rounds}"]
    if slow_pct:
        cmd += [f"slow_pct={slow_pct}"]
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL).returncode
    summary = json.loads((tmp / "ab.json").read_text())
    summary.update(rc=rc, condition=name, wall_s=time.perf_counter() - t0)
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1))
    subprocess.run(["rm", "-rf", str(tmp)])
    return summary


def summarise(out: Path) -> str:
    """study.md from the gates' JSON files in ``out``."""
    rows = {"aa": {"quiet": [], "loaded": []}, "slow": {"quiet": [], "loaded": []}}
    for f in sorted(out.glob("*.json")):
        g = json.loads(f.read_text())
        kind = "slow" if g["slow_pct"] else "aa"
        rows[kind]["loaded" if "loaded" in g["condition"] else "quiet"].append(g)
    lines, cells = ["# Same-run A/B gate: false alarms and detection on this machine", ""], []
    for kind, label in (("aa", "unchanged (A/A)"), ("slow", "slowed by exactly +{p}%")):
        for load in ("quiet", "loaded"):
            gates = rows[kind][load]
            if not gates:
                continue
            ents = [v for g in gates for v in g["verdicts"]]
            judged = [v for v in ents if any(c["metric"] == "step_time" for c in v["checks"])]
            if kind == "slow":  # detection: the speed check itself fails
                fails = [v for v in judged if any(c["metric"] == "step_time" and c["verdict"] == "FAIL"
                                                  for c in v["checks"])]
            else:
                fails = [v for v in ents if v["verdict"] == "FAIL"]
            gate_fails = sum(any(v["verdict"] == "FAIL" for v in g["verdicts"]) for g in gates)
            ratios = [c["ratio"] for v in judged for c in v["checks"] if c["metric"] == "step_time"]
            minutes = sum(g["wall_s"] for g in gates) / len(gates) / 60
            cells.append([f"{label.format(p=gates[0]['slow_pct'])} x{len(gates)}", load, len(judged),
                          f"{len(fails)}/{len(ents)}", f"{gate_fails}/{len(gates)}",
                          f"{min(ratios):.3f}-{max(ratios):.3f}", f"{minutes:.1f}"])
    lines.append(markdown_table(["gates", "machine", "entries judged", "entry FAILs", "whole-gate FAILs",
                                 "median ratios", "min/gate"], cells))
    lines += ["", "Per entry (median paired step-time ratio, candidate / baseline, per gate):", ""]
    for f in sorted(out.glob("*.json")):
        g = json.loads(f.read_text())
        cells = []
        for v in g["verdicts"]:
            st = next((c for c in v["checks"] if c["metric"] == "step_time"), None)
            cells.append(f"{v['entry']} {st['ratio']:.3f} (n={st['pairs']}) {v['verdict']}" if st
                         else f"{v['entry']} {v['verdict']}")
        lines.append(f"- {g['condition']}: " + "; ".join(cells))
    return "\n".join(lines) + "\n"


@dataclass
class StudyArgs:
    out: str = opt(help="folder for the gates' JSON files and study.md")
    gates: int = opt(2, "repetitions of the four conditions")
    rounds: int = opt(0, "rounds per gate (0: the gate's own default)")
    slow_pct: float = opt(10.0, "the exact slowdown the detection gates inject, percent")
    summarise: bool = opt(False, "only rewrite study.md from the JSON files")


def main(argv=None) -> int:
    args = parse(StudyArgs, argv, "python -m bench.gate.study", __doc__)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.summarise:
        for i in range(args.gates):
            for load in (False, True):
                for slow in (0.0, args.slow_pct):
                    name = f"{'loaded' if load else 'quiet'}-{'slow' if slow else 'aa'}-{i}"
                    spinner = spin_forever() if load else None
                    try:
                        g = run_gate(out, name, slow, args.rounds or None)
                    finally:
                        if spinner:
                            spinner.kill()
                            spinner.wait()
                    print(f"[study] {name}: rc={g['rc']} " + ", ".join(f"{v['entry']} {v['verdict']}"
                                                                        for v in g["verdicts"]), flush=True)
    text = summarise(out)
    (out / "study.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
