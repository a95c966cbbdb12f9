"""The device mesh: the world's ranks arranged as (pp, dp, tp), built once and handed to every strategy.

Dimension names and order follow torchtitan: ``pp`` (pipeline stages) outermost, ``dp`` (data parallel:
DDP or FSDP over it) next, ``tp`` (tensor parallel) innermost, so the ranks of one tensor-parallel
group are consecutive (on a GPU node: the same host, the fastest links) and pipeline neighbours are
furthest apart (point-to-point traffic only). Global rank r sits at pp = r // (dp tp),
dp = (r // tp) % dp, tp = r % tp. ``dp`` = world / (pp tp); the data loader gives every rank of one dp
coordinate the same micro-batches.

The mesh exists only with a process group; a single process runs without one (``None``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


class MeshShape(NamedTuple):
    """Sizes of the mesh's dimensions (1 when a dimension is unused)."""

    pp: int
    dp: int
    tp: int

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.tp

    def describe(self) -> str:
        """The row's ``mesh`` column: 'pp2xdp2' style, dimensions of size 1 left out ('1' for one rank)."""
        parts = [f"{name}{size}" for name, size in zip(self._fields, self) if size > 1]
        return "x".join(parts) or "1"


def mesh_shape(s, world_size: int) -> MeshShape:
    """(pp, dp, tp) for ``world_size`` ranks under strategy ``s`` (validated elsewhere: pp x tp divides it)."""
    tp, pp = getattr(s, "tp", 1), getattr(s, "pp", 1)
    return MeshShape(pp=pp, dp=max(1, world_size // (tp * pp)), tp=tp)


def layout_columns(s, world_size: int) -> dict:
    """The record's parallel-layout columns (reports/record.py) for strategy ``s`` on ``world_size`` ranks."""
    shape = mesh_shape(s, world_size)
    dp = shape.dp if s.dp != "none" else 1
    pp = shape.pp > 1
    return {"tp": shape.tp, "pp": shape.pp, "dp_shard": dp if s.dp == "fsdp" else 1,
            "dp_replicate": dp if s.dp == "ddp" else 1, "pp_schedule": s.pp_schedule if pp else None,
            "pp_microbatches": (s.pp_microbatches or s.pp) if pp else None, "mesh": shape.describe()}


def build_mesh(s, device_type: str) -> DeviceMesh | None:
    """The (pp, dp, tp) DeviceMesh over every rank of the initialised process group, or None without one."""
    if not dist.is_initialized():
        return None
    shape = mesh_shape(s, dist.get_world_size())
    return init_device_mesh(device_type, tuple(shape), mesh_dim_names=MeshShape._fields)


def dp_coordinate(mesh: DeviceMesh | None) -> int:
    """This rank's index along the data-parallel dimension (0 without a mesh)."""
    return 0 if mesh is None else mesh["dp"].get_local_rank()
