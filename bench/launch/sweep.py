"""Sweeps: a Hydra multirun in which every job is launched as its own torchrun process group.

    python bench/launch/sweep.py -m strategy=ddp,fsdp model=tiny,mini                 # 4 jobs, 2 processes each
    python bench/launch/sweep.py -m strategy=single,compile model=tiny sweep.nproc_per_node=0
    python bench/launch/sweep.py -m strategy=fsdp,fsdp_ac model=gpt2-large,gpt2-xl \\
        sweep.launcher=slurm sweep.nnodes=4 sweep.gpus_per_node=8 sweep.partition=gpu sweep.submit=true

Hydra expands the grid (its BasicLauncher runs jobs one after another in this process, which never
touches torch.distributed itself: multirun is never nested inside torchrun). Each job runs
``torchrun --nproc_per_node=N bench/run.py <the job's overrides> run_id=... tag=sweep:<id>``; a job
that fails (crash, OOM, bad combination, timeout) never stops the sweep, and when bench/run.py could
not write the job's row (invalid configuration, killed process) this wrapper writes it, with status
``invalid``, ``error`` or ``timeout``. At the end: a summary table (also ``<sweep dir>/summary.md``);
the rows are in ``results_dir`` for ``python -m reports``. With ``sweep.launcher=slurm`` each job
becomes an sbatch script in the sweep folder (bench/launch/slurm.py), submitted when ``sweep.submit=true``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import hydra  # noqa: E402
from hydra.core.config_store import ConfigStore  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.experimental.callback import Callback  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from bench.harness.config import RunConfig, register_configs  # noqa: E402
from bench.harness.env import git_sha  # noqa: E402
from bench.harness.table import DuplicateRun, append_row  # noqa: E402
from bench.launch.slurm import SlurmJob, SlurmSettings, submit  # noqa: E402
from bench.launch.suite import launcher  # noqa: E402
from models.cli import opt  # noqa: E402
from reports.aggregate import format_value  # noqa: E402
from reports.build import markdown_table  # noqa: E402
from reports.load import read_rows  # noqa: E402
from reports.record import REQUIRED_COLUMNS, RUNS_FILE  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class SweepSettings(SlurmSettings):
    """How each job of a sweep is launched (``sweep.*``); everything else is the RunConfig. The SLURM
    settings are bench/launch/slurm.py's (inherited), for ``launcher=slurm``."""

    launcher: str = opt("local", "'local' (torchrun here, one job after another) or 'slurm' (an sbatch script "
                        "per job)")
    nproc_per_node: int = opt(2, "processes per node for each job's torchrun; 0 = one plain `python bench/run.py` "
                              "process (slurm with gpus_per_node > 0: one process per GPU)")
    nnodes: int = opt(1, "nodes per job (local: must be 1; slurm: the job's --nodes)")
    timeout_s: int = opt(3600, "local: a job running longer is killed and recorded with status 'timeout'")
    gpus_per_node: int = opt(0, "slurm: --gpus-per-node (0 for CPU nodes)")


@dataclass
class SweepConfig(RunConfig):
    """A RunConfig plus how to launch it: this sweep's Hydra schema (bench/conf/sweep.yaml)."""

    sweep: SweepSettings = field(default_factory=SweepSettings)

    def __post_init__(self) -> None:  # the jobs validate themselves (bench/run.py); a sweep only launches
        pass


register_configs()
ConfigStore.instance().store(name="base_sweep", node=SweepConfig)


def sweep_id(sweep_dir: str) -> str:
    """Stable for one sweep (one process), unique across sweeps started in the same second."""
    return f"{Path(sweep_dir).name}-{os.getpid()}"


def _results_dir(cfg: DictConfig) -> Path:
    p = Path(cfg.results_dir)
    return p if p.is_absolute() else ROOT / p


def _launch_local(cfg: DictConfig, run_args: list[str], run_id: str, tag: str) -> str:
    s = cfg.sweep
    if s.nnodes != 1:
        return f"invalid: sweep.nnodes={s.nnodes} needs sweep.launcher=slurm (the local launcher runs one node)"
    cmd = [*launcher(s.nproc_per_node), str(ROOT / "bench" / "run.py"), *run_args]
    print(f"[sweep] {run_id}: {' '.join(run_args)}", flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=s.timeout_s)
        rc = proc.returncode
        marker = "error: invalid configuration:"  # bench/run.py's exit-2 message (torchrun reports exit 1)
        invalid = rc == 2 or marker in proc.stderr
        tail = proc.stderr[proc.stderr.index(marker):][:1500] if marker in proc.stderr else \
            (proc.stderr or proc.stdout)[-1500:]
        status = "ok" if rc == 0 else ("invalid" if invalid else "error")
    except subprocess.TimeoutExpired as exc:
        rc, status = "timeout", "timeout"
        tail = f"killed after sweep.timeout_s={s.timeout_s}s; " + str(exc.stderr or "")[-1000:]
    results = _results_dir(cfg)
    row = {c: None for c in REQUIRED_COLUMNS}
    row.update(run_id=run_id, timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               model=cfg.model.get("name"), strategy=HydraConfig.get().runtime.choices.get("strategy"),
               world_size=max(1, s.nproc_per_node) * s.nnodes, nnodes=s.nnodes, status=status,
               error=f"launcher: exit {rc}: {tail.strip()}", tag=tag, hostname=socket.gethostname(),
               git_sha=git_sha(), config={"overrides": run_args})
    with contextlib.suppress(DuplicateRun):  # the job wrote its own row: the launcher's is not needed
        append_row(results, row)
    print(f"[sweep] {run_id}: exit {rc}", flush=True)
    return status


@hydra.main(version_base=None, config_path="../conf", config_name="sweep")
def job(cfg: DictConfig) -> str:
    """One sweep job. Never raises: a failure is a row, not the end of the sweep."""
    hc = HydraConfig.get()
    sid = sweep_id(hc.sweep.dir)
    num = hc.job.num if hc.job.get("num") is not None else 0
    run_id, tag = f"sweep-{sid}-{num}", f"sweep:{sid}"
    overrides = [o for o in hc.overrides.task if not o.startswith(("sweep.", "run_id=", "tag=", "results_dir="))]
    run_args = [*overrides, f"run_id={run_id}", f"tag={tag}", f"results_dir={_results_dir(cfg)}"]
    try:
        if cfg.sweep.launcher == "slurm":
            s = cfg.sweep
            common = {f.name: s[f.name] for f in fields(SlurmSettings)}
            sbatch = SlurmJob(**common, run_args=run_args, nodes=s.nnodes, job_name=run_id,
                              nproc_per_node=s.gpus_per_node or max(1, s.nproc_per_node),
                              out_dir=str(Path(hc.sweep.dir)))
            path = sbatch.write(Path(hc.sweep.dir) / f"{run_id}.sbatch")
            print(f"[sweep] {run_id}: wrote {path}" + (f"; {submit(path)}" if s.submit else " (dry run)"), flush=True)
            return "submitted" if s.submit else "written"
        if cfg.sweep.launcher != "local":
            return f"invalid: sweep.launcher={cfg.sweep.launcher!r}; valid: local, slurm"
        return _launch_local(cfg, run_args, run_id, tag)
    except Exception as exc:  # the sweep goes on
        print(f"[sweep] {run_id}: launcher error: {exc}", flush=True)
        return f"error: {exc}"


class SweepSummary(Callback):
    """At the end of a multirun: one line per job (from the result rows), printed and saved."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sid = sweep_id(config.hydra.sweep.dir)
        results = _results_dir(config)
        path = results / RUNS_FILE
        rows = [r for r in read_rows(results) if r.get("tag") == f"sweep:{sid}"]
        rows.sort(key=lambda r: int(str(r["run_id"]).rsplit("-", 1)[-1]))
        cells = [[r["run_id"].rsplit("-", 1)[-1], r["model"], r["strategy"], r["world_size"], r["status"],
                  format_value("tokens_per_sec", r.get("tokens_per_sec")), format_value("mfu", r.get("mfu")),
                  format_value("peak_mem_gib", r["peak_mem_bytes"] / 2**30 if r.get("peak_mem_bytes") else None),
                  (r.get("error") or "").splitlines()[-1][:80] if r.get("error") else ""] for r in rows]
        table = markdown_table(["job", "model", "strategy", "world", "status", "tokens/s", "MFU", "peak mem (GiB)",
                                "error"], cells)
        text = table + f"\n\n{len(rows)} rows in {path} (tag sweep:{sid})\n"
        if config.sweep.launcher == "local":
            Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
            (Path(config.hydra.sweep.dir) / "summary.md").write_text(text)
            print("\n[sweep] summary\n" + text, flush=True)


if __name__ == "__main__":
    job()
