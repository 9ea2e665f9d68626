"""Collectives over a `Group`; every one is a no-op when the group has a single rank."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from .shm import ShmCollectives


@dataclass(frozen=True)
class Group:
    """One process group as the layers see it: this rank's index, the size and the global ranks."""

    rank: int = 0
    size: int = 1
    ranks: tuple[int, ...] = (0,)
    pg: dist.ProcessGroup | None = None  # None with size > 1: the default (world) group
    shm: object | None = field(default=None, compare=False)  # ShmCollectives when on one host

    @classmethod
    def single(cls, global_rank: int = 0) -> "Group":
        return cls(0, 1, (global_rank,), None)


# The size-1 early returns stay traceable, so torch.compile sees no break in a one-rank model.
# The shared-memory all-reduce of a decode step is an op torch.compile keeps inside its graph;
# the other collectives are sync points that torch.compile leaves alone (compiler.disable).

def all_reduce(x: Tensor, group: Group) -> Tensor:
    """Sum x over the group, in place; returns x."""
    if group.size == 1:
        return x
    if group.shm is not None and group.shm.fits(x):
        torch.ops.llama3_dist.shm_all_reduce(x, group.shm.key)
        return x
    return _all_reduce(x, group)


@torch.library.custom_op("llama3_dist::shm_all_reduce", mutates_args=("x",))
def _shm_all_reduce(x: Tensor, key: int) -> None:
    ShmCollectives.by_key[key].all_reduce(x)


@_shm_all_reduce.register_fake
def _(x: Tensor, key: int) -> None:
    return None


@torch.compiler.disable
def _all_reduce(x: Tensor, group: Group) -> Tensor:
    dist.all_reduce(x, group=group.pg)
    return x


def all_gather(x: Tensor, group: Group, sizes: list[int], dim: int = -1) -> Tensor:
    """Concatenate every rank's x along dim; rank r contributes sizes[r] entries (uneven is fine)."""
    return x if group.size == 1 else _all_gather(x, group, sizes, dim)


@torch.compiler.disable
def _all_gather(x: Tensor, group: Group, sizes: list[int], dim: int) -> Tensor:
    dim = dim % x.dim()
    if group.shm is not None and group.shm.fits(x.narrow(dim, 0, 1).expand(
            *x.shape[:dim], max(sizes), *x.shape[dim + 1:])):
        return group.shm.all_gather(x, sizes, dim)
    width = max(sizes)
    if x.shape[dim] < width:  # gloo needs equal sizes: pad, gather, trim
        pad = list(x.shape)
        pad[dim] = width - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad)], dim=dim)
    parts = [torch.empty_like(x) for _ in range(group.size)]
    dist.all_gather(parts, x.contiguous(), group=group.pg)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim=dim)


def broadcast(x: Tensor, src: int, group: Group) -> Tensor:
    """Overwrite x with global rank src's x, in place, on every rank of the group."""
    return x if group.size == 1 else _broadcast(x, src, group)


@torch.compiler.disable
def _broadcast(x: Tensor, src: int, group: Group) -> Tensor:
    if group.shm is not None and group.shm.fits(x):
        return group.shm.broadcast(x, group.ranks.index(src))
    dist.broadcast(x, src, group=group.pg)
    return x


def recv(x: Tensor, src: int) -> Tensor:
    """Blocking point-to-point receive from global rank src into x."""
    dist.recv(x, src)
    return x


def isend(x: Tensor, dst: int) -> dist.Work:
    """Non-blocking send; wait() on the handle before reusing x."""
    return dist.isend(x.contiguous(), dst)
