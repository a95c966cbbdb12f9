"""Metric definitions against independent sources: numpy percentiles, allocator/RSS facts, NVML fakes,
the datasheet table, and a CUDA-event timer driven by a fake clock."""

from __future__ import annotations

import types

import pytest
import torch

from bench.measure import memory, metrics, nvml, peak_flops, probe
from bench.measure.combine import combine_ranks, rule_of

pytestmark = pytest.mark.unit


def test_step_time_statistics_by_hand():
    """Linear interpolation between order statistics, worked by hand: 11 steps of 1..11 s (shuffled), and
    2 steps where p10 lies a tenth of the way from the first to the second."""
    stats = metrics.step_time_stats([5.0, 1.0, 11.0, 3.0, 2.0, 9.0, 4.0, 10.0, 6.0, 8.0, 7.0])
    assert (stats["step_time_p10_s"], stats["step_time_median_s"], stats["step_time_p90_s"]) == (2.0, 6.0, 10.0)
    assert stats["step_time_mean_s"] == 6.0
    two = metrics.step_time_stats([1.0, 2.0])
    assert two["step_time_p10_s"] == pytest.approx(1.1) and two["step_time_p90_s"] == pytest.approx(1.9)


def test_step_times_combine_by_max_and_throughput_by_elapsed_time():
    per_rank = [[0.10, 0.30, 0.20], [0.20, 0.10, 0.25]]
    times = metrics.combine_step_times(per_rank)
    assert times == [0.20, 0.30, 0.25]
    tp = metrics.throughput(times, global_batch_tokens=1000, world_size=2)
    assert tp["tokens_per_sec"] == pytest.approx(3000 / 0.75)
    assert tp["tokens_per_sec_per_device"] == pytest.approx(1500 / 0.75)
    st = metrics.step_time_stats(times)
    assert st["step_time_median_s"] == 0.25 and st["step_time_mean_s"] == pytest.approx(0.25)


def test_flops_utilisation():
    assert metrics.flops_utilisation(6e9, 1e4, 1e14) == pytest.approx(0.6)
    assert metrics.flops_utilisation(6e9, 1e4, None) is None


def test_cpu_timer_measures_wall_time():
    timer = metrics.StepTimer(torch.device("cpu"))
    import time

    for d in (0.02, 0.04):
        timer.start()
        time.sleep(d)
        timer.stop()
    got = timer.durations_s()
    assert 0.02 <= got[0] < 0.1 and 0.04 <= got[1] < 0.12  # sleep never returns early; a busy machine adds


def test_cuda_timer_reads_events_once_at_the_end(monkeypatch):
    """The CUDA path records events per step and synchronises once, in durations_s()."""
    clock = {"t": 0.0, "syncs": 0}

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None

        def record(self):
            self.t = clock["t"]

        def elapsed_time(self, end):
            assert clock["syncs"] == 1, "events read before the single synchronize"
            return (end.t - self.t) * 1e3  # ms, like CUDA

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: clock.__setitem__("syncs", clock["syncs"] + 1))
    timer = metrics.StepTimer(torch.device("cuda", 0))
    for d in (0.5, 0.25):
        timer.start()
        clock["t"] += d
        timer.stop()
    assert clock["syncs"] == 0
    assert timer.durations_s() == pytest.approx([0.5, 0.25])


def test_cpu_peak_memory_sees_a_large_allocation_and_resets():
    dev = torch.device("cpu")
    memory.reset_peak(dev)
    base = memory.read_peak(dev)["peak_mem_bytes"]
    x = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB, touched
    assert memory.read_peak(dev)["peak_mem_bytes"] - base >= 250 * 2**20
    del x
    memory.reset_peak(dev)  # VmHWM back to the current RSS
    assert memory.read_peak(dev)["peak_mem_bytes"] < base + 100 * 2**20
    assert memory.read_peak(dev)["peak_reserved_bytes"] is None


def test_cuda_peak_memory_reads_the_allocator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 123)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: 456)
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(d))
    dev = torch.device("cuda", 0)
    memory.reset_peak(dev)
    assert calls == [dev]
    assert memory.read_peak(dev) == {"peak_mem_bytes": 123, "peak_reserved_bytes": 456}


@pytest.mark.parametrize(
    "name,dtype,expected,label",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4e12, "H100 SXM5"),
        ("NVIDIA H100 PCIe", "bf16", 756e12, "H100 PCIe"),
        ("NVIDIA H100 NVL", "bf16", 835.5e12, "H100 NVL"),
        ("NVIDIA H100 80GB HBM3", "tf32", 494.7e12, "H100 SXM5"),
        ("NVIDIA H200", "bf16", 989.4e12, "H200 SXM"),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12, "A100"),
        ("NVIDIA A10G", "bf16", 70e12, "A10G"),
        ("NVIDIA A10", "fp32", 31.2e12, "A10"),
        ("NVIDIA L4", "bf16", 121e12, "L4"),
        ("NVIDIA L40S", "bf16", 362.05e12, "L40S"),
    ],
)
def test_peak_table_tells_gpus_apart(name, dtype, expected, label):
    peak, source = peak_flops.lookup_gpu_peak(name, dtype)
    assert peak == pytest.approx(expected)
    assert source.startswith(f"table:{label} {dtype}")


def test_unknown_gpu_is_probed_not_guessed(monkeypatch, tmp_path):
    assert peak_flops.lookup_gpu_peak("NVIDIA RTX 9090 Ti", "bf16") is None
    assert peak_flops.lookup_gpu_peak("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 on V100
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA RTX 9090 Ti")
    monkeypatch.setattr(peak_flops, "_probe_key", lambda d, t: "fake-gpu")
    monkeypatch.setenv("N00BGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(peak_flops, "probe_peak_flops", lambda d, t: peak_flops.Probe(42e12, 0.01, None))
    peak, source, stats = peak_flops.get_peak_flops(torch.device("cuda", 0), "bf16")
    assert (peak, source) == (42e12, "probe:measured matmul bf16")
    assert stats == {"peak_probe_spread": 0.01, "peak_probe_cpu_util": None}


def test_cpu_probe_is_measured_then_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("N00BGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(peak_flops, "CONTENDED_SPREAD", 1.0)  # this test is about caching, not contention
    monkeypatch.setattr(peak_flops, "CONTENDED_CPU_UTIL", 0.0)
    peak, source, stats = peak_flops.get_peak_flops(torch.device("cpu"), "fp32")
    assert source == "probe:measured matmul fp32" and 0 < stats["peak_probe_cpu_util"] <= 1.05
    # Independent check: a timed matmul cannot beat the probe's best by much. The best of 7 short windows, as a
    # neighbour that takes the core for a moment (a busy CI host) slows some windows, not the best one. The probe
    # itself may have run beside the other test worker throughout (this test switches off the contention guard
    # that would refuse to cache it: 30 GFLOP/s against 49 in a fresh-clone CI run), so where the check beats it
    # by more, the probe is measured again, up to 3 times, and the check is held to the best probe: a probe that
    # miscounts its FLOPs or its time reads low every time and still fails.
    a = torch.randn(512, 512)
    import time

    best = 0.0
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(5):
            a @ a
        best = max(best, 5 * 2 * 512**3 / (time.perf_counter() - t0))
    probes = [peak]
    while best >= 1.5 * max(probes) and len(probes) < 4:
        probes.append(peak_flops.probe_peak_flops(torch.device("cpu"), "fp32").flops)
    assert 0.2 * peak < best < 1.5 * max(probes)
    again, source2, _ = peak_flops.get_peak_flops(torch.device("cpu"), "fp32")
    assert again == peak and source2.startswith("probe:cached")


def test_a_contended_probe_is_used_but_never_cached(monkeypatch, tmp_path):
    """A neighbour that takes the core during the probe (here: a process spinning on both cores, and the
    probe's CPU share threshold above anything reachable) makes the probe count as contended."""
    monkeypatch.setenv("N00BGPT_CACHE_DIR", str(tmp_path))
    probes = iter([peak_flops.Probe(1e9, 0.40, 0.55), peak_flops.Probe(5e9, 0.02, 0.99)])
    monkeypatch.setattr(peak_flops, "probe_peak_flops", lambda d, t: next(probes))
    peak, source, stats = peak_flops.get_peak_flops(torch.device("cpu"), "fp32")
    assert peak == 1e9 and source.endswith("(contended: not cached)") and stats["peak_probe_spread"] == 0.40
    assert not (tmp_path / "probes.json").exists()
    peak, source, _ = peak_flops.get_peak_flops(torch.device("cpu"), "fp32")  # probed again, clean: cached
    assert peak == 5e9 and source == "probe:measured matmul fp32" and (tmp_path / "probes.json").exists()


def _put_many(cache: str, writer: int, start) -> None:
    import os

    os.environ["N00BGPT_CACHE_DIR"] = cache
    start.wait()
    for i in range(100):
        probe.cache_put(f"w{writer}|{i}", float(i))


@pytest.mark.dist
def test_concurrent_cache_writers_lose_no_key(tmp_path):
    """The ranks of a group and parallel runs write one cache file: four processes writing 100 keys each at once
    leave all 400 (a read-modify-write without the lock lost keys: a collective probe then measured again)."""
    import json
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_put_many, args=(str(tmp_path), w, start)) for w in range(4)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    cache = json.loads((tmp_path / "probes.json").read_text())
    assert cache == {f"w{w}|{i}": float(i) for w in range(4) for i in range(100)}


def test_a_probe_cached_on_another_cpu_model_is_not_read_back(monkeypatch, tmp_path):
    """The cache directory travels (a shared home, a copied ~/.cache): a value probed with another CPU model,
    thread count or torch version must be probed again, not read as this host's."""
    monkeypatch.setenv("N00BGPT_CACHE_DIR", str(tmp_path))
    rates = iter([7e9, 3e9, 4e9, 5e9])
    monkeypatch.setattr(peak_flops, "probe_peak_flops", lambda d, t: peak_flops.Probe(next(rates), 0.01, 0.99))
    monkeypatch.setattr(probe, "cpu_model", lambda: "Intel(R) Xeon(R) Platinum 8481C")
    assert peak_flops.get_peak_flops(torch.device("cpu"), "fp32")[:2] == (7e9, "probe:measured matmul fp32")
    monkeypatch.setattr(probe, "cpu_model", lambda: "AMD EPYC 9B14")
    assert peak_flops.get_peak_flops(torch.device("cpu"), "fp32")[:2] == (3e9, "probe:measured matmul fp32")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert peak_flops.get_peak_flops(torch.device("cpu"), "fp32")[0] == 4e9
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert peak_flops.get_peak_flops(torch.device("cpu"), "fp32")[0] == 5e9
    monkeypatch.undo()  # back to the AMD model, this torch and thread count: that value, from the cache
    monkeypatch.setenv("N00BGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(probe, "cpu_model", lambda: "AMD EPYC 9B14")
    assert peak_flops.get_peak_flops(torch.device("cpu"), "fp32")[:2] == (3e9, f"probe:cached matmul fp32 "
                                                                              f"({tmp_path / 'probes.json'})")


@pytest.mark.dist
def test_probe_reports_its_own_cpu_share_under_load():
    """Real probes: alone, the probe's CPU share is near 1; with the probe thread forced to share its core
    with a spinning process (both pinned to one core), it drops clearly -- the contention signal."""
    import os
    import subprocess
    import sys

    core = sorted(os.sched_getaffinity(0))[0]
    old = os.sched_getaffinity(0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        os.sched_setaffinity(0, {core})
        alone = peak_flops.probe_peak_flops(torch.device("cpu"), "fp32", n=256, repeats=5, min_time_s=0.05)
        spinner = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{core}}})\n"
                                    "while True: pass"])
        try:
            import time
            time.sleep(0.3)
            shared = peak_flops.probe_peak_flops(torch.device("cpu"), "fp32", n=256, repeats=5, min_time_s=0.05)
        finally:
            spinner.kill()
            spinner.wait()
    finally:
        os.sched_setaffinity(0, old)
        torch.set_num_threads(threads)
    assert shared.cpu_util < 0.75 and shared.contended
    assert alone.cpu_util > shared.cpu_util


class FakeNvml(types.SimpleNamespace):
    """pynvml's API surface as bench/measure/nvml.py uses it; energy counter in mJ."""

    def __init__(self, energy=True):
        super().__init__()
        self.energy_mj = 1_000_000
        self.has_energy = energy

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, i):
        return f"gpu{i}"

    def nvmlDeviceGetUtilizationRates(self, h):
        return types.SimpleNamespace(gpu=80)

    def nvmlDeviceGetPowerUsage(self, h):
        return 300_000  # mW

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(used=5 * 2**30)

    NVML_CLOCK_SM = 1
    nvmlClocksEventReasonGpuIdle = 0x1
    nvmlClocksEventReasonSwPowerCap = 0x4
    nvmlClocksEventReasonHwSlowdown = 0x8

    def nvmlDeviceGetClockInfo(self, h, which):
        assert which == self.NVML_CLOCK_SM
        self.clock = getattr(self, "clock", 1990) - 10  # 1980, 1970, ... MHz
        return self.clock

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        self.reads = getattr(self, "reads", 0) + 1
        return 0x1 | (0x4 if self.reads == 2 else 0)  # idle always, a power cap in one sample

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if not self.has_energy:
            raise RuntimeError("not supported")
        self.energy_mj += 30_000  # +30 J per read
        return self.energy_mj


@pytest.mark.parametrize("energy_counter", [True, False])
def test_nvml_sampler_with_fake_driver(monkeypatch, energy_counter):
    fake = FakeNvml(energy_counter)
    monkeypatch.setattr(nvml, "_load_pynvml", lambda: fake)
    sampler = nvml.NvmlSampler(0, interval_s=0.01)
    sampler.start()
    import time

    time.sleep(0.1)
    stats = sampler.stop()
    assert stats["gpu_util_pct"] == 80 and stats["gpu_power_w"] == 300 and stats["gpu_mem_used_bytes"] == 5 * 2**30
    span = sampler.samples[-1][0] - sampler.samples[0][0]
    expected = 30.0 if energy_counter else 300 * span  # counter difference, or integrated power
    assert stats["gpu_energy_j"] == pytest.approx(expected, rel=1e-6)
    clocks = [1990 - 10 * (i + 1) for i in range(len(sampler.samples))]
    assert stats["gpu_sm_clock_mhz"] == pytest.approx(sum(clocks) / len(clocks))
    assert stats["gpu_sm_clock_min_mhz"] == min(clocks)
    assert stats["gpu_throttle_reasons"] == ["SwPowerCap"]  # idle left out; the one power-cap sample kept
    other = {**stats, "gpu_util_pct": 40, "gpu_sm_clock_min_mhz": 1000, "gpu_throttle_reasons": ["HwSlowdown"]}
    combined = combine_ranks([stats, other])  # the record's rules: energy summed, util mean, clock min, union
    assert combined["gpu_energy_j"] == pytest.approx(2 * expected)
    assert combined["gpu_util_pct"] == 60 and combined["gpu_sm_clock_min_mhz"] == 1000
    assert combined["gpu_mem_used_bytes"] == 5 * 2**30
    assert combined["gpu_throttle_reasons"] == ["HwSlowdown", "SwPowerCap"]
    assert nvml.energy_per_token(combined["gpu_energy_j"], 1000) == pytest.approx(2 * expected / 1000)


def test_nvml_absent_on_cpu_is_not_an_error():
    sampler = nvml.NvmlSampler(None)
    sampler.start()
    assert not sampler.available
    assert all(v is None for v in sampler.stop().values())
    assert combine_ranks([sampler.stop()])["gpu_energy_j"] is None
    assert nvml.energy_per_token(None, 10) is None


def test_every_rank_measured_column_has_a_rule_and_combining_follows_it():
    """The cross-rank rules come from the record: the worst rank's memory and step time, the most starved
    rank's cpu_util, a list for per-rank memory, rank 0 for what every rank shares."""
    ranks = [{"peak_mem_bytes": 5, "cpu_util": 0.9, "steal_pct": None, "peak_mem_bytes_per_rank": 5, "params": 7},
             {"peak_mem_bytes": 9, "cpu_util": 0.4, "steal_pct": 2.0, "peak_mem_bytes_per_rank": 9, "params": 7}]
    assert combine_ranks(ranks) == {"peak_mem_bytes": 9, "cpu_util": 0.4, "steal_pct": 2.0,
                                    "peak_mem_bytes_per_rank": [5, 9], "params": 7}
    assert rule_of("first_step_time_s") == "max" and rule_of("loss") == "mean"
    with pytest.raises(ValueError, match="not combined from ranks"):
        rule_of("model")  # a setup column
    with pytest.raises(KeyError):
        rule_of("no_such_column")


# Every rank-measured column's rule, written out here (not read from reports/record.py): changing a column's rule
# means changing this table too, on purpose.
PINNED_RULES = {
    "max": ["peak_mem_bytes", "peak_reserved_bytes", "first_step_time_s", "gpu_mem_used_bytes", "host_load_per_core",
            "steal_pct", "mem_baseline_bytes", "comm_bytes_per_step", "compute_time_s", "comm_time_s",
            "exposed_comm_s", "matmul_time_s"],
    "min": ["gpu_sm_clock_min_mhz", "cpu_util", "overlap_pct"],
    "mean": ["loss", "gpu_util_pct", "gpu_power_w", "gpu_sm_clock_mhz"],
    "sum": ["gpu_energy_j"],
    "union": ["gpu_throttle_reasons"],
    "per_rank": ["peak_mem_bytes_per_rank"],
}


def test_each_columns_cross_rank_rule_is_pinned_and_a_zero_is_a_value():
    """Three ranks give each column chosen values, one of them 0 (a real reading: an idle core's cpu_util, a GPU
    that drew no energy) and one rank nothing: every column comes out by its pinned rule, with the 0 counted."""
    values = [3.0, 0.0, None]  # rank 0, rank 1, rank 2 (could not read)
    expect = {"max": 3.0, "min": 0.0, "mean": 1.5, "sum": 3.0}
    for rule, columns in PINNED_RULES.items():
        for column in columns:
            assert rule_of(column) == rule, column
            if rule == "union":
                ranks = [{column: ["a"]}, {column: []}, {column: ["b", "a"]}]
                assert combine_ranks(ranks)[column] == ["a", "b"]
            elif rule == "per_rank":
                assert combine_ranks([{column: v} for v in values])[column] == values
            else:
                assert combine_ranks([{column: v} for v in values])[column] == expect[rule], column
    assert combine_ranks([{"cpu_util": None}, {"cpu_util": None}])["cpu_util"] is None  # no rank read it
    assert combine_ranks([{"params": 7}, {"params": 0}])["params"] == 7  # rank 0's view


def test_the_probe_reports_its_best_trial_and_their_spread(monkeypatch):
    """A scripted clock: warm-up and sizing take 1 s, then seven trials of 1, 2, 1, 4, 1, 1.25, 1 s. The peak
    is the fastest trial (2 n^3 / 1 s), never an average that lets a contended trial in; spread = 1 - 1/4."""
    durations = [1, 1, 1, 2, 1, 4, 1, 1.25, 1]
    clock = {"t": 0.0, "calls": 0}
    steps = []
    for d in durations[:2]:
        steps += [0.0, d]
    steps.append(0.0)  # the wall-clock mark before the trials
    for d in durations[2:]:
        steps += [0.0, d]
    steps.append(0.0)

    def perf_counter():
        clock["t"] += steps[clock["calls"]] if clock["calls"] < len(steps) else 0.0
        clock["calls"] += 1
        return clock["t"]

    monkeypatch.setattr(peak_flops.time, "perf_counter", perf_counter)
    p = peak_flops.probe_peak_flops(torch.device("cpu"), "fp32", n=8, repeats=7, min_time_s=0.5)
    assert p.flops == pytest.approx(2 * 8**3 / 1.0)
    assert p.spread == pytest.approx(0.75)
