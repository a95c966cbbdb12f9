"""The token sources (bench/harness/data.py) and the data split, checked on their own, because every parity test's
reference draws from the same source through the same index arithmetic and cannot see a flaw the two share."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from bench.harness.config import RunConfig
from bench.harness.data import SyntheticData
from bench.harness.dist import DistInfo
from bench.harness.loop import build, make_step, plan_batch
from strategies import StrategyConfig
from tests.helpers.training import model_cfg

pytestmark = pytest.mark.unit


def test_synthetic_sequences_are_distinct_reproducible_and_shifted():
    """Three steps of 4 micro-batches (2 data-parallel ranks x 2 accumulation steps) of 4 sequences: all 48
    sequences differ from each other (a global batch of copies would train like one sequence, and parity against
    a reference with the same flaw would still hold); the same (seed, step, index) gives the same tokens in another
    instance, another seed other tokens; targets are the inputs shifted by one; every id is below the vocabulary."""
    cpu = torch.device("cpu")
    data = SyntheticData(256, 4, 16, seed=0, device=cpu)
    seqs = []
    for step in range(3):
        for index in range(4):
            x, y = data.batch(step, index)
            assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
            assert torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < 256 and int(x.min()) >= 0
            seqs += [tuple(row.tolist()) for row in x]
    assert len(set(seqs)) == len(seqs) == 48
    again = SyntheticData(256, 4, 16, seed=0, device=cpu).batch(2, 3)
    assert all(torch.equal(a, b) for a, b in zip(again, data.batch(2, 3)))
    assert not torch.equal(SyntheticData(256, 4, 16, seed=1, device=cpu).batch(2, 3)[0], again[0])


# ------------------------------------------------------------------ what each rank reads, from the tokens themselves
T_WIN, VOCAB, N_WINDOWS = 16, 4096, 200  # a corpus whose token at position p is p: a window names itself


def _reads(rank: int, world: int, fields: dict, micro_batch: int, grad_accum: int, data: str, steps: int) -> list:
    """Train ``steps`` steps through the harness's own build and step, recording every micro-batch this rank reads:
    [(step, x, y)] in reading order."""
    cfg = RunConfig(model=dataclasses.replace(model_cfg("tiny"), vocab_size=VOCAB), strategy=StrategyConfig(**fields),
                    steps=steps, warmup=0, micro_batch=micro_batch, grad_accum=grad_accum, seq_len=T_WIN, log_every=0,
                    data=data, measure_comm=False, measure_overlap=False)
    info = DistInfo(rank, rank, world, 1, torch.device("cpu"), "gloo" if world > 1 else None)
    b = build(cfg, info, plan_batch(cfg, info))
    seen, read = [], b.data.batch

    def recording(step, index):
        x, y = read(step, index)
        seen.append((step, x.clone(), y.clone()))
        return x, y

    b.data.batch = recording
    step = make_step(cfg, info, b)
    for s in range(steps):
        step(s)
    return seen


@pytest.mark.dist
def test_every_rank_reads_its_own_share_of_the_global_batch_known_from_the_tokens(ranks, tmp_path):
    """The data split, judged from the tokens alone (not from the harness's index arithmetic, which the parity
    tests' references share): on a corpus whose token at position p is p, every sequence a rank reads names its
    window. On 4 ranks, FSDP x TP2 (2 data-parallel groups), micro-batch 2, grad accumulation 2, 3 steps:
    every sequence is one aligned window of consecutive positions and its targets are the next positions; the two
    tensor-parallel ranks of a group read the same sequences in the same order; the groups' windows in a step are
    disjoint and make up exactly the 8 windows a single process reads in that step (micro-batch 2 x 4
    accumulation steps); no window repeats across steps within the corpus's 200 windows."""
    np = pytest.importorskip("numpy")
    corpus = tmp_path / "train.bin"
    np.arange(N_WINDOWS * T_WIN + 1, dtype=np.uint16).tofile(corpus)
    steps = 3
    per_rank = ranks(_reads, {"dp": "fsdp", "tp": 2}, 2, 2, str(corpus), steps, world_size=4)
    single = _reads(0, 1, {}, 2, 4, str(corpus), steps)

    def windows(seen) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for s, x, y in seen:
            assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones_like(x[:, 1:])), "a sequence is not one window"
            assert torch.equal(y, x + 1), "targets are not the next positions"
            assert bool((x[:, 0] % T_WIN == 0).all()), "a window is not aligned"
            out.setdefault(s, []).extend((x[:, 0] // T_WIN).tolist())
        return out

    ref = windows(single)
    got = [windows(r) for r in per_rank]
    # the mesh puts ranks 0,1 in one tensor-parallel group (data-parallel group 0) and ranks 2,3 in the other
    assert got[0] == got[1] and got[2] == got[3], "tensor-parallel ranks of one group read different data"
    all_windows = []
    for s in range(steps):
        assert len(ref[s]) == len(set(ref[s])) == 8
        group0, group1 = got[0][s], got[2][s]
        assert len(group0) == len(group1) == 4 and not set(group0) & set(group1), f"step {s}: groups overlap"
        assert sorted(group0 + group1) == sorted(ref[s]), f"step {s}: the groups' union is not the global batch"
        all_windows += ref[s]
    assert len(set(all_windows)) == len(all_windows) == 8 * steps, "a window repeats within the epoch"


# --------------------------------------------------------------------------- the markov language and its floor
def test_markov_floor_is_the_chains_own_expected_loss():
    """The floor, computed here another way (the dense transition matrix, its powers, entropies with
    torch.special.entr), equals markov_floor; and the chain's own mean loss on 64 sequences MarkovData drew (the
    log-probability of each drawn next token under the chain) lies within 4 standard errors of it: the sampler
    draws from the chain the floor describes."""
    from bench.harness.data import MarkovData, markov_chain, markov_floor

    V, T = 64, 32
    successors, probs = markov_chain(V)
    P = torch.zeros(V, V, dtype=torch.float64).scatter_(1, successors, probs)
    assert torch.allclose(P.sum(1), torch.ones(V, dtype=torch.float64))
    H = torch.special.entr(P).sum(1)
    mu, want = torch.full((V,), 1 / V, dtype=torch.float64), 0.0
    for _ in range(T):
        want += float(mu @ H) / T
        mu = mu @ P
    assert markov_floor(V, T) == pytest.approx(want, rel=1e-12)
    assert 0.1 < want < math.log(V) / 2  # learnable: far below uniform tokens' ln V

    data = MarkovData(V, 8, T, seed=0, device=torch.device("cpu"))
    nll = torch.cat([-P[x, y].log().reshape(-1) for x, y in (data.batch(0, i) for i in range(8))])
    assert bool(torch.isfinite(nll).all()), "a drawn token the chain never goes to"
    se = float(nll.std()) / math.sqrt(nll.numel())
    assert abs(float(nll.mean()) - want) < 4 * se


def test_markov_sequences_are_distinct_and_the_same_however_the_batch_is_split():
    """A micro-batch of 4 sequences is the two micro-batches of 2 with the same global ids (indices 2k, 2k+1),
    sequences differ from each other, the next seed gives other ones, targets are the inputs shifted."""
    from bench.harness.data import MarkovData

    cpu = torch.device("cpu")
    four, two = MarkovData(256, 4, 16, 0, cpu), MarkovData(256, 2, 16, 0, cpu)
    x4, y4 = four.batch(3, 1)
    assert torch.equal(x4, torch.cat([two.batch(3, 2)[0], two.batch(3, 3)[0]]))
    assert torch.equal(x4[:, 1:], y4[:, :-1]) and len({tuple(r.tolist()) for r in x4}) == 4
    assert not torch.equal(MarkovData(256, 4, 16, 1, cpu).batch(3, 1)[0], x4)


def test_a_run_on_markov_records_its_floor_and_learns_toward_it():
    """Through the harness's train: the row's loss_floor is markov_floor for the run's vocabulary and sequence
    length, and 10 steps take the loss from about ln V (uniform guessing) down by more than half a nat, above it."""
    from bench.harness.data import markov_floor
    from tests.helpers.training import losses_of, run_cfg

    observed: dict = {}
    losses = losses_of(run_cfg({}, 4, 1, data="markov", steps=10), observed=observed)
    floor = markov_floor(256, 64)
    assert observed["loss_floor"] == floor
    assert losses[0] == pytest.approx(math.log(256), rel=0.05) and floor < losses[-1] < losses[0] - 0.5


# ------------------------------------------------------------------------------------------- the held-out split
def _built(data: str, seed: int = 0, micro_batch: int = 2, grad_accum: int = 1, eval_every: int = 1):
    cfg = RunConfig(model=dataclasses.replace(model_cfg("tiny"), vocab_size=VOCAB), strategy=StrategyConfig(),
                    steps=1, warmup=0, micro_batch=micro_batch, grad_accum=grad_accum, seq_len=T_WIN, log_every=0,
                    data=data, seed=seed, eval_every=eval_every, measure_comm=False, measure_overlap=False)
    info = DistInfo(0, 0, 1, 1, torch.device("cpu"), None)
    return build(cfg, info, plan_batch(cfg, info))


def _windows(source, steps: int, micro: int = 1) -> list[int]:
    """The windows (numbered by their first token, the corpus naming its positions) ``source`` reads in
    ``steps`` steps of ``micro`` micro-batches."""
    out = []
    for s in range(steps):
        for m in range(micro):
            x, y = source.batch(s, m)
            assert torch.equal(y, x + 1) and bool((x[:, 0] % T_WIN == 0).all())
            out += (x[:, 0] // T_WIN).tolist()
    return out


def test_held_out_windows_are_never_trained_on(tmp_path):
    """On a corpus whose token at position p is p (200 windows), eval on: the held-out set is the last 10 % of the
    windows (180-199), read in order, the same for every seed; training reads only windows 0-179 -- each once per
    epoch of 90 steps of 2, over two epochs -- never a held-out one. Without eval, training reads all 200."""
    np = pytest.importorskip("numpy")
    corpus = tmp_path / "train.bin"
    np.arange(N_WINDOWS * T_WIN + 1, dtype=np.uint16).tofile(corpus)
    b = _built(str(corpus))
    held = _windows(b.eval_data, 10)
    assert held == list(range(180, 200))  # 10 batches of 2: every held-out window once, in order
    assert _windows(_built(str(corpus), seed=7).eval_data, 10) == held  # a fixed validation set
    trained = _windows(b.data, 180)
    assert not set(trained) & set(held), "training read a held-out window"
    assert sorted(trained[:180]) == list(range(180)) == sorted(trained[180:]), "not each window once per epoch"
    everything = _windows(_built(str(corpus), eval_every=0).data, 100)
    assert sorted(everything) == list(range(200)) and _built(str(corpus), eval_every=0).eval_data is None


def test_a_nanogpt_folder_holds_out_its_val_bin(tmp_path):
    """nanoGPT's own split: with val.bin beside train.bin the held-out batches come from val.bin (here tokens
    from 3200 on) and training reads all 200 windows of train.bin."""
    np = pytest.importorskip("numpy")
    np.arange(N_WINDOWS * T_WIN + 1, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(3200, 3200 + 10 * T_WIN + 1, dtype=np.uint16).tofile(tmp_path / "val.bin")
    b = _built(str(tmp_path))
    assert _windows(b.eval_data, 5) == list(range(200, 210))  # val.bin's windows: positions 3200/16 = 200 on
    assert sorted(_windows(b.data, 100)) == list(range(200))


@pytest.mark.parametrize("data", ["synthetic", "markov"])
def test_built_in_held_out_sets_are_fixed_and_apart_from_training(data):
    """synthetic and markov: the held-out batches are the same for every run seed, and none of their 16
    sequences is a sequence any of 50 training steps reads (4 micro-batches each), for either seed."""
    a, b = _built(data, seed=0, micro_batch=4), _built(data, seed=1, micro_batch=4)
    held = [a.eval_data.batch(k, m)[0] for k in range(2) for m in range(2)]
    assert all(torch.equal(h, b.eval_data.batch(k, m)[0]) for h, (k, m) in zip(held, [(0, 0), (0, 1), (1, 0),
                                                                                         (1, 1)]))
    held_rows = {tuple(r.tolist()) for h in held for r in h}
    assert len(held_rows) == 16
    for built in (a, b):
        trained = {tuple(r.tolist()) for s in range(50) for m in range(4) for r in built.data.batch(s, m)[0]}
        assert not trained & held_rows
