"""init_distributed() and Mesh: the tensor- and pipeline-parallel groups of one run.

Rank layout (rank_grid): global rank = stage * tensor + tp_rank, so the ranks of one
tensor-parallel group are consecutive (on one node under torchrun) and pipeline neighbours
are `tensor` apart.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..config import ParallelConfig, RuntimeConfig
from ..errors import ConfigError
from .comm import Group, barrier, guarded
from .shm import ShmCollectives, ShmUnavailable, supported

log = logging.getLogger(__name__)


def rank_grid(tensor: int, pipeline: int) -> list[list[int]]:
    """grid[stage][tp_rank] = global rank = stage * tensor + tp_rank: the one rank layout of a run."""
    return [[stage * tensor + t for t in range(tensor)] for stage in range(pipeline)]


@dataclass(frozen=True)
class Mesh:
    """Where this rank sits: its tensor-parallel group and its pipeline group."""

    rank: int
    world_size: int
    tp: Group
    pp: Group
    device: torch.device
    world: Group = Group.single()
    sampler_rank: int = 0  # samples tokens and broadcasts them: tp-rank 0 of the last stage

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> Mesh:
        return cls(0, 1, Group.single(), Group.single(), torch.device(device))

    @classmethod
    def for_rank(
        cls,
        rank: int,
        tensor: int,
        pipeline: int,
        device: torch.device,
        groups: dict[tuple[int, ...], dist.ProcessGroup] | None = None,
    ) -> Mesh:
        """The Mesh of global rank `rank`; `groups` maps each group's ranks to its process group
        (none: a Mesh to plan with, which never communicates)."""
        grid, groups = rank_grid(tensor, pipeline), groups or {}
        stage, tp_rank = divmod(rank, tensor)
        assert grid[stage][tp_rank] == rank
        tp_ranks, pp_ranks = tuple(grid[stage]), tuple(row[tp_rank] for row in grid)
        tp = Group(tp_rank, tensor, tp_ranks, groups.get(tp_ranks))
        pp = Group(stage, pipeline, pp_ranks, groups.get(pp_ranks))
        world = Group(rank, tensor * pipeline, tuple(range(tensor * pipeline)))
        return cls(rank, tensor * pipeline, tp, pp, device, world, grid[-1][0])

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def stage(self) -> int:
        return self.pp.rank

    @property
    def n_stages(self) -> int:
        return self.pp.size

    @property
    def is_pp_first_stage(self) -> bool:
        return self.pp.rank == 0

    @property
    def is_pp_last_stage(self) -> bool:
        return self.pp.rank == self.pp.size - 1


def world_from_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun sets them; (0, 1, 0) outside torchrun."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def check_layout(tensor: int, pipeline: int, world_size: int) -> None:
    """Raise ConfigError unless tensor x pipeline ranks exactly fill the world."""
    if tensor * pipeline != world_size:
        raise ConfigError(
            f"parallel.tensor ({tensor}) x parallel.pipeline ({pipeline}) = {tensor * pipeline} "
            f"must equal the number of processes ({world_size}); launch with "
            f"torchrun --nproc-per-node {tensor * pipeline} or change the config"
        )


def resolve_backend(backend: str, device: str) -> str:
    """'auto' -> nccl on CUDA, gloo on CPU; reject nccl without CUDA."""
    if backend == "auto":
        return "nccl" if device == "cuda" else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend: nccl needs CUDA, which is not available here; use gloo")
    return backend


def init_distributed(parallel: ParallelConfig, runtime: RuntimeConfig) -> Mesh:
    """Join the torchrun job (if any) and build the tensor/pipeline groups; single-process: no-op.

    parallel.collectives: 'shm' runs small collectives through shared memory (CPU ranks on one
    host), 'backend' through gloo/nccl only, 'auto' picks shm when every rank is on this host.
    """
    rank, world_size, local_rank = world_from_env()
    check_layout(parallel.tensor, parallel.pipeline, world_size)
    if runtime.device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("runtime.device: cuda requested but CUDA is not available; use cpu")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size == 1:
        return Mesh.single(dev)
    backend = resolve_backend(parallel.backend, runtime.device)
    if backend == "nccl":
        # a collective that times out aborts its communicator and ends the process instead of blocking
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        os.environ.setdefault("TORCH_NCCL_ENABLE_MONITORING", "1")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=runtime.timeout_s))
    shm = use_shm(parallel, runtime, world_size, rank)
    return build_mesh(parallel.tensor, parallel.pipeline, dev, shm, runtime.timeout_s)


def use_shm(parallel: ParallelConfig, runtime: RuntimeConfig, world_size: int, rank: int = 0) -> bool:
    """Whether the tensor-parallel groups get shared-memory collectives (parallel.collectives).

    'auto' picks them for CPU ranks that all share this host; 'shm' asks for them. Either way they
    are refused, with one INFO line, where they are unsafe (a CPU without x86 store ordering).
    """
    if parallel.collectives == "backend" or runtime.device != "cpu" or parallel.tensor == 1:
        return False
    if parallel.collectives == "auto" and int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) != world_size:
        return False
    why = supported()
    if why is not None:
        if rank == 0:
            log.info("shared-memory collectives off (%s); using gloo", why)
        return False
    return True


def build_mesh(tensor: int, pipeline: int, device: torch.device, shm: bool = False, timeout_s: float = 120.0) -> Mesh:
    """Create every tp and pp group (all ranks must call new_group for all groups, in order).

    With shm, the tensor-parallel group (and the world, when it is that same group) gets a
    shared-memory fast path for its small collectives.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    check_layout(tensor, pipeline, world_size)
    grid = rank_grid(tensor, pipeline)
    groups = {}
    for ranks in [tuple(row) for row in grid if tensor > 1] + [tuple(col) for col in zip(*grid) if pipeline > 1]:
        groups[ranks] = dist.new_group(list(ranks), timeout=timedelta(seconds=timeout_s))
    mesh = Mesh.for_rank(rank, tensor, pipeline, device, groups)
    if not (shm and tensor > 1):
        return mesh
    try:
        with guarded("shared-memory setup", mesh.tp.ranks):
            collectives = ShmCollectives(mesh.tp.rank, tensor, mesh.tp.pg, timeout_s)
    except ShmUnavailable as e:
        if rank == 0:
            log.info("shared-memory collectives off (%s); using gloo", e)
        return mesh
    tp = dataclasses.replace(mesh.tp, shm=collectives)
    world = dataclasses.replace(mesh.world, shm=tp.shm if pipeline == 1 else None)
    return dataclasses.replace(mesh, tp=tp, world=world)


def shutdown() -> None:
    """Leave the job cleanly once every rank is done (gloo aborts at exit if its group is still up)."""
    if dist.is_initialized():
        barrier(Group(dist.get_rank(), dist.get_world_size(), tuple(range(dist.get_world_size()))))
        dist.destroy_process_group()
