"""The probes the step-time model takes its rates from (bench/measure/bandwidth.py, bench/measure/parts.py,
through the probe engine bench/measure/probe.py): what they measure, that they cache, that a busy host is not
cached, on real gloo ranks."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from bench.measure.parts import Parts, workloads
from bench.plan.steptime import (
    Rates,
    can_overlap,
    predict_step,
)
from models import get_config
from strategies import StrategyConfig
from tests.helpers import HF_ABSENT, HF_MISSING, HF_SKIP_ALLOWED

pytestmark = pytest.mark.dist

RATES = Rates(matmul_flops=50e9, mem_bw=20e9, link_bw=1e9)


def _link_worker(rank: int, world_size: int, cache: str):
    import os

    from bench.measure.bandwidth import link_bandwidth

    os.environ["N00BGPT_CACHE_DIR"] = cache
    return link_bandwidth(torch.device("cpu"), nbytes=2**20, repeats=3)


def test_bandwidth_probes_measure_and_cache(monkeypatch, tmp_path, ranks):
    import torch

    from bench.measure.bandwidth import memory_bandwidth

    monkeypatch.setenv("N00BGPT_CACHE_DIR", str(tmp_path))
    bw, source = memory_bandwidth(torch.device("cpu"), numel=2**22, repeats=3)
    assert 1e8 < bw < 1e12 and source.startswith("probe:measured")
    if "not cached" not in source:
        assert memory_bandwidth(torch.device("cpu")) == (bw, "probe:cached add")
    a, b = ranks(_link_worker, str(tmp_path))
    assert a[0] == b[0] > 0 and a[1] == b[1]  # both ranks agree (the slowest rank's time counts)


def _collectives_worker(rank: int, world_size: int, cache: str):
    import os

    import torch

    from bench.measure.bandwidth import collective_bandwidths

    os.environ["N00BGPT_CACHE_DIR"] = cache
    cpu, quiet = torch.device("cpu"), {"neighbours_limit": 1.0}  # about caching: whatever else shares the CI host
    out = {c: collective_bandwidths(cpu, contended=c, nbytes=2**20, repeats=3, **quiet) for c in (False, True)}
    again = collective_bandwidths(cpu, contended=True)
    fresh = collective_bandwidths(cpu, contended=True, nbytes=2**20, repeats=3, fresh=True, **quiet)
    return out, again, fresh, collective_bandwidths(cpu, contended=True)


def test_each_collective_is_probed_alone_and_beside_busy_compute(ranks, tmp_path):
    """bench/measure/bandwidth.py ``collective_bandwidths``: every kind the strategies issue, the same on both
    ranks (the slowest rank's time), cached per ``contended``; ``fresh`` probes again and replaces the cached
    value. (How much busy compute slows them is a measured
    fact of a host, docs/planner.md's figures, not a bound a test on a shared CI host can hold: one run measured the
    idle all-reduce at 0.19 GB/s and the contended one at 0.69.)"""
    a, b = ranks(_collectives_worker, str(tmp_path))
    assert a == b
    (idle, idle_src), (busy, busy_src) = a[0][False], a[0][True]
    assert set(idle) == set(busy) == {"all_reduce", "all_gather", "reduce_scatter"}
    assert all(v > 1e6 for v in [*idle.values(), *busy.values()])
    assert idle_src == "probe:measured collectives" and busy_src == "probe:measured contended collectives"
    assert a[1] == (busy, "probe:cached contended collectives")
    fresh, fresh_src = a[2]  # fresh=True (python -m bench.tune): probed now, whatever is cached, and cached
    assert fresh_src == "probe:measured contended collectives" and a[3] == (fresh, "probe:cached contended collectives")


def test_neighbour_share_subtracts_every_probing_rank_per_host():
    """``neighbour_share``: per host, (busy - its ranks' CPU) / total, the two ranks of one host reading the same
    counters; the busiest host counts; unreadable hosts are skipped."""
    from bench.measure.contention import neighbour_share

    # host a: 2 cores x 2 s = 4 s, 3.0 s busy, ranks 1.2 + 1.0 s -> 0.8 / 4; host b: 1.5 busy of 2, rank 0.5 -> 0.5
    assert neighbour_share([("a", 3.0, 4.0, 1.2), ("a", 3.02, 4.0, 1.0), ("b", 1.5, 2.0, 0.5)]) == pytest.approx(0.5)
    assert neighbour_share([("a", 3.0, 4.0, 1.2), ("a", 3.0, 4.0, 1.0)]) == pytest.approx(0.2)
    assert neighbour_share([("a", 1.0, 4.0, 1.5)]) == 0.0  # accounting jitter never goes below nothing
    assert neighbour_share([("a", None, None, 1.0)]) is None


def _spin(seconds: float) -> None:
    import time

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _neighbour_worker(rank: int, world_size: int, cache: str, limit: float):
    import os

    import torch

    from bench.measure.bandwidth import collective_bandwidths, memory_bandwidth

    os.environ["N00BGPT_CACHE_DIR"] = cache
    kinds = collective_bandwidths(torch.device("cpu"), nbytes=2**20, repeats=9, neighbours_limit=limit)
    mem = memory_bandwidth(torch.device("cpu"), numel=2**22, repeats=9, neighbours_limit=limit) if rank == 0 else None
    again = collective_bandwidths(torch.device("cpu"))  # what a later run on the host reads: not the busy probe
    return kinds[1], mem and mem[1], again[1]


def test_a_probe_beside_a_busy_neighbour_is_not_cached(ranks, tmp_path):
    """A process outside the probe keeps a core busy while the bandwidths are probed: the share the probes
    measure includes it (a core is 1 / cores of the host, half of that allowed for the accounting), so
    neither the collectives nor the memory probe is cached and their sources say how busy the host was; the
    next probe on the host measures again."""
    import multiprocessing
    import os
    import re

    cores = os.cpu_count() or 1
    neighbour = multiprocessing.get_context("spawn").Process(target=_spin, args=(60.0,), daemon=True)
    neighbour.start()
    try:
        a, _ = ranks(_neighbour_worker, str(tmp_path), 0.5 / cores)
    finally:
        neighbour.terminate()
        neighbour.join()
    for source in a[:2]:
        share = re.search(r"\(.*neighbours (\d+)% of the host: not cached\)", source)
        assert share and int(share.group(1)) / 100 >= 0.5 / cores, source
    assert a[2].startswith("probe:measured collectives")  # nothing was cached: measured again


def test_parts_timed_beside_a_busy_neighbour_are_not_cached(monkeypatch, tmp_path):
    """The parts probe measures the host's share taken by other work as it times the parts: with a process
    spinning on a core beside it (1 / cores of the host; the limit set to half of that), the parts serve this
    run only -- the source says how busy the host was -- and the next call measures them again."""
    import multiprocessing
    import re

    from bench.measure.parts import get_parts
    from tests.helpers.training import model_cfg

    monkeypatch.setenv("N00BGPT_CACHE_DIR", str(tmp_path))
    cores = os.cpu_count() or 1
    monkeypatch.setenv("N00BGPT_NEIGHBOURS_MAX", str(0.5 / cores))
    cfg = dataclasses.replace(model_cfg("tiny"), loss_chunk=0)
    neighbour = multiprocessing.get_context("spawn").Process(target=_spin, args=(60.0,), daemon=True)
    neighbour.start()
    try:
        first, src1 = get_parts(cfg, 2, 32, torch.device("cpu"), 1)
        _, src2 = get_parts(cfg, 2, 32, torch.device("cpu"), 1)
    finally:
        neighbour.terminate()
        neighbour.join()
    share = re.fullmatch(r"probe:measured parts \(neighbours (\d+)% of the host: not cached\)", src1)
    assert share and int(share.group(1)) / 100 >= 0.5 / cores, src1
    assert src2.startswith("probe:measured parts") and first.block_s > 0


def _tp_parts_worker(rank: int, world_size: int, presets: list[str]) -> dict:
    """Per preset and sp: one tp rank's local FLOPs of each timed part and of its matmul probe (DTensor's ops
    declined, so the local ops they run are counted; none on the fake tensors of its sharding propagation),
    and the unsplit probes' FLOPs (FlopCounterMode); then CommClock on a constructed wait."""
    import time
    from functools import partial

    from torch.distributed._functional_collectives import AsyncCollectiveTensor
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    from bench.measure.comm import CommClock
    from bench.measure.parts import Sharding
    from strategies.mesh import build_mesh
    from strategies.tp import apply_tp, maybe_loss_parallel
    from tests.helpers.training import model_cfg

    class LocalFlops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            from torch._subclasses.fake_tensor import FakeTensor
            if any(issubclass(t, (DTensor, AsyncCollectiveTensor)) for t in types):
                return NotImplemented
            out = func(*args, **(kwargs or {}))
            count = flop_registry.get(func._overloadpacket)
            if count is not None and not any(issubclass(t, FakeTensor) for t in types):
                self.flops += count(*args, **(kwargs or {}), out_val=out)
            return out

    def local(fn) -> int:
        with LocalFlops() as m:
            fn()
        return m.flops

    def whole(fn) -> int:
        with FlopCounterMode(display=False) as m:
            fn()
        return m.get_total_flops()

    out = {}
    for preset in presets:
        for sp in (False, True):
            s = StrategyConfig(tp=2, sp=sp)
            mesh = build_mesh(s, "cpu")
            shard = Sharding(2, sp, partial(apply_tp, tp_mesh=mesh["tp"], sp=sp), lambda s=s: maybe_loss_parallel(s))
            w = workloads(model_cfg(preset), 2, 32, torch.device("cpu"), shard=shard)
            one = workloads(model_cfg(preset), 2, 32, torch.device("cpu"))
            out[preset, sp] = {name: local(w[name]) for name in ("block", "block_matmul", "rest", "rest_matmul")}
            out[preset, sp].update(whole_block=whole(one["block_matmul"]),
                                   whole_rest=whole(one.get("rest_plain_matmul", one["rest_matmul"])))
    mesh = build_mesh(StrategyConfig(tp=2), "cpu")
    dt = distribute_tensor(torch.ones(4, 1000), mesh["tp"], [Shard(0)])
    torch.distributed.barrier()
    start = time.perf_counter()
    with CommClock() as clock:
        time.sleep(0.1 if rank == 0 else 0.6)  # not communication: never counted
        dt.redistribute(placements=[Replicate()]).to_local().sum()  # an all-gather; rank 0 waits ~0.5 s in it
    out["clock"] = clock.seconds, time.perf_counter() - start
    return out


def test_tensor_parallel_parts_are_one_ranks_split(ranks):
    """Under tp=2 every timed part (the model's block and rest, parallelised as the run does it) does exactly
    its matmul probe's FLOPs on each rank, and those are half the unsplit ones: the probes are one rank's
    shapes; CommClock counts the wait inside a collective and not the compute (a sleep) before it."""
    presets = ["tiny", "llama-tiny"]
    try:
        import transformers  # noqa: F401
        presets.append("tiny:hf")
    except ImportError:
        pass
    for rank, got in enumerate(ranks(_tp_parts_worker, presets)):
        for preset in presets:
            for sp in (False, True):
                f = got[preset, sp]
                assert f["block"] == f["block_matmul"] > 0 and 2 * f["block_matmul"] == f["whole_block"], (preset, sp)
                assert f["rest"] == f["rest_matmul"] > 0 and 2 * f["rest_matmul"] == f["whole_rest"], (preset, sp)
        seconds, elapsed = got["clock"]
        if rank == 0:  # waited for rank 1's 0.6 s sleep, not for its own 0.1 s
            assert 0.35 < seconds < elapsed - 0.08, got["clock"]
        else:  # rank 1 arrived last: the all-gather completes at once
            assert seconds < 0.2 < 0.6 < elapsed, got["clock"]


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny", "tiny:hf"])
def test_the_matmul_probes_do_exactly_the_parts_matmuls(preset):
    """FlopCounterMode: the GEMMs (+ SDPA) the probe times alone are the FLOPs of the block's and of the rest's
    forward + backward, so compute vs memory-bound splits what the model runs."""
    from torch.utils.flop_counter import FlopCounterMode

    from tests.helpers.training import model_cfg

    if preset.endswith(":hf") and HF_MISSING and HF_SKIP_ALLOWED:
        pytest.skip(HF_ABSENT)
    w = workloads(model_cfg(preset), 2, 32, torch.device("cpu"))

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    assert flops(w["block_matmul"]) == flops(w["block"]) > 0
    assert flops(w["rest_matmul"]) == flops(w["rest"]) > 0
    if preset.endswith(":hf"):  # HF's head is the plain one: nothing more to time
        assert "rest_plain" not in w
    else:  # the plain head too (tp, pp, compile run it), the same FLOPs in one piece
        assert flops(w["rest_plain_matmul"]) == flops(w["rest_plain"]) == flops(w["rest"])


def test_the_parts_of_a_plain_head_model_are_cached_without_the_plain_variant(monkeypatch, tmp_path):
    """A model whose own loss is the plain one has no separate plain parts; its six parts cache and read back."""
    from bench.measure.parts import get_parts
    from tests.helpers.training import model_cfg

    monkeypatch.setenv("N00BGPT_CACHE_DIR", str(tmp_path))
    cfg = dataclasses.replace(model_cfg("tiny"), loss_chunk=0)
    first, src1 = get_parts(cfg, 2, 32, torch.device("cpu"), 1)
    again, src2 = get_parts(cfg, 2, 32, torch.device("cpu"), 1)
    assert (src1, src2) == ("probe:measured parts", "probe:cached parts") and again == first
    assert first.rest_plain_s is None and first.rest_s > first.rest_matmul_s > 0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_parts_run_their_matmuls_in_the_runs_compute_dtype(dtype):
    """Every matmul of every timed part (the model's block and rest under autocast as the harness runs them, and
    the matmul probes) takes inputs of the run's compute dtype, and the FLOPs still match part for part."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    from tests.helpers.training import model_cfg

    mm_ops = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}

    class Dtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in mm_ops:
                self.seen.update(a.dtype for a in args if isinstance(a, torch.Tensor))
            return func(*args, **(kwargs or {}))

    w = workloads(model_cfg("tiny"), 2, 32, torch.device("cpu"), dtype)
    want = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    with w["precision"]:
        for part in ("block", "block_matmul", "rest", "rest_matmul"):
            with Dtypes() as mode:
                w[part]()
            assert mode.seen == {want}, (part, mode.seen)
        with FlopCounterMode(display=False) as a:
            w["block"]()
        with FlopCounterMode(display=False) as b:
            w["block_matmul"]()
        assert a.get_total_flops() == b.get_total_flops() > 0
    with pytest.raises(ValueError, match="dtype='int8'.*fp32, tf32, bf16, fp16"):
        workloads(model_cfg("tiny"), 2, 32, torch.device("cpu"), "int8")


def _parts_worker(rank: int, world_size: int, cache: str) -> list[dict]:
    from bench.harness.dist import DistInfo
    from bench.harness.loop import plan_batch, train
    from bench.run import predictions
    from tests.helpers.training import run_cfg

    os.environ["N00BGPT_CACHE_DIR"] = cache
    rows = []
    for strategy in ({"dp": "ddp"}, {"dp": "ddp"}, {"tp": 2}):
        cfg = run_cfg(strategy, 2, 1, steps=2, seq_len=32)
        cfg.probe_parts = True
        info = DistInfo(rank, rank, world_size, 1, torch.device("cpu"), "gloo")
        out = train(cfg, info)
        rows.append({**out.metrics, **predictions(cfg, info, plan_batch(cfg, info), out)})
    return rows


def test_probe_parts_rows_predict_from_one_cached_measurement(ranks, tmp_path):
    """A run with probe_parts measures the parts on both ranks (the slowest rank's kept) and caches them; the
    next run of the same shape reads them; each row's prediction is the model on its rates and those parts."""
    from tests.helpers.training import run_cfg

    first, second, tp = ranks(_parts_worker, str(tmp_path))[0]
    assert first["pred_parts"]["source"] == "probe:measured parts"
    assert second["pred_parts"] == {**first["pred_parts"], "source": "probe:cached parts"}
    parts = Parts(**{k: v for k, v in first["pred_parts"].items() if k != "source"})
    assert parts.block_s > 0 and parts.rest_s > parts.rest_matmul_s > 0 and parts.adamw_foreach_s_per_param > 0
    assert parts.tp == 1 and parts.block_comm_s == 0
    # a tensor-parallel run times its own split parts (not the cached whole ones), with their collectives' waits
    split = Parts(**{k: v for k, v in tp["pred_parts"].items() if k != "source"})
    assert tp["pred_parts"]["source"] == "probe:measured parts" and split.tp == 2 and not split.sp
    # (each a median of its own timings -- the clock's run is separate -- so only their sign is certain under load)
    assert split.block_comm_s > 0 and split.rest_comm_s > 0
    assert split.adamw_fused_s_per_param is None and split.rest_plain_s is None
    for row, strategy, p in ((first, {"dp": "ddp"}, parts), (second, {"dp": "ddp"}, parts), (tp, {"tp": 2}, split)):
        cfg = run_cfg(strategy, 2, 1, steps=2, seq_len=32)
        pred = predict_step(cfg.model, cfg.strategy, 2, 2, 32, 1, Rates(row["peak_flops"], row["mem_bw_bytes_per_s"],
                            row["link_bw_bytes_per_s"], p, row["link_bw_by_kind"]),
                            can_overlap("cpu", 2, 1, len(os.sched_getaffinity(0))))
        assert row["pred_step_time_s"] == pytest.approx(pred["step_s"])
        assert row["pred_step_breakdown"]["memory_s"] == pytest.approx(pred["memory_s"])
    assert tp["pred_step_breakdown"]["comm_s"] == pytest.approx(4 * split.block_comm_s + split.rest_comm_s)  # 4 blocks


def test_the_tuners_parts_probe_caches_the_split_parts_runs_read(tmp_path, monkeypatch):
    """``torchrun -m bench.tune.parts ... tp=2 sp=true`` (what python -m bench.tune runs per parts key) times the
    parts split on 2 gloo ranks and caches them under the key a tp2+sp run of that shape reads."""
    import json
    import subprocess
    import sys

    from bench.measure.parts import Sharding, _key
    from bench.measure.probe import cache_get
    from tests.helpers import ROOT

    monkeypatch.setenv("N00BGPT_CACHE_DIR", str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "bench.tune.parts", "model=tiny", "micro_batch=2", "seq_len=32", "tp=2", "sp=true"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["source"] == "probe:measured parts" and (got["tp"], got["sp"]) == (2, True)
    assert got["block_comm_s"] > 0 and got["rest_comm_s"] > 0 and got["adamw_fused_s_per_param"] is None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the key names the probing ranks' threads (OMP_NUM_THREADS=1, as torchrun's ranks)
    try:
        key = _key(get_config("tiny"), 2, 32, torch.device("cpu"), 2, "fp32", Sharding(2, True, None))
    finally:
        torch.set_num_threads(threads)
    for field in ("block_s", "block_matmul_s", "rest_s", "block_comm_s", "rest_comm_s", "adamw_foreach_s_per_param"):
        assert cache_get(f"{key}|{field}") == pytest.approx(got[field]), field
