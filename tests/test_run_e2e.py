"""End to end through the real entry point: torchrun with 2 CPU processes, rows checked against
numbers recomputed independently from the per-step log and the model's FLOP accounting."""

from __future__ import annotations

import json

import pytest

from models import get_config, train_flops_per_token
from reports import load, load_steps
from reports.record import REQUIRED_COLUMNS
from strategies.ac import recompute_flops_per_token
from tests.helpers import cache_peak, run_cli

pytestmark = pytest.mark.e2e

FAST = ["model=tiny", "steps=4", "warmup=1", "micro_batch=2", "seq_len=32", "log_every=2"]


def only_row(results_dir):
    df = load(results_dir)
    assert len(df) == 1, df
    return df.iloc[0]


@pytest.mark.parametrize(
    "strategy,extra,expect",
    [
        ("fsdp", [], "fsdp"),
        ("ddp", ["strategy.ac=op"], "ddp+ac(op)"),
        ("fsdp_noreshard", ["strategy.ac=selective", "strategy.ac_every=3", "grad_accum=2"],
         "fsdp(no-reshard)+ac(selective/3)"),
        ("fsdp_ac", [], "fsdp+ac(full)"),
    ],
)
def test_torchrun_two_ranks_writes_a_true_row(tmp_path, strategy, extra, expect):
    res = run_cli([f"strategy={strategy}", *FAST, *extra, f"results_dir={tmp_path}"], nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    row = only_row(tmp_path)
    assert set(REQUIRED_COLUMNS) <= set(row.index)
    assert row.status == "ok" and row.error is None
    assert row.strategy == expect and row.world_size == 2 and row.nnodes == 1 and row.device == "cpu"
    ga = 2 if "grad_accum=2" in extra else 1
    assert row.grad_accum == ga and row.global_batch_tokens == 2 * ga * 2 * 32
    # Throughput recomputed from the per-step log (max over ranks per step, written by rank 0).
    steps = load_steps(tmp_path, row.run_id)
    assert list(steps.phase) == ["warmup"] + ["timed"] * 4
    timed = steps[steps.phase == "timed"].step_time_s
    assert row.tokens_per_sec == pytest.approx(4 * row.global_batch_tokens / timed.sum(), rel=1e-9)
    assert row.tokens_per_sec_per_device == pytest.approx(row.tokens_per_sec / 2, rel=1e-9)
    assert row.step_time_median_s == pytest.approx(timed.median(), rel=1e-9)
    assert row.step_time_p10_s <= row.step_time_median_s <= row.step_time_p90_s
    # MFU from the model's FLOP accounting and the recorded peak.
    cfg = get_config("tiny")
    assert row.flops_per_token == train_flops_per_token(cfg, 32)
    assert row.mfu == pytest.approx(row.flops_per_token * row.tokens_per_sec_per_device / row.peak_flops, rel=1e-9)
    s = json.loads(json.dumps(row.config))["strategy"]
    rc = recompute_flops_per_token(cfg, 32, s["ac"], s["ac_every"])
    assert row.hfu == pytest.approx(row.mfu * (row.flops_per_token + rc) / row.flops_per_token, rel=1e-9)
    assert (row.hfu > row.mfu) == (rc > 0)
    assert row.peak_flops_source.startswith("probe:")
    assert row.peak_mem_bytes > 50 * 2**20 and row.peak_reserved_bytes is None
    assert row.loss == pytest.approx(steps.loss.iloc[-1])
    assert row.config["model"]["name"] == "tiny" and row.torch_version
    assert str(tmp_path / "runs.jsonl") in res.stdout  # the summary names the file
    assert "step 2/5" in res.stdout  # progress line


def test_single_process_compile_and_bf16(tmp_path):
    """The CLI without torchrun; per-block compile; a CPU bf16 run warns but runs (tiny shapes only)."""
    res = run_cli(["strategy=compile", "model=tiny", "model.n_layer=2", "steps=2", "warmup=1", "micro_batch=1",
                   "seq_len=16", "strategy.amp=bf16", f"results_dir={tmp_path}"], timeout=600)
    row = only_row(tmp_path)
    # The bf16 matmul probe runs aten's slow CPU bf16 path, while the compiled blocks may compute faster than
    # that "peak": then mfu > 1, which must give status suspect and exit code 3, never ok.
    impossible = row.mfu > 1 or row.hfu > 1
    assert (row.status, res.returncode) == (("suspect", 3) if impossible else ("ok", 0)), res.stderr[-3000:]
    assert not impossible or "cannot be true" in row.error
    assert row.strategy == "single+bf16+compile" and row["dtype"] == "bf16" and row.world_size == 1
    assert row.first_step_time_s > row.step_time_median_s  # compile happens in the first step
    assert "slower than fp32" in res.stderr


def test_an_impossible_mfu_is_suspect_with_exit_3_never_ok(tmp_path):
    """Forced, not waited for (a contended host once made it happen by chance): the cached matmul peak this run
    will read is set to 1 MFLOP/s, far below what any CPU does, so its MFU exceeds 1; the row must say suspect
    with the reason, the run exit 3, and the summary line say SUSPECT."""
    env = cache_peak(tmp_path / "cache", 1e6)
    res = run_cli([*FAST, f"results_dir={tmp_path / 'r'}"], env=env)
    row = only_row(tmp_path / "r")
    assert (res.returncode, row.status) == (3, "suspect"), res.stderr[-2000:]
    assert row.peak_flops == 1e6 and row.mfu > 1 and "cannot be true" in row.error
    assert "SUSPECT" in res.stdout


def test_rank_failure_writes_one_error_row_and_exits_nonzero(tmp_path):
    res = run_cli(["strategy=ddp", *FAST, "debug_fail_step=2", "debug_fail_rank=1", f"results_dir={tmp_path}"],
                  nproc=2)
    assert res.returncode != 0
    row = only_row(tmp_path)  # exactly one row, readable
    assert row.status == "error" and "rank 1" in row.error and "InjectedFailure" in row.error
    assert row.tokens_per_sec is None or row.tokens_per_sec != row.tokens_per_sec  # None/NaN: nothing measured


@pytest.mark.skipif(open("/proc/sys/vm/overcommit_memory").read().strip() == "1",
                    reason="with overcommit 'always' the kernel grants the allocation and the OOM killer would act")
def test_out_of_memory_writes_an_oom_row(tmp_path):
    """A model far larger than this machine's memory (a 512 GB embedding): the allocator refuses it."""
    res = run_cli(["strategy=single", *FAST, "model.vocab_size=1000000000", f"results_dir={tmp_path}"])
    assert res.returncode == 1
    row = only_row(tmp_path)
    assert row.status == "oom" and "allocate" in row.error


def test_nan_loss_stops_with_status_nan(tmp_path):
    res = run_cli(["strategy=single", *FAST, "steps=20", "debug_nan_step=2", f"results_dir={tmp_path}"])
    assert res.returncode == 1
    row = only_row(tmp_path)
    assert row.status == "nan" and "non-finite" in row.error
    assert len(load_steps(tmp_path, row.run_id)) == 2 * 2  # stopped at the first check after step 2


# Invalid configurations (exit code 2, one line, no row): tests/test_exit_codes.py.


def test_real_text_from_a_folder_through_the_cli(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("to be or not to be, that is the question. " * 200)
    (corpus / "b.md").write_text("whether 'tis nobler in the mind to suffer. " * 200)
    res = run_cli(["strategy=ddp", "model=tiny", "steps=30", "warmup=1", "micro_batch=4", "seq_len=64", "lr=3e-3",
                   "log_every=0", f"data={corpus}", f"results_dir={tmp_path / 'r'}"], nproc=2)
    assert res.returncode == 0, res.stderr[-2000:]
    row = only_row(tmp_path / "r")
    steps = load_steps(tmp_path / "r", row.run_id)
    assert row.data == str(corpus) and row.status == "ok"
    assert steps.loss.iloc[-1] < 0.6 * steps.loss.iloc[0]  # real, repetitive text is learnable
