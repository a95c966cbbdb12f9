"""Beyond one process group: two torchrun 'nodes' on loopback, sweeps, SLURM scripts, and faults."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.launch.slurm import SlurmJob
from reports import load
from tests.helpers import ROOT, md_rows, run_cli

pytestmark = pytest.mark.e2e

FAST = ["model=tiny", "steps=4", "warmup=1", "micro_batch=2", "seq_len=32", "log_every=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_over_c10d_rendezvous(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=n00bgpt-test",
           "bench/run.py", "strategy=fsdp", *FAST, f"results_dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [n.communicate(timeout=240)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs
    df = load(tmp_path)
    assert len(df) == 1  # only global rank 0 writes
    row = df.iloc[0]
    assert row.nnodes == 2 and row.world_size == 2 and row.status == "ok" and row.strategy == "fsdp"


def _rank_pid(marker: str, rank: int) -> int | None:
    """PID of the bench/run.py process whose command line holds ``marker`` and whose RANK is ``rank``."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            if "bench/run.py" not in cmdline or marker not in cmdline or "torch.distributed.run" in cmdline:
                continue
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def _training(tmp_path) -> subprocess.Popen:
    """A 2-rank ddp run under torchrun of 400 slow steps (20 s+), returned once it is training (step 3)."""
    args = ["strategy=ddp", "model=tiny", "steps=400", "warmup=1", "micro_batch=2", "seq_len=32", "log_every=1",
            "debug_delay_s=0.05", f"results_dir={tmp_path}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "bench/run.py", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "step 3/" in line:
            break
    return proc


def test_killed_rank_leaves_one_error_row_and_a_rerun_adds_one(tmp_path):
    proc = _training(tmp_path)
    pid = _rank_pid(str(tmp_path), 1)
    assert pid, "rank 1 not found"
    os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    df = load(tmp_path)
    assert len(df) == 1 and df.iloc[0].status == "error" and "rank 0" in df.iloc[0].error
    assert df.iloc[0].error.startswith("rank 1 died")  # the row names the rank that was killed
    res = run_cli(["strategy=ddp", *FAST, f"results_dir={tmp_path}"], nproc=2)
    assert res.returncode == 0, res.stderr[-2000:]
    df = load(tmp_path)
    assert list(df.status) == ["error", "ok"] and df.run_id.nunique() == 2


def test_a_killed_torchrun_takes_its_ranks_with_it_and_leaves_one_error_row(tmp_path):
    """SIGKILL the launcher (nothing of it can forward a signal): the ranks, told by the kernel that their
    parent died (bench/harness/dist.py die_with_parent), stop within seconds and write the run's error row,
    instead of training on unseen to an ok row."""
    proc = _training(tmp_path)
    ranks = [_rank_pid(str(tmp_path), r) for r in (0, 1)]
    assert all(ranks), ranks
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{pid}").exists() for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(Path(f"/proc/{pid}").exists() for pid in ranks), "a rank outlived its killed launcher"
    df = load(tmp_path)
    assert len(df) == 1 and df.iloc[0].status == "error" and "terminated by SIGTERM" in df.iloc[0].error


@pytest.mark.parametrize("hung_rank", ["1", "-1"])  # one rank stops answering; every rank does
def test_hung_collective_is_bounded_by_the_timeout(tmp_path, hung_rank):
    t0 = time.perf_counter()
    res = run_cli(["strategy=ddp", *FAST, "steps=10", "timeout_s=5", "debug_hang_step=2",
                   f"debug_fail_rank={hung_rank}", f"results_dir={tmp_path}"], nproc=2, timeout=200)
    assert res.returncode != 0
    assert time.perf_counter() - t0 < 150
    df = load(tmp_path)
    assert len(df) == 1 and df.iloc[0].status == "timeout", df.iloc[0].error


def test_sweep_runs_each_job_as_its_own_process_group_and_survives_failures(tmp_path):
    res = subprocess.run([sys.executable, "bench/launch/sweep.py", "-m", "strategy=ddp,fsdp,single", "model=tiny",
                          "steps=3", "warmup=1", "micro_batch=2", "seq_len=32", f"results_dir={tmp_path / 'r'}",
                          f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    df = load(tmp_path / "r")
    assert len(df) == 3 and df.tag.nunique() == 1 and df.tag.iloc[0].startswith("sweep:")
    by = {r.strategy: r for r in df.itertuples()}
    assert by["ddp"].status == "ok" and by["fsdp"].status == "ok" and by["ddp"].world_size == 2
    # single on 2 processes is an invalid combination: run.py refuses it, the launcher records it
    assert by["single"].status == "invalid" and "use strategy=ddp or strategy=fsdp" in by["single"].error
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    assert [r[1] for r in md_rows(summary)].count("tiny") == 3 and "invalid" in summary
    assert "[sweep] summary" in res.stdout


def test_sweep_with_slurm_launcher_writes_one_script_per_job(tmp_path):
    res = subprocess.run([sys.executable, "bench/launch/sweep.py", "-m", "strategy=fsdp,fsdp_ac", "model=gpt2-xl",
                          "sweep.launcher=slurm", "sweep.nnodes=4", "sweep.gpus_per_node=8", "sweep.partition=gpu",
                          f"hydra.sweep.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    scripts = sorted(tmp_path.glob("*.sbatch"))
    assert len(scripts) == 2
    text = scripts[1].read_text()
    assert "#SBATCH --nodes=4" in text and "#SBATCH --gpus-per-node=8" in text and "#SBATCH --partition=gpu" in text
    assert "--nproc_per_node=8" in text and "strategy=fsdp_ac" in text and "model=gpt2-xl" in text
    assert subprocess.run(["bash", "-n", str(scripts[0])]).returncode == 0


def test_sbatch_script_runs_torchrun_with_slurm_variables(tmp_path):
    """Execute the generated script with stand-ins for srun and scontrol: one 'node', 2 CPU ranks."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    job = SlurmJob(run_args=["strategy=fsdp", *FAST, f"results_dir={tmp_path / 'r'}"], nodes=1, gpus_per_node=0,
                   nproc_per_node=2, cpus_per_task=2, job_name="t", port=free_port(), python=sys.executable)
    path = job.write(tmp_path / "t.sbatch")
    text = path.read_text()
    assert "#SBATCH --gpus-per-node" not in text and '--rdzv-id="$SLURM_JOB_ID"' in text
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[1]",
           "SLURM_NNODES": "1", "SLURM_JOB_ID": "4242", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    row = load(tmp_path / "r").iloc[0]
    assert row.status == "ok" and row.world_size == 2 and row.nnodes == 1
    assert json.loads(json.dumps(row.config))["strategy"]["dp"] == "fsdp"


@pytest.mark.parametrize("bad", [["nodes=2", "submit=true", "--", "strategy=fsdp"]])
def test_slurm_cli_dry_run_and_clear_submit_error(tmp_path, bad):
    out = tmp_path / "j.sbatch"
    res = subprocess.run([sys.executable, "-m", "bench.launch.slurm", f"out={out}", *bad], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.exists() and "#SBATCH --nodes=2" in res.stdout
    assert res.returncode == 1 and "sbatch not found" in res.stderr
