"""Peak memory per rank, reset after warm-up so it measures steady-state training.

CUDA (bytes, from the caching allocator):
- ``peak_mem_bytes`` = ``torch.cuda.max_memory_allocated`` (tensors alive at the peak);
- ``peak_reserved_bytes`` = ``torch.cuda.max_memory_reserved`` (what the allocator held from the driver).
CPU:
- ``peak_mem_bytes`` = the process's peak resident set size (VmHWM in /proc/self/status), which
  includes the Python interpreter and libraries (~0.3-0.5 GB) and whatever the allocator has not
  returned to the OS; it is reset after warm-up by writing 5 to /proc/self/clear_refs.
  ``peak_reserved_bytes`` is None (no caching allocator).
Across ranks: the **max** (the run needs a device that fits its hungriest rank).
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _vm_field_bytes(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass  # not Linux / not permitted: the peak then covers the whole process lifetime


def read_peak(device: torch.device) -> dict:
    """``peak_mem_bytes`` and ``peak_reserved_bytes`` for this rank since the last reset."""
    if device.type == "cuda":
        return {
            "peak_mem_bytes": int(torch.cuda.max_memory_allocated(device)),
            "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
        }
    hwm = _vm_field_bytes("VmHWM")
    if hwm is None:  # no procfs: lifetime peak from getrusage (kB on Linux)
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_mem_bytes": hwm, "peak_reserved_bytes": None}


def warm_runtime(device: torch.device) -> None:
    """Run, once and small, the code paths a training step uses (a linear layer's forward and backward, a
    fused and a foreach AdamW step) so that state the libraries create lazily on first use -- oneDNN/MKL
    buffers, OpenMP thread pools, kernel code: about 80 MB of RSS on this project's CPU machine, measured
    with mini -- is part of the process baseline taken next, not counted against the model."""
    layer = torch.nn.Linear(64, 64, device=device)
    layer(torch.randn(8, 64, device=device)).sum().backward()
    for kw in ({"fused": True}, {"foreach": True}):
        torch.optim.AdamW(layer.parameters(), lr=1e-3, **kw).step()


def current_rss_bytes() -> int | None:
    """Current resident set size of this process (VmRSS), bytes."""
    return _vm_field_bytes("VmRSS")
