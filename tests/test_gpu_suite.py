"""The GPU suite's matrix and its CPU dry run (the real run needs a GPU; its results are in results/gpu/)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.launch import gpu_suite
from reports import load
from tests.helpers import ROOT

pytestmark = pytest.mark.e2e


def test_list_prints_every_entry_with_the_right_launcher():
    """docs/gpu.md's ``bash bench/launch/gpu_suite.sh --list``: the commands, nothing run, no folder named --list."""
    r = subprocess.run(["bash", "bench/launch/gpu_suite.sh", "--list"], cwd=ROOT, capture_output=True, text=True,
                       check=True, env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    out = [line for line in r.stdout.splitlines() if "bench/run.py" in line]
    assert not (ROOT / "--list").exists() and not (ROOT / "gpu_suite_out").exists()
    assert all(f"results_dir={ROOT}/gpu_suite_out/" in line for line in out)
    assert len(out) == len(gpu_suite.MATRIX) + 1  # + the profiled entry
    for (label, model, strategy, _, distributed), line in zip(gpu_suite.MATRIX, out[:6] + out[7:]):
        assert f"tag=gpu_suite:{label}" in line and f"model={model}" in line and f"strategy={strategy}" in line
        assert ("--nproc_per_node=1" in line) == distributed
    assert "profile_dir=" in out[6]
    assert {"gpt2-small", "gpt2-medium", "gpt2-large"} <= {e[1] for e in gpu_suite.MATRIX}


def test_cpu_dry_run_writes_rows_and_summary(tmp_path):
    res = subprocess.run([sys.executable, "-m", "bench.launch.gpu_suite", "cpu=true", f"out={tmp_path}",
                          "only=small-tf32,small-fsdp-ac-bf16"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    df = load(tmp_path / "results")
    assert sorted(df.tag) == ["gpu_suite:small-fsdp-ac-bf16", "gpu_suite:small-tf32"]
    assert set(df.status) == {"ok"} and set(df.model) == {"tiny"}
    summary = (tmp_path / "summary.md").read_text()
    assert "small-fsdp-ac-bf16" in summary and "fsdp+ac(full)" in summary
    page = (tmp_path / "report" / "index.html").read_text()
    assert "fsdp+ac(full)" in page and "data:image/png;base64," in page
