"""Time to a target loss over seeds: which recipe reaches the same held-out loss sooner, and is it sure.

Rows with a ``target_loss`` (bench/run.py ... eval_every=N target_loss=X, one row per seed: a sweep over
``seed``) are grouped by what must be equal for a race to the same quality: model, device, world size,
sequence length, data and target (``RACE_KEYS``). Within a race a **recipe** is the strategy (``variant_label``)
plus whatever else differs between the race's rows among global batch, micro-batch, learning rate and schedule
(``recipe_label``: an honest race may change the batch or the lr, and the label says so).

Per recipe (``board``): seeds run, seeds that reached the target, the median time to target (training seconds,
eval excluded; reports/record.py ``time_to_target_s``) with its min-max, tokens and steps to target, tokens/s.

Per pair of recipes (``verdict``): an exact one-sided permutation test of the Mann-Whitney U statistic on the
seeds' times to target -- "A reaches the target sooner than B" when p < ``ALPHA`` (0.01, the speedrun's
significance rule for a new record). A seed that did not reach the target (status ``not_reached``) counts as
slower than every seed that did (a censored time: ranks need no value for it). All C(n_a + n_b, n_a)
relabellings are enumerated (up to ``EXACT_LIMIT``, else that many drawn with a fixed seed). With 5 seeds each
the smallest p is 1/252 = 0.004: only a clean separation passes 0.01.
"""

from __future__ import annotations

import itertools
import math
import random

import pandas as pd

from reports.record import variant_label

RACE_KEYS = ["model", "device_name", "world_size", "seq_len", "data", "target_loss"]
RECIPE_EXTRAS = ["global_batch_seqs", "micro_batch", "lr", "lr_schedule"]  # named when they differ within a race
ALPHA = 0.01
EXACT_LIMIT = 200_000


def _config(row: pd.Series, key: str):
    conf = row.get("config")
    return conf.get(key) if isinstance(conf, dict) else None


def races(df: pd.DataFrame) -> list[dict]:
    """One entry per race: ``{"key", "label", "rows" (its rows, a ``recipe`` column added)}``, rows with a
    target only; races are ordered by their key."""
    if "target_loss" not in df.columns:
        return []
    df = df[pd.to_numeric(df.target_loss, errors="coerce") > 0].copy()
    if df.empty:
        return []
    df["lr"] = [_config(r, "lr") for _, r in df.iterrows()]
    df["lr_schedule"] = [_config(r, "lr_schedule") for _, r in df.iterrows()]
    out = []
    for key, rows in df.groupby(RACE_KEYS, sort=True, dropna=False):
        rows = rows.copy()
        varying = [c for c in RECIPE_EXTRAS if c in rows and rows[c].astype(str).nunique() > 1]
        rows["recipe"] = [recipe_label(r, varying) for _, r in rows.iterrows()]
        model, device, ws, seq, data, target = key
        out.append({"key": key, "rows": rows,
                    "label": f"{model} on {ws}x {device}, seq {seq}, data {data}: to held-out loss {target:g}"})
    return out


def recipe_label(row: pd.Series, varying: list[str]) -> str:
    names = {"global_batch_seqs": "batch", "micro_batch": "mb", "lr": "lr", "lr_schedule": "lr"}
    extra = [f"{names[c]} {row[c]}" for c in varying if c != "lr_schedule"] + (
        [str(row["lr_schedule"])] if "lr_schedule" in varying else [])
    base = variant_label(row["strategy"], row.get("dtype"), row.get("model_source"))
    return f"{base} ({', '.join(extra)})" if extra else base


def times(rows: pd.DataFrame) -> list[float]:
    """A recipe's seeds' times to target, ``inf`` for a seed that finished without reaching it; failed runs
    (error, oom, nan, ...) are not seeds of the race."""
    done = rows[rows.status.isin(["ok", "not_reached"])]
    return [float(t) if s == "ok" and t == t and t is not None else math.inf
            for s, t in zip(done.status, pd.to_numeric(done.time_to_target_s, errors="coerce"))]


def u_statistic(a: list[float], b: list[float]) -> float:
    """Mann-Whitney U of ``a`` against ``b``: pairs in which a's value is smaller (sooner), ties counting 1/2."""
    return sum(1.0 if x < y else 0.5 if x == y else 0.0 for x in a for y in b)


def p_sooner(a: list[float], b: list[float], seed: int = 0) -> float:
    """One-sided p-value that ``a``'s times are stochastically smaller than ``b``'s: the share of relabellings of
    the pooled times whose U is at least the observed one (exact up to EXACT_LIMIT relabellings)."""
    pooled, n = a + b, len(a)
    observed = u_statistic(a, b)
    total = math.comb(len(pooled), n)
    if total <= EXACT_LIMIT:
        draws = (list(c) for c in itertools.combinations(range(len(pooled)), n))
        count = total
    else:
        rng = random.Random(seed)
        draws = (rng.sample(range(len(pooled)), n) for _ in range(EXACT_LIMIT))
        count = EXACT_LIMIT
    hits = 0
    for idx in draws:
        chosen = set(idx)
        x = [pooled[i] for i in idx]
        y = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        hits += u_statistic(x, y) >= observed - 1e-9
    return hits / count


def verdict(name_a: str, a: list[float], name_b: str, b: list[float]) -> dict:
    """Which of two recipes reaches the target sooner over their seeds, or neither, with the test's p-value."""
    if len(a) < 2 or len(b) < 2:
        return {"a": name_a, "b": name_b, "call": "too few seeds", "p": None,
                "text": f"{name_a} vs {name_b}: too few seeds ({len(a)} and {len(b)}; 2 each at least, 5 to reach "
                        f"p < {ALPHA})"}
    pa, pb = p_sooner(a, b), p_sooner(b, a)
    if pa < ALPHA:
        call, p, text = "sooner", pa, f"{name_a} reaches the target sooner than {name_b}"
    elif pb < ALPHA:
        call, p, text = "later", pb, f"{name_b} reaches the target sooner than {name_a}"
    else:
        call, p, text = "not distinguishable", min(pa, pb), f"{name_a} and {name_b}: not distinguishable"
    return {"a": name_a, "b": name_b, "call": call, "p": p,
            "text": f"{text} (one-sided exact permutation test of Mann-Whitney U over {len(a)} + {len(b)} seeds, "
                    f"p = {p:.3g}{'' if call != 'not distinguishable' else f'; needs < {ALPHA}'})"}


def board(race: dict) -> pd.DataFrame:
    """The race's leaderboard, soonest median time to target first (a recipe with fewer than half its seeds
    reaching the target has no median: last)."""
    recs = []
    for recipe, rows in race["rows"].groupby("recipe", sort=False):
        t = times(rows)
        reached = rows[rows.status == "ok"]
        finite = sorted(x for x in t if math.isfinite(x))
        median = pd.Series(t).median() if t else math.nan
        recs.append({"recipe": recipe, "seeds": len(t), "reached": len(finite),
                     "time_to_target_s": median if math.isfinite(median) else math.nan,
                     "time_lo": finite[0] if finite else math.nan, "time_hi": finite[-1] if finite else math.nan,
                     "tokens_to_target": pd.to_numeric(reached.tokens_to_target, errors="coerce").median(),
                     "steps_to_target": pd.to_numeric(reached.steps_to_target, errors="coerce").median(),
                     "tokens_per_sec": pd.to_numeric(rows.tokens_per_sec, errors="coerce").median(),
                     "eval_loss": pd.to_numeric(rows.eval_loss, errors="coerce").median(),
                     "run_ids": list(rows.run_id), "source_files": list(rows.get("source_file", []))})
    return pd.DataFrame(recs).sort_values("time_to_target_s", na_position="last", kind="stable").reset_index(
        drop=True)


def verdicts(race: dict, table: pd.DataFrame) -> list[dict]:
    """Each recipe against the soonest (the board's first)."""
    by = {r: times(rows) for r, rows in race["rows"].groupby("recipe", sort=False)}
    if table.empty:
        return []
    lead = table.recipe.iloc[0]
    return [verdict(lead, by[lead], r, by[r]) for r in table.recipe.iloc[1:]]


BOARD_COLUMNS = ["recipe", "seeds reached", "time to target (s)", "tokens to target", "steps", "tokens/s",
                 "final held-out loss", "vs the soonest"]


def board_rows(table: pd.DataFrame, calls: list[dict]) -> list[list[str]]:
    said = {c["b"]: c for c in calls}
    out = []
    for _, r in table.iterrows():
        t = ("-" if r.time_to_target_s != r.time_to_target_s else
             f"{r.time_to_target_s:.1f} ({r.time_lo:.1f}-{r.time_hi:.1f})")
        c = said.get(r.recipe)
        vs = "first" if c is None else c["call"] if c["p"] is None else {
            "sooner": "later", "later": "sooner", "not distinguishable": "not distinguishable"}[c["call"]] + \
            f", p={c['p']:.3g}"
        out.append([r.recipe, f"{r.reached}/{r.seeds}", t,
                    "-" if r.tokens_to_target != r.tokens_to_target else f"{r.tokens_to_target:,.0f}",
                    "-" if r.steps_to_target != r.steps_to_target else f"{r.steps_to_target:.0f}",
                    f"{r.tokens_per_sec:,.0f}", f"{r.eval_loss:.4f}", vs])
    return out
