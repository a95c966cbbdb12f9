"""Measure the same-run A/B gate's false-alarm and detection rates on this machine, the hard way.

    python -m bench.gate.study gates=2 slow_pct=5 out=results/noise/$(date +%F)  # 8 gates, ~30 min; nothing else
    python -m bench.gate.study gates=3 kinds=aa out=...       # unchanged code only, quiet and loaded: 6 gates
    python -m bench.gate.study summarise=true out=...         # study.md again from the gates' JSON files

Runs whole gates (``python -m bench.gate ab=true rev=HEAD``: every CI entry, the two jobs taking turns step
by step, default rounds) again and
again: unchanged code against itself (A/A) and the same code with the candidate slowed by exactly
``slow_pct`` (default 10) of each entry's step time (``debug_slow_pct``, a busy-wait), each both on
a quiet machine and while another process keeps one core busy (``--load``: a spinning child). Order:
for each repetition, quiet A/A, quiet slowed, loaded A/A, loaded slowed. Every gate's ``ab.json`` is
kept as ``<out>/<condition>-<i>.json``; ``study.md`` counts, per entry and per whole gate:
- false alarms: A/A entries (gates) that FAIL;
- detection: slowed entries (gates) whose step_time check FAILs;
- the centre of unchanged code: the mean log ratio of the A/A rounds with its standard error, overall and by
  which version moved first in the round (a lean under load would show here);
- the counts under the shipped rule (``observed``): every gate of the study and of the pooled folders judged again
  by it on the rounds it measured (``replay``), an earlier rule's gate only where its rounds decide;
- the rates the spread implies (``implied_rates``): the gate's whole sequential rule run 20,000 times on rounds
  resampled from the rounds this study observed in that condition (A/A rounds for false alarms, slowed rounds
  for detection) -- a rate far below 1/entries counted, which counts alone cannot show.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.gate.ab import ROOT, load_thresholds, observe, round_sd, speed_call, speed_verdict
from bench.gate.paired import median, median_se
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


def round_steps(gate: dict) -> int:
    """The paired steps per round a recorded gate measured (its thresholds' ``round_steps``; 60 before the rule
    named it). Rounds of different lengths are different measurements: a round's spread is its median's
    sampling error, so the rates of a rule are judged only on rounds of its own length."""
    return gate.get("thresholds", {}).get("round_steps", 60)


def entry_rounds(verdict: dict) -> list[tuple[str, float, float]]:
    """(first mover "AB"/"BA", the round's median paired ratio, that median's standard error from its own steps,
    bench/gate/paired.py ``median_se``) of every round one entry of a recorded gate measured."""
    return [(p["order"], median(p["step_ratios"]), median_se(p["step_ratios"]))
            for p in verdict.get("pairs", []) if p.get("step_ratios")]


def round_ratios(gates: list[dict]) -> list[tuple[str, float, float]]:
    """``entry_rounds`` of every entry in ``gates``."""
    return [r for g in gates for v in g["verdicts"] for r in entry_rounds(v)]


def implied_rates(rounds: list[tuple[float, float]], th: dict, n: int = 20000, seed: int = 0) -> tuple[float, float]:
    """(share of entries FAILed, mean rounds per entry) of the gate's sequential rule (bench/gate/ab.py
    ``speed_call`` / ``speed_verdict``, at most max_pairs rounds) when each round is drawn at random from
    ``rounds``, the (ratio, median's standard error) pairs observed: a round keeps its own spread."""
    rounds = [(r, round_sd(se, th)) for r, se in rounds]
    rng = random.Random(seed)
    fails = total = 0
    for _ in range(n):
        rs = [rng.choice(rounds)]
        while speed_call(rs, th) == "not sure" and len(rs) < th["max_pairs"]:
            rs.append(rng.choice(rounds))
        fails += speed_verdict(rs, th)[0] == "FAIL"
        total += len(rs)
    return fails / n, total / n


def replay(gate: dict, th: dict) -> list[tuple[str, str | None, str | None]]:
    """Each entry of a recorded ``gate`` judged by the rule ``th`` (bench/gate/ab.py ``speed_call``,
    ``speed_verdict``) on the rounds it measured, in their order: (entry, speed verdict, verdict). The speed
    verdict is the first sure call (a fail from ``min_fail_rounds`` rounds on) or, at ``max_pairs`` rounds, the
    midpoint's; None when the gate stopped -- its own rule of the day was sure -- before ``th`` is. The verdict
    also fails an entry that failed another check (status, counters, memory), whatever its speed. A gate that ran
    the shipped rule replays to its own verdicts (tests/test_ab.py); an older gate's rounds are the same kind of
    measurement, so where they decide they count."""
    out = []
    for v in gate["verdicts"]:
        other = any(c["verdict"] == "FAIL" for c in v["checks"] if c["metric"] != "step_time")
        rs = [observe(p["step_ratios"], th) for p in v.get("pairs", []) if p.get("step_ratios")]
        speed = None
        for n in range(1, len(rs) + 1):
            if speed_call(rs[:n], th) != "not sure" or n == th["max_pairs"]:
                speed = speed_verdict(rs[:n], th)[0]
                break
        out.append((v["entry"], speed, "FAIL" if other else speed))
    return out


def observed(folders: list[Path], th: dict) -> list[list]:
    """study.md's counts under the shipped rule: per round length (the rule's own ``round_steps`` first; shorter
    rounds are another gate's measurement, shown apart) and condition (unchanged or slowed by p %, quiet or
    loaded), over every gate of ``folders`` replayed (``replay``): gates whose every entry the rounds decide,
    entries decided, entry FAILs (for slowed gates: speed FAILs, i.e. detections), whole-gate FAILs among the
    decided gates."""
    rows: dict[tuple, list] = {}
    for folder in folders:
        for f in sorted(Path(folder).glob("*-*-*.json")):
            g = json.loads(f.read_text())
            if "verdicts" not in g:
                continue
            steps = round_steps(g)
            key = (steps != th["round_steps"], steps, g["slow_pct"] or 0,
                   "loaded" if "loaded" in g["condition"] else "quiet")
            rows.setdefault(key, []).append(replay(g, th))
    cells = []
    for (_, steps, slow, load), gates in sorted(rows.items()):
        col = 1 if slow else 2  # detection: the speed check; a false alarm: any check
        decided = [e for g in gates for e in g if e[col] is not None]
        whole = [g for g in gates if all(e[col] is not None for e in g)]
        label = f"slowed by exactly +{slow:g}%" if slow else "unchanged (A/A)"
        cells.append([steps, label, load, f"{len(whole)}/{len(gates)}", f"{len(decided)}/{sum(map(len, gates))}",
                      f"{sum(e[col] == 'FAIL' for e in decided)}/{len(decided)}",
                      f"{sum(any(e[col] == 'FAIL' for e in g) for g in whole)}/{len(whole)}"])
    return cells


def centre(rounds: list[float]) -> str:
    """Mean log ratio of ``rounds`` as a ratio, +- its standard error (in percent)."""
    logs = [math.log(r) for r in rounds]
    if len(logs) < 2:
        return f"{math.exp(logs[0]):.3f} (n=1)" if logs else "-"
    se = statistics.stdev(logs) / math.sqrt(len(logs))
    return f"{math.exp(statistics.mean(logs)):.4f} +- {se * 100:.2f}% (n={len(logs)})"


def residuals(folders: list[Path], steps: int | None = None) -> dict[str, list[tuple[float, float]]]:
    """Per machine condition (quiet, loaded), every round's log ratio as unchanged code would read it, with its
    median's standard error, from the gates in ``folders`` whose rounds are ``steps`` long (any length when None):
    the round-to-round spread the rule's rates rest on.

    An unchanged (A/A) round counts as measured, lean and all. A slowed round counts by its distance from the
    centre of its own kind -- the same entry, condition, length and injected slowdown, over every gate --, scaled
    by sqrt(n / (n - 1)) for the n rounds that centre is taken from, and placed on the condition's A/A centre
    (mean log ratio; 0 when none). The injected busy-wait is exactly p % of a quiet step only: beside a busy core
    a +5 % injection reads +4.7-4.9 % on the one-rank entries and +7.2-7.4 % on the two-rank ones (study of
    2026-12-04), so taking out the nominal p % would count that difference, which is the entry's, as noise. A
    kind with a single round has no centre and is left out."""
    kinds: dict[tuple, list[tuple[float, float]]] = {}
    for folder in folders:
        for f in sorted(Path(folder).glob("*.json")):
            g = json.loads(f.read_text())
            if "verdicts" not in g or steps not in (None, round_steps(g)):
                continue
            load = "loaded" if "loaded" in g["condition"] else "quiet"
            for v in g["verdicts"]:
                kinds.setdefault((load, round_steps(g), g["slow_pct"] or 0, v["entry"]), []).extend(
                    (math.log(r), se) for _, r, se in entry_rounds(v))
    aa = {}
    for (load, n_steps, slow, _), rs in kinds.items():
        if not slow:
            aa.setdefault((load, n_steps), []).extend(x for x, _ in rs)
    out: dict[str, list[tuple[float, float]]] = {"quiet": [], "loaded": []}
    for (load, n_steps, slow, _), rs in sorted(kinds.items()):
        if not slow:
            out[load] += rs
        elif len(rs) > 1:
            mid, base = statistics.mean(x for x, _ in rs), statistics.mean(aa.get((load, n_steps), [0.0]))
            out[load] += [((x - mid) * math.sqrt(len(rs) / (len(rs) - 1)) + base, se) for x, se in rs]
    return out


def summarise(out: Path, pool: list[Path] = ()) -> str:
    """study.md from the gates' JSON files in ``out``; ``pool``: more study folders whose rounds join the
    resampled rates (``residuals``)."""
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
    th = load_thresholds(None)
    lines += ["", "Rounds and the rates they imply for the shipped rule (bench/gate/thresholds_ab.yaml: detect "
              f"{th['detect_pct']:g} %, {th['round_steps']} steps a round, a round's sd {th['round_sd_scale']:g} x its "
              f"own standard error, at least {th['min_round_sd_pct']:g} %, design false alarm {th['false_alarm']:g}, "
              f"miss {th['miss']:g}, at most {th['max_pairs']} rounds), each entry's rounds resampled 20,000 times "
              "from those observed:", ""]
    cells = []
    for kind in ("aa", "slow"):
        for load in ("quiet", "loaded"):
            gates = rows[kind][load]
            rr = round_ratios(gates)
            if not rr:
                continue
            ratios = [r for _, r, _ in rr]
            rate, mean_rounds = implied_rates([(r, se) for _, r, se in rr], th)
            first = {o: [r for oo, r, _ in rr if oo == o] for o in ("AB", "BA")}
            label = "unchanged" if kind == "aa" else f"+{gates[0]['slow_pct']:g}%"
            cells.append([label, load, centre(ratios), centre(first["AB"]), centre(first["BA"]),
                          f"{statistics.stdev(math.log(r) for r in ratios) * 100:.2f}%" if len(ratios) > 1 else "-",
                          f"{rate:.4f} ({'false alarms' if kind == 'aa' else 'detected'})", f"{mean_rounds:.2f}"])
    lines.append(markdown_table(["code", "machine", "rounds' centre", "baseline first", "candidate first",
                                 "sd of log ratio", "implied rate", "rounds/entry"], cells))
    folders = [out, *pool]
    cells = []
    lengths = {round_steps(json.loads(f.read_text())) for fo in folders for f in Path(fo).glob("*-*-*.json")}
    for steps in sorted(lengths):
        for load, res in residuals(folders, steps).items():
            if len(res) > 1:
                xs, z = [x for x, _ in res], [x / se for x, se in res if se > 0]
                cells.append([steps, load, len(res), f"{statistics.mean(xs) * 100:+.2f}%",
                              f"{statistics.stdev(xs) * 100:.2f}%",
                              f"{median(se for _, se in res) * 100:.2f}%",
                              *((f"{statistics.stdev(z):.2f}", f"{min(z):+.1f} / {max(z):+.1f}") if len(z) > 1
                                else ("-", "-"))])
    lines += ["", "The spread of a round by its length (paired steps per round; every round of "
              + ", ".join(str(Path(f).name) for f in folders) + "; a slowed round by its distance from its kind's "
              "centre, `residuals`), and of the "
              "rounds standardised by their own standard error (ln ratio / `median_se` of its steps: the spread "
              "`round_sd_scale` covers):", ""]
    lines.append(markdown_table(["steps/round", "machine", "rounds", "centre", "sd of log ratio",
                                 "median own se", "sd standardised", "min / max standardised"], cells))
    cells = []
    for steps in sorted(lengths, key=lambda n: (n != th["round_steps"], n)):  # the rule's own length first
        for load, res in residuals(folders, steps).items():
            if len(res) < 2:
                continue
            fa, n_aa = implied_rates([(math.exp(r), se) for r, se in res], th)
            det, n_slow = implied_rates([(math.exp(r + math.log1p(th["detect_pct"] / 100)), se) for r, se in res],
                                        th, seed=1)
            xs = [r for r, _ in res]
            cells.append([steps, load, len(res), f"{statistics.mean(xs) * 100:+.2f}%",
                          f"{statistics.stdev(xs) * 100:.2f}%", f"{fa:.4f}", f"{n_aa:.2f}", f"{det:.4f}",
                          f"{n_slow:.2f}"])
    if cells:
        names = ", ".join(str(Path(f).name) for f in folders)
        lines += ["", f"Pooled over {names}: every round of every gate, by its length (an unchanged round as "
                  "measured; a slowed one by its distance from its entry's centre, placed on the unchanged rounds' "
                  "centre: `residuals`) with its own standard error kept, resampled 20,000 "
                  f"times as unchanged code and as code exactly {th['detect_pct']:g} % slower, through the shipped "
                  f"rule (its own rounds are {th['round_steps']} steps; shorter rounds show what the length buys):",
                  ""]
        lines.append(markdown_table(["steps/round", "machine", "rounds", "centre (mean log ratio)", "sd",
                                     "false alarms", "rounds/entry", "detected", "rounds/entry (slowed)"], cells))
    lines += ["", "Observed under the shipped rule: every gate of "
              + ", ".join(str(Path(f).name) for f in folders) + " judged again by it on the rounds it measured "
              f"(`replay`; a gate of an earlier rule counts only where its rounds decide every entry). The shipped "
              f"gate's are the {th['round_steps']}-step rows; shorter rounds, another gate's, are shown apart:", ""]
    lines.append(markdown_table(["steps/round", "gates", "machine", "whole gates decided", "entries decided",
                                 "entry FAILs (slowed: caught)", "whole-gate FAILs"], observed(folders, th)))
    ran = {json.dumps({k: g["thresholds"].get(k) for k in th}, sort_keys=True)
           for f in sorted(out.glob("*.json")) for g in [json.loads(f.read_text())] if "thresholds" in g}
    if any(json.loads(r) != th for r in ran):
        lines += ["", "The gates' own verdicts above (counts, and the per-entry lines below) are the rule of their "
                  "day, as each gate's JSON records it (`thresholds`); the implied rates are the shipped rule's."]
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
    gates: int = opt(2, "repetitions of the conditions")
    kinds: str = opt("aa,slow", "which gates each repetition runs: aa (unchanged), slow (slowed), or both")
    loads: str = opt("quiet,loaded", "on a quiet machine, beside a spinning neighbour (loaded), or both")
    rounds: int = opt(0, "rounds per gate (0: the gate's own default)")
    slow_pct: float = opt(10.0, "the exact slowdown the detection gates inject, percent")
    summarise: bool = opt(False, "only rewrite study.md from the JSON files")
    pool: list[str] = opt([], "more study folders whose rounds join the pooled resampled rates")


def main(argv=None) -> int:
    args = parse(StudyArgs, argv, "python -m bench.gate.study", __doc__)
    kinds, loads = args.kinds.split(","), args.loads.split(",")
    for name, got, valid in (("kinds", kinds, ("aa", "slow")), ("loads", loads, ("quiet", "loaded"))):
        if not got or set(got) - set(valid):
            print(f"python -m bench.gate.study: error: {name}={','.join(got)}; valid: {', '.join(valid)} "
                  "(comma-separated)", file=sys.stderr)
            return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.summarise:
        first = 1 + max((int(f.stem.rsplit("-", 1)[1]) for f in out.glob("*-*-*.json")), default=-1)
        for i in range(first, first + args.gates):  # a later part of a study adds gates, it never overwrites
            for load in (lo == "loaded" for lo in ("quiet", "loaded") if lo in loads):
                for slow in (0.0 if k == "aa" else args.slow_pct for k in ("aa", "slow") if k in kinds):
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
    text = summarise(out, [Path(f) for f in args.pool])
    (out / "study.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
