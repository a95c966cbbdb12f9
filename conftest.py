"""Shared test helpers: real multi-process gloo runs on CPU.

``run_ranks(fn, world_size, tmp_path, *args)`` starts ``world_size`` processes, each with a
gloo process group over a FileStore in ``tmp_path``, calls ``fn(rank, world_size, *args)``
and returns every rank's return value (pickled through ``tmp_path``). A rank's exception
fails the test with that rank's traceback; the process group is always destroyed.

The ranks fork from a forkserver that imported torch and the harness once per test session (``_start``):
a pair of fresh interpreters importing them took ~4 s here, a fork ~0.03 s, for ~30 multi-rank tests. Each
rank then takes the test's environment and working directory as a spawned one would (``_worker``), and runs
one thread, as before.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import pickle
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Test workers share the cores (make test: two workers on two): each trains in-process on one thread, as the
# ranks do, so the two never put four OpenMP threads on two cores. Oversubscribed, OpenMP's spinning threads
# stalled: llama-tiny's 2 x 10 steps in tests/test_hf.py took 24.8 s beside the other worker, 0.9 s alone.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    torch.set_num_threads(1)

# Probes refuse to cache a value measured while other work took over a fifth of the host
# (bench/measure/contention.py). Tests of caching must hold whatever shares the CI host, so the suite caches
# every probe; the tests of that rule pass their own limit.
os.environ.setdefault("N00BGPT_NEIGHBOURS_MAX", "1")

# The runs the tests start read their matmul peak from a probe cache of this test process's own (seeded with a
# value far above any CPU's: 10 TFLOP/s per thread), not from the developer's ~/.cache, and do not probe it beside
# the other test worker: a peak probed low there made MFU exceed 1 and a run that the test expects ok came out
# suspect (exit 3). What a probe measures and caches is tested with caches of the tests' own (test_metrics.py,
# test_probes.py, test_engines.py); a test that forces the suspect path sets its own peak (tests/helpers).
if "N00BGPT_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    from tests.helpers import cache_peak

    _cache = tempfile.mkdtemp(prefix="n00bgpt-test-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(cache_peak(Path(_cache), 1e13))


# imported once, in the forkserver the ranks fork from (none of them reads the environment at import)
PRELOAD = ["torch", "torch.distributed", "torch.distributed.tensor", "torch.distributed.fsdp", "bench.harness.loop",
           "tests.helpers.training"]


def _start() -> None:
    """Start the forkserver (once), with one OpenMP thread: its import of torch must create no thread pool
    that a fork would copy half of."""
    multiprocessing.set_forkserver_preload(PRELOAD)
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if before is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = before


def _worker(rank: int, world_size: int, tmp: str, fn, args, env: dict, cwd: str) -> None:
    os.environ.clear()  # the test's environment and directory now, not the forkserver's from its start
    os.environ.update(env)
    os.chdir(cwd)
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    out = Path(tmp) / f"rank{rank}.pkl"
    store = dist.FileStore(str(Path(tmp) / "store"), world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        result = ("ok", fn(rank, world_size, *args))
    except BaseException:
        result = ("error", traceback.format_exc())
    finally:
        dist.destroy_process_group()
    out.write_bytes(pickle.dumps(result))
    # Skip interpreter teardown: gloo's worker threads can abort the process during finalization
    # ("terminate called without an active exception"), after the result is already safe on disk.
    os._exit(0)


def run_ranks(fn, world_size: int, tmp_path: Path, *args) -> list:
    tmp = Path(tmp_path) / f"ranks-{os.getpid()}-{len(list(Path(tmp_path).iterdir()))}"
    tmp.mkdir()
    _start()
    mp.start_processes(_worker, args=(world_size, str(tmp), fn, args, dict(os.environ), os.getcwd()),
                       nprocs=world_size, join=True, start_method="forkserver")
    results = []
    for rank in range(world_size):
        status, value = pickle.loads((tmp / f"rank{rank}.pkl").read_bytes())
        if status != "ok":
            pytest.fail(f"rank {rank} failed:\n{value}")
        results.append(value)
    return results


@pytest.fixture
def ranks(tmp_path):
    """``ranks(fn, *args, world_size=2)`` -> list of per-rank results."""
    def go(fn, *args, world_size: int = 2):
        return run_ranks(fn, world_size, tmp_path, *args)
    return go


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """Path of a text file holding tests.helpers.CORPUS_TEXT (one per test session)."""
    from tests.helpers import CORPUS_TEXT

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS_TEXT)
    return str(path)


# ---------------------------------------------------------------------------------------------- test tiers
# Every test belongs to exactly one tier (docs/testing.md has what each holds and how long it takes): its own
# marker, or else its module's ``pytestmark``. ``pytest --tier=unit`` (make test-fast) runs one tier,
# ``--tier=dist,e2e`` several; without --tier every test runs (make test, CI).
TIERS = ("unit", "dist", "e2e", "browser")


def pytest_addoption(parser):
    parser.addoption("--tier", default="", help=f"run only these tiers (comma-separated): {', '.join(TIERS)}")


def tier_of(item) -> str | None:
    """The closest tier marker: the test's own, else its class's, else its module's."""
    return next((m.name for m in item.iter_markers() if m.name in TIERS), None)


def pytest_collection_modifyitems(config, items):
    missing = [item.nodeid for item in items if tier_of(item) is None]
    if missing:
        raise pytest.UsageError(f"tests without a tier marker ({', '.join(TIERS)}): {', '.join(missing[:5])}")
    wanted = [t.strip() for t in config.getoption("--tier").split(",") if t.strip()]
    bad = [t for t in wanted if t not in TIERS]
    if bad:
        raise pytest.UsageError(f"--tier={','.join(bad)} is not a tier; valid: {', '.join(TIERS)}")
    if wanted:
        keep = [item for item in items if tier_of(item) in wanted]
        config.hook.pytest_deselected(items=[item for item in items if tier_of(item) not in wanted])
        items[:] = keep
    # The slow tiers first (a stable sort: files stay together): with several workers (make test), the long files
    # start early and the short unit files fill the end, instead of one long file running alone at the end.
    items.sort(key=lambda item: ("e2e", "dist", "browser", "unit").index(tier_of(item)))
