"""Same-run A/B regression gate: the baseline *code* and the candidate *code*, measured on this
machine, in this job, judged on paired ratios.

    python -m bench.gate ab=true                          # baseline = the revision in results/baselines/BASE_REV
    python -m bench.gate ab=true rev=6910f6a out=ab_out   # any revision
    python -m bench.gate ab=true rev=HEAD slow_pct=10     # study: the candidate is HEAD slowed by exactly 10%

Why: numbers recorded on another machine (another CPU model, another neighbour) do not compare with
this one's, and on a shared machine even two runs a few seconds apart differ by +-10%. So the baseline
revision is exported (``git archive``) into ``<out>/trees/base`` and both trees run the CI matrix
(bench/gate/ci_suite.py) with the same interpreter. For each entry both versions' jobs start together and take
turns step by step (bench/harness/turn.py), ``round_steps`` timed steps each; a pair's ratios are ``candidate step k /
baseline step k`` for every timed step k (the A/B engine, bench/gate/paired.py). One round per entry, the first
mover alternating from entry to entry, then more rounds (the first mover swapped each time) only for an entry
whose verdict is not sure yet. A baseline revision from before the turnstile existed cannot take turns and is
refused.

Verdict per entry (bench/gate/thresholds_ab.yaml). Counters, judged first and exactly
(bench/measure/counters.py and the row: FLOPs per step, collective bytes per step, parameter and
optimizer-state bytes, compiled graphs and graph breaks, the final training loss and the held-out loss after the
last step (``eval_every`` beyond the run: one evaluation) of the same seed and data): FAIL when any
differs between the two versions in any pair, whatever the timing says, naming the counter -- unless
``accept_counters`` lists it (a change the work makes on purpose, said in the detail). A counter the baseline
does not record yet is named and not judged. ``timing=false`` judges status, counters and memory only (one round,
no speed verdict): for a host where no timing can be trusted.
- speed: Wald's sequential probability ratio test on the rounds (``speed_call``). Each round i gives one
  observation x_i, the log of its pair's median paired ratio, taken as normal with its own standard deviation
  s_i, measured from the round's own steps: s_i = round_sd_scale x the median's standard error
  (bench/gate/paired.py ``median_se``), at least min_round_sd_pct/100 (``observe``). A round beside a busy
  neighbour spreads its steps and so weighs less; the scale (1.2) covers what the steps' serial correlation
  hides (measured: rounds standardised by their own error spread 1.01 quiet, 1.11 loaded; docs/gate.md). The
  two hypotheses are "unchanged" (ratio 1) and "slower by ``detect_pct``". After n rounds, with precision
  w = sum 1/s_i^2, the precision-weighted mean m = sum (x_i/s_i^2) / w, g = exp(m) and d = ln(1 + detect_pct/100):
      fail when m >= d/2 + ln((1 - miss)/false_alarm) / (w d),
      pass when m <= d/2 + ln(miss/(1 - false_alarm)) / (w d)
  (the log likelihood ratio w d (m - d/2) against Wald's bounds; with equal s_i the familiar n/s^2 for w),
  otherwise not sure yet: one more round (the first mover swapped), up to ``max_pairs``; at the cap it is judged on
  the midpoint 1 + d/2 and says so. A fail needs at least ``min_fail_rounds`` rounds (2: one wild round under
  load, +8.6 % on unchanged code in the study, is measured again before it can fail a gate; the field's "two
  consecutive violations"). ``false_alarm`` and ``miss`` are the test's design error rates per entry;
  the rates measured on this machine are in docs/gate.md;
- memory: FAIL when the median paired ratio of ``peak_mem_bytes`` exceeds 1 + ``max_rise_pct``/100;
- status: FAIL when a candidate run fails where the baseline's ran (a ``suspect`` run finished: its MFU, which
  this gate does not judge, used a peak probed low beside other work); an entry the baseline cannot run
  (a preset it does not have yet) is SKIP: new, nothing to compare.

Exit codes: 0 every check holds; 1 a regression; 2 unusable input (unknown revision, bad thresholds).
The false-alarm and detection rates of this rule are measured by ``python -m bench.gate.study``
(results/noise/).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from bench.gate import ci_suite
from bench.gate.paired import median, median_se, paired_ratios, round_order, summarize
from bench.harness.turn import ENV_FILE, ENV_SIDE, FREE, write_turn
from bench.launch import suite
from bench.launch.suite import Entry
from reports.load import read_rows, timed_step_times
from reports.record import FINISHED  # a suspect run's times, memory and loss are real; MFU is not judged here

ROOT = suite.ROOT
BASE_REV_FILE = ROOT / "results" / "baselines" / "BASE_REV"
DEFAULT_THRESHOLDS = Path(__file__).with_name("thresholds_ab.yaml")
_KNOWN = {"detect_pct", "round_steps", "round_sd_scale", "min_round_sd_pct", "false_alarm", "miss",
          "min_fail_rounds", "max_pairs", "max_rise_pct", "accept_counters"}
_RATES = ("false_alarm", "miss")  # probabilities strictly between 0 and 1, summing below 1
# the counters of a row the gate compares exactly (reports/record.py defines each); the loss too: same code, seed
# and data give the same bits on one machine (every A/A pair of the studies in results/noise/ agrees exactly)
COUNTERS = ("flops_counted_per_step", "comm_bytes_per_step", "param_bytes", "optimizer_state_bytes",
            "graphs_compiled", "graph_breaks", "loss", "eval_loss")
EVAL_AFTER_LAST = 10**7  # eval_every beyond any run: one held-out evaluation, after the last step


class ABInputError(ValueError):
    """Unusable A/B input (exit code 2)."""


@dataclass
class Run:
    """One benchmark run of one side: the row's numbers."""

    side: str
    status: str
    step_time_s: float | None
    peak_mem_bytes: float | None
    wall_s: float
    error: str | None = None
    counters: dict = field(default_factory=dict)  # COUNTERS as the row has them (None: not recorded)


@dataclass
class Pair:
    round: int
    order: str  # "AB" (base first) or "BA"
    base: Run
    cand: Run
    step_ratios: list[float] = field(default_factory=list)  # candidate / baseline, step k with step k

    @property
    def ok(self) -> bool:
        return self.base.status in FINISHED and self.cand.status in FINISHED

    @property
    def ratio(self) -> float:
        """This pair's median paired step ratio."""
        return median(self.step_ratios)


@dataclass
class Verdict:
    entry: str
    pairs: list[Pair] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        vs = {c["verdict"] for c in self.checks}
        return "FAIL" if "FAIL" in vs else ("PASS" if "PASS" in vs else "SKIP")


def load_thresholds(path: str | Path | None = None) -> dict:
    path = Path(path) if path else DEFAULT_THRESHOLDS
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ABInputError(f"{path}: cannot read thresholds: {exc}") from None
    if not isinstance(data, dict) or set(data) != _KNOWN:
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ABInputError(f"{path}: expected exactly the keys {sorted(_KNOWN)}; got {got}")
    for k, v in data.items():
        if k == "accept_counters":
            if not isinstance(v, list) or set(v) - set(COUNTERS):
                raise ABInputError(f"{path}: accept_counters={v!r} must be a list of counters from {list(COUNTERS)}")
        elif not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            raise ABInputError(f"{path}: {k}={v!r} must be a finite number >= 0")
        elif k in _RATES and not 0 < v < 1:
            raise ABInputError(f"{path}: {k}={v!r} must be a probability between 0 and 1")
        elif k in ("detect_pct", "round_sd_scale", "min_round_sd_pct", "max_pairs", "min_fail_rounds",
                   "round_steps") and not v > 0:
            raise ABInputError(f"{path}: {k}={v!r} must be > 0")
        elif k in ("round_steps", "max_pairs", "min_fail_rounds") and not isinstance(v, int):
            raise ABInputError(f"{path}: {k}={v!r} must be a whole number")
    if data["false_alarm"] + data["miss"] >= 1:
        raise ABInputError(f"{path}: false_alarm={data['false_alarm']!r} and miss={data['miss']!r} must sum below 1 "
                           "(the sequential test's two lines cross otherwise)")
    return data


def resolve_rev(rev: str | None) -> str:
    """The full commit SHA of ``rev`` (default: the one in results/baselines/BASE_REV)."""
    if rev is None:
        try:
            rev = BASE_REV_FILE.read_text().split()[0]
        except (OSError, IndexError):
            raise ABInputError(f"no revision given and {BASE_REV_FILE} is missing or empty") from None
    res = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=ROOT,
                         capture_output=True, text=True)
    if res.returncode or not res.stdout.strip():
        raise ABInputError(f"revision {rev!r} is not a commit of this repository (a shallow clone? "
                           f"`git fetch --unshallow`, or name another with rev=REV)")
    return res.stdout.strip()


def export_tree(sha: str, dest: Path) -> Path:
    """The files of commit ``sha`` in ``dest`` (``git archive``: no .git, no changes to the repository)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", sha], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def supports_turns(tree: Path) -> bool:
    """Revisions from the one that added the turnstile (bench/turn.py, now bench/harness/turn.py) on can take
    turns step by step."""
    return (tree / "bench" / "turn.py").is_file() or (tree / "bench" / "harness" / "turn.py").is_file()


def knows(tree: Path, option: str) -> bool:
    """Whether the revision in ``tree`` has the run option ``option`` (a field of its RunConfig)."""
    config = tree / "bench" / "harness" / "config.py"
    return config.is_file() and f"\n    {option}: " in config.read_text()


def _read_row(results: Path, run_id: str) -> dict | None:
    """The row with ``run_id`` in results/runs.jsonl, or None."""
    return next((r for r in read_rows(results) if r.get("run_id") == run_id), None)


class Runner:
    """Runs one matrix entry on one side and reads back its row; counts the run's CPU time."""

    def __init__(self, out: Path, trees: dict[str, Path], extra: dict[str, list[str]], timeout_s: float = 300,
                 steps: int | None = None):
        self.out, self.trees, self.extra, self.timeout_s = out, trees, extra, timeout_s
        self.common = [c for c in ci_suite.COMMON if not (steps and c.startswith("steps="))]
        if steps:
            self.common.append(f"steps={steps}")
        # after the timed window: the collectives observed and the FLOPs counted (one step each: counters judged
        # exactly); not the two profiled steps of the overlap measurement, columns the gate never reads
        self.common += ["measure_comm=true", "measure_overlap=false"]
        # the held-out loss after the last step, judged exactly with the counters -- when both revisions have the
        # option (a baseline from before held-out evaluation would refuse it; the loss alone is judged then)
        if all(knows(tree, "eval_every") for tree in trees.values()):
            self.common.append(f"eval_every={EVAL_AFTER_LAST}")
        self.count = 0
        # The rates a run probes (the MFU's peak, the bandwidths its predictions use) are cached in the gate's own
        # cache and shared by both sides, even when probed beside the other side's job (N00BGPT_NEIGHBOURS_MAX=1):
        # the gate judges neither MFU nor predictions, and re-probing in every run cost ~5 s per two-rank pair.
        self.env = {**os.environ, **ci_suite.ENV, "N00BGPT_PEAK_CACHE": "1", "N00BGPT_NEIGHBOURS_MAX": "1",
                    "N00BGPT_CACHE_DIR": str(out / "cache"), "PYTHONUNBUFFERED": "1"}

    def _cmd(self, side: str, entry: tuple, run_id: str) -> list[str]:
        return suite.command(entry, self.out / side / "results", self.common, f"ab:{side}",
                             [*self.extra[side], f"run_id={run_id}"], root=self.trees[side])

    def _result(self, side: str, run_id: str, wall: float, rc, tail: list[str]) -> Run:
        row = _read_row(self.out / side / "results", run_id)
        if row is None:
            return Run(side, "error", None, None, None, wall, f"rc={rc}, no row: {' '.join(tail)}")
        return Run(side, row["status"], row.get("step_time_median_s"), row.get("peak_mem_bytes"), wall,
                   row.get("error"), {c: row.get(c) for c in COUNTERS})

    def run_together(self, entry: tuple, first: str) -> tuple[Run, Run, list[float]]:
        """Both sides' jobs at once, taking turns step by step (bench/harness/turn.py), ``first`` starting each step.
        Returns both runs and the candidate/baseline ratio of every timed step."""
        self.count += 1
        turn = self.out / f"turn-{self.count:04d}"
        write_turn(turn, "F 0")
        ids = {side: f"{side}-{entry.label}-{self.count:04d}" for side in ("base", "cand")}
        procs, logs = {}, {}
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        for side in ("base", "cand"):
            env = {**self.env, "PYTHONPATH": str(self.trees[side]), ENV_FILE: str(turn),
                   ENV_SIDE: "F" if side == first else "S"}
            logs[side] = self.out / "logs" / f"{ids[side]}.log"  # a file, not a pipe: a full pipe would block
            with open(logs[side], "w") as log:
                procs[side] = subprocess.Popen(self._cmd(side, entry, ids[side]), cwd=self.trees[side], env=env,
                                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while any(p.poll() is None for p in procs.values()):
            if any(p.poll() is not None for p in procs.values()):
                write_turn(turn, FREE)  # one job ended: the other must not wait for it (again and again: a race)
            if time.perf_counter() - t0 > self.timeout_s:
                for p in procs.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)  # torchrun and its ranks
            time.sleep(0.2)
        errs = {side: logs[side].read_text(errors="replace").strip().splitlines()[-1:] for side in procs}
        wall = time.perf_counter() - t0
        runs = {side: self._result(side, ids[side], wall, procs[side].returncode, errs[side]) for side in procs}
        ratios = []
        if runs["base"].status in FINISHED and runs["cand"].status in FINISHED:
            base, cand = (timed_step_times(self.out / s / "results", ids[s]) for s in ("base", "cand"))
            ratios = paired_ratios(cand, base)
        return runs["base"], runs["cand"], ratios


def measure_pair(runner: Runner, entry: tuple, rnd: int, index: int) -> Pair:
    """One pair of turn-taking jobs; who goes first alternates over rounds and entries (``round_order``)."""
    first = round_order(("base", "cand"), rnd + index)[0]
    base, cand, ratios = runner.run_together(entry, first)
    return Pair(rnd, "AB" if first == "base" else "BA", base, cand, step_ratios=ratios)


def judge_counters(ok: list[Pair], th: dict) -> dict:
    """The counters check of an entry's finished pairs: every counter both versions record must be equal in every
    pair (an accepted one may differ and is said); one the baseline lacks is named, not judged."""
    changed, accepted, missing = [], [], []
    for c in COUNTERS:
        vals = [(p.base.counters.get(c), p.cand.counters.get(c)) for p in ok]
        if all(b is None and n is None for b, n in vals):
            continue  # neither records it (e.g. FLOPs under compile, collectives in one process)
        if any(b is None for b, _ in vals):
            missing.append(c)
            continue
        diff = next(((b, n) for b, n in vals if b != n), None)
        if diff is not None:
            b, n = diff
            said = f"{c} {b} -> {n}" + (f" ({(n - b) / b:+.2%})" if b and n is not None else "")
            (accepted if c in th["accept_counters"] else changed).append(said)
    detail = (f"changed: {'; '.join(changed)}" if changed else "equal") + (
        f"; changed on purpose (accept_counters): {'; '.join(accepted)}" if accepted else "") + (
        f"; not on the baseline yet: {', '.join(missing)}" if missing else "")
    return {"metric": "counters", "verdict": "FAIL" if changed else "PASS", "detail": detail}


def judge(entry: str, pairs: list[Pair], th: dict, timing: bool = True) -> Verdict:
    """The checks of one entry from its pairs (pure: tested on constructed pairs). ``timing=False``: no speed
    verdict (status, counters and memory)."""
    v = Verdict(entry, pairs)
    base_ok = [p for p in pairs if p.base.status in FINISHED]
    if not base_ok:
        err = next((p.base.error for p in pairs if p.base.error), "")
        v.checks.append({"metric": "status", "verdict": "SKIP",
                         "detail": f"the baseline cannot run this entry (new?): {str(err)[:120]}"})
        return v
    broken = [p for p in base_ok if p.cand.status not in FINISHED]
    detail = (f"{len(broken)}/{len(base_ok)} candidate runs failed where the baseline ran: "
              f"{broken[0].cand.status}: {str(broken[0].cand.error)[:160]}" if broken
              else f"{len(base_ok)}/{len(base_ok)} finished")
    suspect = sum(r.status == "suspect" for p in base_ok for r in (p.base, p.cand))
    if suspect:  # said, not judged: the runs' MFU used a peak probed low, their times are real
        detail += f" ({suspect} suspect: MFU > 1 from a low peak probe, compared on their step times)"
    v.checks.append({"metric": "status", "verdict": "FAIL" if broken else "PASS", "detail": detail})
    ok = [p for p in pairs if p.ok]
    if not ok:
        return v
    v.checks.append(judge_counters(ok, th))
    if not timing:
        return _judge_memory(v, ok, th)
    unpaired = [p for p in ok if not p.step_ratios]
    if unpaired:  # both sides ran, but their steps cannot be paired: no speed verdict may pass unmeasured
        v.checks.append({"metric": "step_time", "verdict": "FAIL",
                         "detail": f"{len(unpaired)}/{len(ok)} pairs ran but left no paired steps (per-step logs "
                                   "missing or empty): the speed cannot be judged"})
        return v
    pairs_r = summarize([p.ratio for p in ok])
    steps = sum(len(p.step_ratios) for p in ok)
    obs = [observe(p.step_ratios, th) for p in ok]
    g, w = pooled(obs)
    verdict, call = speed_verdict(obs, th)
    pass_line, fail_line = sprt_lines(w, th)
    sds = [s * 100 for _, s in obs]
    said = (f"not sure after {len(ok)} rounds: judged on the midpoint {_midpoint(th):.3f}" if call == "not sure"
            else f"{call}: sure after {len(ok)} round{'s' if len(ok) > 1 else ''}")
    v.checks.append({"metric": "step_time", "verdict": verdict, "call": call,
                     "baseline": median(p.base.step_time_s for p in ok),
                     "candidate": median(p.cand.step_time_s for p in ok),
                     "ratio": g, "low": pairs_r.low, "high": pairs_r.high, "pairs": len(ok), "steps": steps,
                     "round_sd_pct": sds, "pass_line": pass_line, "fail_line": fail_line,
                     "detail": f"ratio {g:.3f} (precision-weighted geometric mean of {len(ok)} rounds' medians, "
                               f"{pairs_r.low:.3f}-{pairs_r.high:.3f}, round sd {min(sds):.1f}-{max(sds):.1f} %, "
                               f"{steps} paired steps); pass below {pass_line:.3f}, fail above {fail_line:.3f} "
                               f"after {len(ok)}: {said}"})
    return _judge_memory(v, ok, th)


def _judge_memory(v: Verdict, ok: list[Pair], th: dict) -> Verdict:
    mems = [p.cand.peak_mem_bytes / p.base.peak_mem_bytes for p in ok
            if p.base.peak_mem_bytes and p.cand.peak_mem_bytes]
    if mems:
        mm = median(mems)
        mlimit = 1 + th["max_rise_pct"] / 100
        v.checks.append({"metric": "peak_mem", "verdict": "FAIL" if mm > mlimit else "PASS", "ratio": mm,
                         "detail": f"median ratio {mm:.3f}; limit {mlimit:.3f}"})
    return v


def observe(step_ratios: list[float], th: dict) -> tuple[float, float]:
    """One round as the sequential test sees it: (its median paired ratio, s), s the standard deviation of its
    log: round_sd_scale x ``median_se`` of its own step ratios, at least min_round_sd_pct/100 (module docstring)."""
    return median(step_ratios), round_sd(median_se(step_ratios), th)


def round_sd(se: float, th: dict) -> float:
    """A round's sd from its median's standard error ``se``: round_sd_scale x se, at least min_round_sd_pct/100
    (the floor alone when ``se`` is NaN)."""
    floor = th["min_round_sd_pct"] / 100
    return floor if math.isnan(se) else max(th["round_sd_scale"] * se, floor)


def pooled(obs: list[tuple[float, float]]) -> tuple[float, float]:
    """(g, w) of rounds observed as (ratio, s): the precision-weighted geometric mean of their ratios,
    g = exp(sum(ln r_i / s_i^2) / w), and their total precision w = sum(1 / s_i^2)."""
    w = sum(1 / s**2 for _, s in obs)
    return math.exp(sum(math.log(r) / s**2 for r, s in obs) / w), w


def sprt_lines(w: float, th: dict) -> tuple[float, float]:
    """The pass and fail lines, as ratios, for the precision-weighted geometric mean of rounds of total precision
    ``w`` (``pooled``; Wald's sequential probability ratio test between ratio 1 and ratio 1 + detect_pct/100,
    each round's log ratio normal with its own sd; module docstring)."""
    d = math.log1p(th["detect_pct"] / 100)
    a, b = th["false_alarm"], th["miss"]
    return math.exp(d / 2 + math.log(b / (1 - a)) / (w * d)), math.exp(d / 2 + math.log((1 - b) / a) / (w * d))


def speed_call(obs: list[tuple[float, float]], th: dict) -> str:
    """The speed verdict the rounds observed so far (``observe``: ratio and sd each) allow: "pass", "fail" or
    "not sure" (``sprt_lines``; a fail only from ``min_fail_rounds`` rounds on)."""
    g, w = pooled(obs)
    pass_line, fail_line = sprt_lines(w, th)
    if g >= fail_line:
        return "fail" if len(obs) >= th["min_fail_rounds"] else "not sure"
    return "pass" if g <= pass_line else "not sure"


def _midpoint(th: dict) -> float:
    return math.exp(math.log1p(th["detect_pct"] / 100) / 2)


def speed_verdict(obs: list[tuple[float, float]], th: dict) -> tuple[str, str]:
    """("PASS" or "FAIL", the call) of an entry whose rounds stop here: a sure call decides; one still not sure
    (at the cap, or with no more rounds allowed) is judged on the midpoint 1 + d/2 between the hypotheses."""
    call = speed_call(obs, th)
    fail = pooled(obs)[0] > _midpoint(th) if call == "not sure" else call == "fail"
    return "FAIL" if fail else "PASS", call


def needs_more(pairs: list[Pair], th: dict) -> bool:
    """True while the entry's speed is not sure yet (``speed_call``) and fewer than max_pairs were measured."""
    ok = [p for p in pairs if p.ok]
    if not ok or len(pairs) >= th["max_pairs"] or any(not p.step_ratios for p in ok):
        return False
    return speed_call([observe(p.step_ratios, th) for p in ok], th) == "not sure"


def run_ab(out: Path, base_tree: Path, rounds: int, th: dict, matrix: list[Entry] = ci_suite.MATRIX,
           cand_extra: list[str] = (), base_extra: list[str] = (), log=print,
           steps: int | None = None, timing: bool = True) -> list[Verdict]:
    """Measure every entry of ``matrix`` in ``rounds`` interleaved rounds, then more for the entries not sure yet
    (``needs_more``), and judge."""
    runner = Runner(out, {"base": base_tree, "cand": ROOT}, {"base": list(base_extra), "cand": list(cand_extra)},
                    steps=steps)
    pairs: dict[str, list[Pair]] = {e.label: [] for e in matrix}

    def add(entry, rnd, i):
        p = measure_pair(runner, entry, rnd, i)
        log(f"[ab] {entry.label} round {rnd} {p.order}: base {_ms(p.base)} cand {_ms(p.cand)} "
            f"{len(p.step_ratios)} paired steps" + (f" ratio {p.ratio:.3f} (sd {observe(p.step_ratios, th)[1]:.1%})"
                                                     if p.ok and p.step_ratios else ""))
        return p

    for rnd in range(rounds):
        for i, entry in enumerate(matrix):
            pairs[entry.label].append(add(entry, rnd, i))
    for i, entry in enumerate(matrix):
        extra = rounds
        while timing and needs_more(pairs[entry.label], th):
            log(f"[ab] {entry.label}: not sure yet (between the pass and fail lines): one more round")
            pairs[entry.label].append(add(entry, extra, i))
            extra += 1
    return [judge(e.label, pairs[e.label], th, timing) for e in matrix]


def _ms(run: Run) -> str:
    ms = f"{run.step_time_s * 1e3:.1f}ms" if run.status in FINISHED and run.step_time_s else ""
    return f"{ms} ({run.status})" if ms and run.status != "ok" else ms or run.status


def render(verdicts: list[Verdict]) -> str:
    lines = [f"{'entry':<10} {'metric':<10} {'verdict':<7} detail", "-" * 100]
    for v in verdicts:
        for c in v.checks:
            lines.append(f"{v.entry:<10} {c['metric']:<10} {c['verdict']:<7} {c['detail']}")
    return "\n".join(lines)


def main(rev: str | None, out: str, rounds: int | None, thresholds: str | None, slow_pct: float = 0.0,
         entries: list[str] | None = None, timing: bool = True) -> int:
    try:
        th = load_thresholds(thresholds)
        sha = resolve_rev(rev)
        matrix = ci_suite.MATRIX
        if entries:
            names = [e.label for e in matrix]
            bad = [x for x in entries if x not in names]
            if bad:
                raise ABInputError(f"unknown entries {bad}; valid: {', '.join(names)}")
            matrix = [e for e in matrix if e.label in entries]
        if rounds is not None and rounds < 1:
            raise ABInputError(f"rounds={rounds} must be >= 1")
        if not slow_pct >= 0:
            raise ABInputError(f"slow_pct={slow_pct} must be >= 0")
    except ABInputError as exc:
        print(f"gate ab: error: {exc}", file=sys.stderr)
        return 2
    outp = Path(out).resolve()
    shutil.rmtree(outp, ignore_errors=True)
    base_tree = export_tree(sha, outp / "trees" / "base")
    if not supports_turns(base_tree):
        shutil.rmtree(outp, ignore_errors=True)
        print(f"gate ab: error: revision {sha[:12]} predates the turnstile (bench/turn.py) and cannot take turns; "
              "name a later one with rev=REV", file=sys.stderr)
        return 2
    rounds = rounds or 1
    cand_extra = [f"debug_slow_pct={slow_pct:g}"] if slow_pct else []
    print(f"[ab] baseline {sha[:12]} (exported to {base_tree}) vs candidate {ROOT}: {rounds} round(s) x "
          f"{len(matrix)} entries, taking turns step by step, {th['round_steps']} steps, more rounds while not sure"
          f"{f', candidate slowed by {slow_pct:g}%' if slow_pct else ''}", flush=True)
    t0 = time.perf_counter()
    verdicts = run_ab(outp, base_tree, rounds, th, matrix, cand_extra, log=lambda m: print(m, flush=True),
                      steps=th["round_steps"], timing=timing)
    shutil.rmtree(outp / "trees", ignore_errors=True)
    summary = {"base_rev": sha, "rounds": rounds, "mode": "turns" if timing else "counters", "slow_pct": slow_pct,
               "thresholds": th, "seconds": time.perf_counter() - t0,
               "verdicts": [{"entry": v.entry, "verdict": v.verdict, "checks": v.checks,
                             "pairs": [asdict(p) for p in v.pairs]} for v in verdicts]}
    (outp / "ab.json").write_text(json.dumps(summary, indent=1, default=str))
    print(render(verdicts))
    fails = [v.entry for v in verdicts if v.verdict == "FAIL"]
    print(f"\ngate ab: {'REGRESSION in ' + ', '.join(fails) if fails else 'no regression'} "
          f"({len(verdicts)} entries, {summary['seconds']:.0f}s) -> {outp / 'ab.json'}")
    return 1 if fails else 0
