"""torch.profiler over timed steps 2..4 of rank 0 (``profile_dir``): a Chrome trace (``<run_id>.json.gz``) and
the top-40 op table (``<run_id>.txt``). Nothing happens when ``profile_dir`` is empty."""

from __future__ import annotations

import contextlib
import gzip
import shutil
from pathlib import Path

import torch


class StepProfiler:
    """torch.profiler over timed steps 2..4 of rank 0 (``profile_dir``); a no-op otherwise."""

    def __init__(self, profile_dir: str, is_main: bool, device: torch.device, run_id: str):
        self.prof = None
        if not (profile_dir and is_main):
            return
        from torch.profiler import ProfilerActivity, profile, schedule

        self.out = Path(profile_dir)
        self.run_id = run_id
        self.cuda = device.type == "cuda"
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.prof = profile(activities=acts, schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
                            record_shapes=False, with_stack=False)

    def start(self):
        if self.prof:
            self.prof.__enter__()

    def step(self):
        if self.prof:
            self.prof.step()

    def stop(self):
        if not self.prof:
            return
        self.prof.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        raw = self.out / f"{self.run_id}.json"
        self.prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
        key = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        with contextlib.suppress(Exception):
            (self.out / f"{self.run_id}.txt").write_text(self.prof.key_averages().table(sort_by=key, row_limit=40))
