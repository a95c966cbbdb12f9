"""The device mesh: the world's ranks arranged as (pp, dp, tp), built once and handed to every strategy.

Dimension names and order follow torchtitan: ``pp`` (pipeline stages) outermost, ``dp`` (data parallel:
DDP or FSDP over it) next, ``tp`` (tensor parallel) innermost, so the ranks of one tensor-parallel
group are consecutive (on a GPU node: the same host, the fastest links) and pipeline neighbours are
furthest apart (point-to-point traffic only). Global rank r sits at pp = r // (dp tp),
dp = (r // tp) % dp, tp = r % tp. ``dp`` = world / (pp tp); the data loader gives every rank of one dp
coordinate the same micro-batches.

HSDP (``strategy.dp_replicate`` > 1) splits ``dp`` in two, ``dp_replicate`` outer and ``dp_shard`` inner (a shard
group is consecutive ranks: one node), so the mesh is (pp, dp_replicate, dp_shard, tp); FSDP2 gets the 2-D
(dp_replicate, dp_shard) mesh (``dp_mesh``) and the data loader one coordinate over both (``dp_coordinate``).

The mesh exists only with a process group; a single process runs without one (``None``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


class MeshShape(NamedTuple):
    """Sizes of the mesh's dimensions (1 when a dimension is unused); ``dp`` is the whole data-parallel degree,
    ``dp_replicate`` (HSDP's replicas) divides it."""

    pp: int
    dp: int
    tp: int
    dp_replicate: int = 1

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def dp_shard(self) -> int:
        return self.dp // self.dp_replicate

    @property
    def dims(self) -> dict[str, int]:
        """The DeviceMesh's dimensions, outermost first: (pp, dp, tp), or (pp, dp_replicate, dp_shard, tp) under
        HSDP."""
        if self.dp_replicate == 1:
            return {"pp": self.pp, "dp": self.dp, "tp": self.tp}
        return {"pp": self.pp, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "tp": self.tp}

    def describe(self) -> str:
        """The row's ``mesh`` column: 'pp2xdp2' or 'dp_replicate2xdp_shard4xtp2' style, dimensions of size 1 left
        out ('1' for one rank)."""
        parts = [f"{name}{size}" for name, size in self.dims.items() if size > 1]
        return "x".join(parts) or "1"


def mesh_shape(s, world_size: int) -> MeshShape:
    """(pp, dp, tp, dp_replicate) for ``world_size`` ranks under strategy ``s`` (validated elsewhere: pp x tp
    divides it, dp_replicate divides dp)."""
    tp, pp = getattr(s, "tp", 1), getattr(s, "pp", 1)
    return MeshShape(pp=pp, dp=max(1, world_size // (tp * pp)), tp=tp, dp_replicate=getattr(s, "dp_replicate", 1))


def dp_degree(s, world_size: int) -> int:
    """The ranks that split the data under strategy ``s``: the mesh's dp size with data parallelism, 1 without
    it (the ranks of one tensor- or pipeline-parallel group share their micro-batches)."""
    return mesh_shape(s, world_size).dp if s.dp != "none" else 1


def layout_columns(s, world_size: int) -> dict:
    """The record's parallel-layout columns (reports/record.py) for strategy ``s`` on ``world_size`` ranks."""
    shape = mesh_shape(s, world_size)
    dp = dp_degree(s, world_size)
    pp = shape.pp > 1
    return {"tp": shape.tp, "pp": shape.pp, "dp_shard": shape.dp_shard if s.dp == "fsdp" else 1,
            "dp_replicate": dp if s.dp == "ddp" else shape.dp_replicate, "pp_schedule": s.pp_schedule if pp else None,
            "pp_microbatches": (s.pp_microbatches or s.pp) if pp else None, "mesh": shape.describe()}


def build_mesh(s, device_type: str) -> DeviceMesh | None:
    """The (pp, dp, tp) DeviceMesh over every rank of the initialised process group, or None without one; under
    HSDP (pp, dp_replicate, dp_shard, tp)."""
    if not dist.is_initialized():
        return None
    dims = mesh_shape(s, dist.get_world_size()).dims
    return init_device_mesh(device_type, tuple(dims.values()), mesh_dim_names=tuple(dims))


def dp_mesh(mesh: DeviceMesh | None) -> DeviceMesh | None:
    """The mesh data parallelism runs on: the ``dp`` dimension, or HSDP's 2-D (dp_replicate, dp_shard) one, which
    FSDP2's ``fully_shard`` takes as replicate x shard."""
    if mesh is None:
        return None
    return mesh["dp_replicate", "dp_shard"] if "dp_shard" in (mesh.mesh_dim_names or ()) else mesh["dp"]


def dp_coordinate(mesh: DeviceMesh | None) -> int:
    """This rank's index along the data-parallel dimension (0 without a mesh); under HSDP replica x shards +
    shard."""
    if mesh is None:
        return 0
    if "dp_shard" in (mesh.mesh_dim_names or ()):
        return mesh["dp_replicate"].get_local_rank() * mesh["dp_shard"].size() + mesh["dp_shard"].get_local_rank()
    return mesh["dp"].get_local_rank()
