"""The exit-code contract, case by case: every invalid configuration stops before any training with exit
code 2 and one line naming the bad value and what is allowed, writes no row, and leaves the table
loadable. Under torchrun (whose own exit code is 1 whatever its workers return) exactly one line is
printed, by rank 0, no rank prints a traceback, and no row is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.harness.table import append_row
from reports import load
from reports.record import REQUIRED_COLUMNS
from tests.helpers import ROOT, run_cli, run_cli_forked

pytestmark = pytest.mark.e2e

OK = ["model=tiny", "steps=2", "warmup=0", "micro_batch=2", "seq_len=32", "log_every=0", "device=cpu"]
PREFIX = "[n00bGPT] error: invalid configuration: "


def cases(tmp):
    """(overrides, expected text in the one-line message). ``{tmp}`` paths are made by ``setup``."""
    return [
        (["model=nope"], "model='nope' is not a model preset; valid: gpt2-large"),
        (["strategy=nope"], "strategy='nope' is not a strategy preset; valid: ac, bf16"),
        (["model="], "model='' is not a model preset"),
        (["steps=abc"], "override steps=abc: Value 'abc' of type 'str' could not be converted to Integer"),
        (["lr=abc"], "override lr=abc: Value 'abc' of type 'str' could not be converted to Float"),
        (["measure_comm=maybe"], "override measure_comm=maybe: Value 'maybe' is not a valid bool"),
        (["model.n_layer=abc"], "override model.n_layer=abc: Value 'abc'"),
        (["steps=[1"], "cannot parse override 'steps=[1'"),
        (["foo=1"], "unknown key 'foo'; valid top-level keys: backend"),
        (["model.foo=1"], "unknown key 'model.foo'; valid model keys:"),
        (["strategy.foo=1"], "unknown key 'strategy.foo'; valid strategy keys:"),
        (["lr=-1"], "lr=-1.0 is invalid: must be a finite number > 0"),
        (["lr=0"], "lr=0.0 is invalid: must be a finite number > 0"),
        (["lr=nan"], "lr=nan is invalid"),
        (["lr=inf"], "lr=inf is invalid"),
        (["lr_schedule=step"], "lr_schedule='step' is invalid: must be one of constant, cosine, linear"),
        (["lr_warmup=-1"], "lr_warmup=-1 is invalid: must be between 0 and 10,000,000 steps"),
        (["lr_min_ratio=1.5"], "lr_min_ratio=1.5 is invalid: must be a fraction of lr between 0 and 1"),
        (["eval_every=-1"], "eval_every=-1 is invalid: must be >= 0"),
        (["eval_every=1", "eval_batches=0"], "eval_batches=0 is invalid: must be >= 1"),
        (["target_loss=2"], "target_loss=2.0 is invalid: needs eval_every > 0"),
        (["eval_every=1", "target_loss=-1"], "target_loss=-1.0 is invalid: must be a finite number >= 0"),
        (["eval_every=1", "target_loss=nan"], "target_loss=nan is invalid"),
        (["eval_every=1", "target_loss=2", "max_time_s=-1"], "max_time_s=-1.0 is invalid"),
        (["max_time_s=5"], "max_time_s=5.0 is invalid: needs target_loss > 0"),
        ([f"data={tmp}/two_windows.txt", "eval_every=1"],
         "with 10% held out for eval_every the 1 left cannot fill micro_batch=2"),
        (["steps=0"], "steps=0 is invalid: must be >= 1"),
        (["steps=-5"], "steps=-5 is invalid: must be >= 1"),
        (["micro_batch=0"], "micro_batch=0 is invalid: must be >= 1"),
        (["grad_accum=0"], "grad_accum=0 is invalid: must be >= 1"),
        (["warmup=-1"], "warmup=-1 is invalid: must be >= 0"),
        (["seq_len=-1"], "seq_len=-1 is invalid: must be >= 0"),
        (["seq_len=100000"], "seq_len=100000 is invalid: longer than model 'tiny'"),
        (["global_batch=-2"], "global_batch=-2 is invalid: must be >= 0"),
        (["global_batch=3"], "global_batch=3 is not divisible by micro_batch=2"),
        (["log_every=-1"], "log_every=-1 is invalid: must be >= 0"),
        (["timeout_s=0"], "timeout_s=0 is invalid: must be >= 1"),
        (["timeout_s=-3"], "timeout_s=-3 is invalid: must be >= 1"),
        (["device=tpu"], "device='tpu' is invalid: valid values: auto, cpu, cuda"),
        (["device=cuda"], "device='cuda' but no CUDA device is available"),
        (["backend=mpi"], "backend='mpi' is invalid: valid values: auto, nccl, gloo"),
        ([f"results_dir={tmp}/afile"], "afile' is invalid: it exists and is not a folder"),
        ([f"results_dir={tmp}/afile/sub"], "afile is not a folder"),
        ([f"results_dir={tmp}/tablefolder"], "holds a folder named runs.jsonl"),
        (["data=/no/such/path"], "data='/no/such/path' is invalid: no such file or folder"),
        ([f"data={tmp}/empty.txt"], "holds 0 tokens"),
        ([f"data={tmp}/emptydir"], "holds 0 tokens"),
        ([f"data={tmp}/small.txt"],
         "holds 10 tokens (text, tokens from bytes); one micro-batch of micro_batch=2 windows of seq_len=32"),
        ([f"data={tmp}/big.txt", "model.vocab_size=100"], "but the model's vocab_size=100: ids must be below it"),
        (["run_id=a/b"], "run_id='a/b' is invalid: use letters, digits"),
        (["run_id=../x"], "run_id='../x' is invalid"),
        (["run_id=seeded"], "run_id='seeded' is invalid: already in"),
        ([f"profile_dir={tmp}/afile"], "afile' is invalid: it exists and is not a folder"),
        (["strategy.dp=zero"], "strategy.dp='zero' is invalid; valid values: none, ddp, fsdp"),
        (["strategy.amp=fp8"], "strategy.amp='fp8' is invalid; valid values:"),
        (["strategy.ac=some"], "strategy.ac='some' is invalid; valid values:"),
        (["strategy.ac_every=0"], "strategy.ac_every=0 is invalid; must be >= 1"),
        (["strategy.amp=fp16"], "amp=fp16 needs a CUDA device"),
        (["strategy.dp=fsdp", "strategy.compile=true", "strategy.compile_mode=model"],
         "compile_mode='model' with dp=fsdp is not supported"),
        (["model.n_layer=0"], "n_layer=0 is invalid: must be a positive integer"),
        (["model.n_head=5"], "n_embd=128 is invalid: must be divisible by n_head=5"),
        (["model.n_embd=130"], "n_embd=130 is invalid: must be divisible by n_head=4"),
        (["debug_slow_pct=-1"], "debug_slow_pct=-1.0 is invalid: must be a finite number >= 0"),
        (["debug_fail_rank=-2"], "debug_fail_rank=-2 is invalid"),
        (["debug_delay_s=-1"], "debug_delay_s=-1.0 is invalid"),
        # values beyond what the code can hold or finish, and debug options that cannot happen
        (["seed=99999999999999999999"], "seed=99999999999999999999 is invalid: must be within 0 .. 2**63-1"),
        (["seed=-1"], "seed=-1 is invalid: must be within 0"),
        (["steps=99999999999999999999"], "steps=99999999999999999999 is invalid: must be <= 10,000,000"),
        (["warmup=100000000"], "warmup=100000000 is invalid: must be <= 10,000,000"),
        (["debug_nan_step=-5"], "debug_nan_step=-5 is invalid: must be a step >= 0, or -1 for never"),
        (["debug_hang_step=-7"], "debug_hang_step=-7 is invalid"),
        (["debug_fail_step=-2"], "debug_fail_step=-2 is invalid"),
        (["debug_fail_rank=5"], "debug_fail_rank=5 is invalid: this run has ranks 0..0"),
        (["backend=nccl"], "backend='nccl' needs CUDA devices"),
        # names that are not plain file names, or too long for one
        (["run_id=.."], "run_id='..' is invalid: use letters, digits, '.', '_' and '-' only, not only dots"),
        (["run_id=."], "run_id='.' is invalid"),
        ([f"run_id={'a' * 201}"], "201 characters; at most 200"),
        (["run_id=claimed"], "run_id='claimed' is already claimed by another run"),
        # folders the run cannot write into, found by writing (before any work)
        (["results_dir="], "results_dir='' is invalid: empty: name a folder"),
        (["results_dir=/proc/n00bgpt-results"], "cannot create a file in /proc"),
        ([f"results_dir={tmp}/stepsfile"], "stepsfile/steps exists and is not a folder"),
        ([f"results_dir={tmp}/claimsfile"], "claimsfile/.claims exists and is not a folder"),
        (["profile_dir=/proc/n00bgpt/profile"], "profile_dir='/proc/n00bgpt/profile' is invalid: cannot create a file"),
        # a checkpoint folder whose config.json is fine but whose weights are missing or not weights
        ([f"model.hf_path={tmp}/hf_noweights"], "hf_noweights': no model.safetensors there"),
        ([f"model.hf_path={tmp}/hf_garbage"], "hf_garbage/model.safetensors: not a safetensors file"),
        ([f"model.hf_path={tmp}/hf_truncated"], "hf_truncated/model.safetensors: truncated: its header places"),
        ([f"model.hf_path={tmp}/hf_badjson"], "hf_badjson/config.json: not a readable JSON file"),
        ([f"model.hf_path={tmp}/hf_nokey"], "hf_nokey/config.json: lacks the key 'n_layer' that a gpt2 config has"),
    ]


@pytest.fixture
def table(tmp_path):
    """A results folder holding one row ('seeded'), and the odd files the cases point at."""
    res = tmp_path / "res"
    row = {c: None for c in REQUIRED_COLUMNS}
    row.update(run_id="seeded", model="tiny", strategy="single", status="ok")
    append_row(res, row)
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "tablefolder" / "runs.jsonl").mkdir(parents=True)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "small.txt").write_text("0123456789")
    (tmp_path / "two_windows.txt").write_text("y" * 65)  # 2 windows of 32: none left to train on beside a held-out one
    (tmp_path / "big.txt").write_text("x" * 5000)
    claims = tmp_path / "res" / ".claims" / "claimed"  # a run that claimed its id and never wrote a row
    claims.mkdir(parents=True)
    (claims / "owner").write_text("otherhost 12345\n")
    for name, sub in (("stepsfile", "steps"), ("claimsfile", ".claims")):
        (tmp_path / name).mkdir()
        (tmp_path / name / sub).write_text("a file where the run makes a folder")
    config = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": 256, "n_positions": 64}
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    weights = {"hf_noweights": None, "hf_garbage": b"\x00\x01not a safetensors file",
               "hf_truncated": len(header).to_bytes(8, "little") + header + b"\x00" * 8}
    for name, blob in weights.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        if blob is not None:
            (tmp_path / name / "model.safetensors").write_bytes(blob)
    for name, text in (("hf_badjson", '{"model_type": "gpt2", '), ("hf_nokey", '{"model_type": "gpt2"}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
    return res


def test_every_invalid_configuration_exits_2_with_one_line_and_no_row(tmp_path, table):
    table_before = (table / "runs.jsonl").read_bytes()
    all_cases = cases(tmp_path)
    assert len(all_cases) >= 40
    argvs = [[*OK, f"results_dir={table}", *overrides] for overrides, _ in all_cases]
    # every case in a forked process; the first two also as a user runs them (a fresh interpreter), which must
    # give the same exit code and output as the fork
    results = run_cli_forked(argvs, tmp_path)
    for argv, forked in zip(argvs[:2], results[:2]):
        fresh = run_cli(argv, timeout=120)
        assert (fresh.returncode, fresh.stdout, fresh.stderr) == (forked.returncode, forked.stdout, forked.stderr)

    problems = []
    for (overrides, expect), res in zip(all_cases, results):
        lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
        why = None
        if res.returncode != 2:
            why = f"exit {res.returncode}"
        elif len(lines) != 1 or not lines[0].startswith(PREFIX):
            why = f"{len(lines)} lines"
        elif expect not in lines[0]:
            why = f"message lacks {expect!r}"
        if why:
            problems.append(f"{overrides}: {why}: {(res.stdout + res.stderr)[-600:]}")
    assert not problems, "\n".join(problems)
    assert (table / "runs.jsonl").read_bytes() == table_before  # no row written, nothing torn
    assert list(load(table).run_id) == ["seeded"]
    assert (tmp_path / "tablefolder" / "runs.jsonl").is_dir() and (tmp_path / "afile").read_text() == "not a folder"
    # nothing created where a refused run would have written (the checks write probe files and remove them)
    assert sorted(p.name for p in table.iterdir()) == [".claims", "runs.jsonl"]
    assert [p.name for p in (table / ".claims").iterdir()] == ["claimed"]


def test_two_runs_started_at_once_with_one_id_leave_one_row(tmp_path):
    """The real command line (the 20-of-20 race is tests/test_results.py's, on the same two calls): one run claims
    the id and writes its row, the other stops with exit 2 and one line, whenever it starts."""
    argv = [sys.executable, "bench/run.py", *OK, f"results_dir={tmp_path}", "run_id=twin"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], outs
    refused = outs[codes.index(2)][1].strip().splitlines()
    assert len(refused) == 1 and refused[0].startswith(PREFIX) and "run_id='twin' is" in refused[0]
    assert list(load(tmp_path).run_id) == ["twin"]


@pytest.mark.parametrize("overrides, expect", [
    (["model=nope"], "model='nope' is not a model preset"),
    (["lr=-1"], "lr=-1.0 is invalid"),
    (["strategy=single"], "strategy dp='none' runs one model replica (one process) but world_size=2"),
])
def test_under_torchrun_one_rank_prints_one_line_and_no_row_is_written(tmp_path, table, overrides, expect):
    res = run_cli([*OK, "strategy=ddp", f"results_dir={table}", *overrides], nproc=2, timeout=180)
    out = res.stdout + res.stderr
    assert res.returncode == 1  # torchrun's own code for failed workers (docs/running.md: "Exit codes")
    assert sum(PREFIX in ln for ln in out.splitlines()) == 1 and expect in out, out[-3000:]
    assert "exitcode  : 2" in out  # torchrun's summary shows the workers' code
    assert "bench/run.py\", line" not in out  # no rank printed a traceback
    assert list(load(table).run_id) == ["seeded"]


@pytest.mark.parametrize("args, expect", [
    (["model=gpt2-small", "seq_len=-1000"], "seq_len=-1000 is invalid; must be >= 0"),
    (["model=gpt2-small", "device_memory_gib=-5"], "device_memory_gib=-5.0 is invalid"),
    (["model=gpt2-small", "device_memory_gib=nan"], "device_memory_gib=nan is invalid"),
    (["model=gpt2-small", "world_size=0"], "world_size=0 is invalid; must be within 1 .. 1,048,576"),
    (["model=gpt2-small", "world_size=100000000000000000000"], "world_size=100000000000000000000 is invalid"),
    (["model=gpt9"], "model='gpt9' is not a preset; valid: tiny"),
])
def test_planner_refuses_invalid_values(args, expect):
    res = subprocess.run([sys.executable, "-m", "bench.plan", *args], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and res.stdout == ""
    prefix = "python -m bench.plan: error: "
    assert res.stderr.strip().splitlines() == [f"{prefix}{res.stderr.split(prefix)[1].strip()}"]
    assert expect in res.stderr
