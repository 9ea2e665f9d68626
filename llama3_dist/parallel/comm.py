"""Collectives over a `Group`; every one is a no-op when the group has a single rank."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Group:
    """One process group as the layers see it: this rank's index, the size and the global ranks."""

    rank: int = 0
    size: int = 1
    ranks: tuple[int, ...] = (0,)
    pg: dist.ProcessGroup | None = None

    @classmethod
    def single(cls, global_rank: int = 0) -> "Group":
        return cls(0, 1, (global_rank,), None)


def all_reduce(x: Tensor, group: Group) -> Tensor:
    """Sum x over the group, in place; returns x."""
    if group.size > 1:
        dist.all_reduce(x, group=group.pg)
    return x


def all_gather(x: Tensor, group: Group, sizes: list[int], dim: int = -1) -> Tensor:
    """Concatenate every rank's x along dim; rank r contributes sizes[r] entries (uneven is fine)."""
    if group.size == 1:
        return x
    dim = dim % x.dim()
    width = max(sizes)
    if x.shape[dim] < width:  # gloo needs equal sizes: pad, gather, trim
        pad = list(x.shape)
        pad[dim] = width - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad)], dim=dim)
    parts = [torch.empty_like(x) for _ in range(group.size)]
    dist.all_gather(parts, x.contiguous(), group=group.pg)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim=dim)


def broadcast(x: Tensor, src: int, group: Group | None = None) -> Tensor:
    """Overwrite x with global rank src's x, in place, on every rank of the group (default: world)."""
    if group is None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(x, src)
    elif group.size > 1:
        dist.broadcast(x, src, group=group.pg)
    return x


def send(x: Tensor, dst: int) -> None:
    """Blocking point-to-point send to global rank dst."""
    dist.send(x.contiguous(), dst)


def recv(x: Tensor, src: int) -> Tensor:
    """Blocking point-to-point receive from global rank src into x."""
    dist.recv(x, src)
    return x


def isend(x: Tensor, dst: int) -> dist.Work:
    """Non-blocking send; wait() on the handle before reusing x."""
    return dist.isend(x.contiguous(), dst)


def irecv(x: Tensor, src: int) -> dist.Work:
    """Non-blocking receive into x; wait() on the handle before reading x."""
    return dist.irecv(x, src)
