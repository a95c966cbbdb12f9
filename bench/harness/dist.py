"""Process-group set-up from torchrun's environment (or none, for a plain ``python bench/run.py``).

Device from LOCAL_RANK (cuda:LOCAL_RANK) or the CPU; backend nccl on CUDA, gloo on CPU unless
overridden. ``nnodes`` = WORLD_SIZE / LOCAL_WORLD_SIZE (torchrun's homogeneous nodes).
"""

from __future__ import annotations

import ctypes
import datetime
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bench.harness.config import ConfigError


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    nnodes: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(requested: str, local_rank: int) -> torch.device:
    """'auto' | 'cpu' | 'cuda' -> the torch.device for this rank; cuda on a machine without one is an error."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA device is available on this machine; use device=cpu or auto")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
    return torch.device("cuda", local_rank)


def resolve_backend(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise ConfigError("backend='nccl' needs CUDA devices; use backend=gloo (or auto) on CPU")
    return requested


def env_world() -> tuple[int, int, int, int]:
    """(rank, local_rank, world_size, nnodes) from torchrun's variables; (0, 0, 1, 1) without torchrun."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return rank, local_rank, world, max(1, world // max(1, local_world))


def init_distributed(device: str, backend: str, timeout_s: int) -> DistInfo:
    """Resolve the device, set it current, and init the process group when launched by torchrun."""
    rank, local_rank, world, nnodes = env_world()
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    be = resolve_backend(backend, dev)  # checked in one process too: nccl on a CPU is refused either way
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(be, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    elif dist.is_initialized():
        be = dist.get_backend()
    else:
        be = None  # one process, no process group
    return DistInfo(rank, local_rank, world, nnodes, dev, be)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Under torchrun (Linux): have the kernel send this rank ``sig`` when its launcher dies (prctl
    PR_SET_PDEATHSIG), so a torchrun that is killed (SIGKILL, OOM killer) never leaves its ranks training on
    unseen; the rank's SIGTERM handler then writes the run's error row. Without torchrun, nothing."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != launcher:  # it died before we asked
        os.kill(os.getpid(), sig)


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank (identity without a process group)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj`` in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
