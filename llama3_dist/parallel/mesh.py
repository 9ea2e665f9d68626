"""init_distributed() and Mesh: the tensor- and pipeline-parallel groups of one run.

Rank layout: global rank = stage * tensor + tp_rank, so the ranks of one tensor-parallel
group are consecutive (on one node under torchrun) and pipeline neighbours are `tensor` apart.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..config import ConfigError
from .comm import Group
from .shm import SHM_DIR, ShmCollectives


@dataclass(frozen=True)
class Mesh:
    """Where this rank sits: its tensor-parallel group and its pipeline group."""

    rank: int
    world_size: int
    tp: Group
    pp: Group
    device: torch.device
    world: Group = Group.single()

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> "Mesh":
        return cls(0, 1, Group.single(), Group.single(), torch.device(device))

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

    @property
    def sampler_rank(self) -> int:
        """Global rank that samples tokens and broadcasts them: tp-rank 0 of the last stage."""
        return (self.pp.size - 1) * self.tp.size


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


def init_distributed(tensor: int, pipeline: int, backend: str = "auto", device: str = "cpu",
                     timeout_s: float = 120.0, collectives: str = "auto") -> Mesh:
    """Join the torchrun job (if any) and build the tensor/pipeline groups; single-process: no-op.

    collectives: 'shm' runs small collectives through shared memory (CPU ranks on one host),
    'gloo'/'nccl' through the backend only, 'auto' picks shm when every rank is on this host.
    """
    rank, world_size, local_rank = world_from_env()
    check_layout(tensor, pipeline, world_size)
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("runtime.device: cuda requested but CUDA is not available; use cpu")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size == 1:
        return Mesh.single(dev)
    backend = resolve_backend(backend, device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    if collectives == "auto":
        one_host = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) == world_size
        collectives = "shm" if device == "cpu" and one_host and SHM_DIR.is_dir() else backend
    elif collectives == "shm" and device != "cpu":
        raise ConfigError("parallel.collectives: shm is for CPU ranks; use auto or nccl on CUDA")
    return build_mesh(tensor, pipeline, dev, shm=collectives == "shm", timeout_s=timeout_s)


def build_mesh(tensor: int, pipeline: int, device: torch.device, shm: bool = False,
               timeout_s: float = 120.0) -> Mesh:
    """Create every tp and pp group (all ranks must call new_group for all groups, in order).

    With shm, the tensor-parallel group (and the world, when it is that same group) gets a
    shared-memory fast path for its small collectives.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    check_layout(tensor, pipeline, world_size)
    tp = pp = None
    for stage in range(pipeline):
        ranks = tuple(stage * tensor + t for t in range(tensor))
        pg = dist.new_group(list(ranks)) if tensor > 1 else None
        if rank in ranks:
            tp = Group(ranks.index(rank), tensor, ranks, pg)
    for t in range(tensor):
        ranks = tuple(stage * tensor + t for stage in range(pipeline))
        pg = dist.new_group(list(ranks)) if pipeline > 1 else None
        if rank in ranks:
            pp = Group(ranks.index(rank), pipeline, ranks, pg)
    if shm and tensor > 1:
        tp = dataclasses.replace(tp, shm=ShmCollectives(tp.rank, tensor, tp.pg, timeout_s))
    world = Group(rank, world_size, tuple(range(world_size)), None, tp.shm if pipeline == 1 else None)
    return Mesh(rank, world_size, tp, pp, device, world)


def shutdown() -> None:
    """Leave the job cleanly once every rank is done (gloo aborts at exit if its group is still up)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
