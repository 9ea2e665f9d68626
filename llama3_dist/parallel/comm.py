"""Collectives over a `Group`; every one is a no-op when the group has a single rank.

Every wait is bounded by runtime.timeout_s (the process groups and the shared-memory segment carry
it); a collective that fails or times out raises CollectiveError naming the operation, the group's
ranks and, where it is known, the silent rank.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import CollectiveError
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
    def single(cls, global_rank: int = 0) -> Group:
        return cls(0, 1, (global_rank,), None)


# The size-1 early returns stay traceable, so torch.compile sees no break in a one-rank model.
# The shared-memory all-reduce of a decode step is an op torch.compile keeps inside its graph;
# the other collectives are sync points that torch.compile leaves alone (out_of_graphs).


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


@contextmanager
def guarded(op: str, ranks: tuple[int, ...], peer: int | None = None) -> Iterator[None]:
    """Turn a backend failure inside the block into one CollectiveError line about op over ranks."""
    try:
        yield
    except CollectiveError:
        raise
    except (RuntimeError, TimeoutError) as e:  # torch.distributed.DistError is a RuntimeError
        raise collective_error(op, ranks, e, peer) from e


def collective_error(op: str, ranks: tuple[int, ...], e: BaseException, peer: int | None = None) -> CollectiveError:
    """CollectiveError for a failed op; peer: the silent rank when known (the other one of a pair)."""
    lines = [x for x in str(e).splitlines() if x.strip()]
    cause = re.sub(r"^\[[^\]]*\]\s*", "", lines[0].strip()) if lines else type(e).__name__  # drop [file.cc:N]
    cause = cause.split(". ")[0].rstrip(".")  # gloo appends advice sentences; the first says what happened
    me = dist.get_rank() if dist.is_initialized() else None
    others = [r for r in ranks if r != me]
    if peer is None and len(others) == 1:
        peer = others[0]
    who = f"rank {peer}" if peer is not None else f"a peer among ranks {', '.join(map(str, others))}"
    group = ", ".join(map(str, ranks))
    if "timed out" in cause.lower() or "timeout" in cause.lower():
        return CollectiveError(
            f"{op} over ranks ({group}): {who} did not answer within runtime.timeout_s "
            f"({cause}); it is stopped, hung or unreachable"
        )
    return CollectiveError(f"{op} over ranks ({group}): lost {who} ({cause})")


def _all_reduce(x: Tensor, group: Group) -> Tensor:
    with guarded("all_reduce", group.ranks):
        dist.all_reduce(x, group=group.pg)
    return x


def all_gather(x: Tensor, group: Group, sizes: list[int], dim: int = -1) -> Tensor:
    """Concatenate every rank's x along dim; rank r contributes sizes[r] entries (uneven is fine)."""
    return x if group.size == 1 else _all_gather(x, group, sizes, dim)


def _all_gather(x: Tensor, group: Group, sizes: list[int], dim: int) -> Tensor:
    dim = dim % x.dim()
    if group.shm is not None and group.shm.fits(
        x.narrow(dim, 0, 1).expand(*x.shape[:dim], max(sizes), *x.shape[dim + 1 :])
    ):
        return group.shm.all_gather(x, sizes, dim)
    width = max(sizes)
    if x.shape[dim] < width:  # gloo needs equal sizes: pad, gather, trim
        pad = list(x.shape)
        pad[dim] = width - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad)], dim=dim)
    parts = [torch.empty_like(x) for _ in range(group.size)]
    with guarded("all_gather", group.ranks):
        dist.all_gather(parts, x.contiguous(), group=group.pg)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim=dim)


def broadcast(x: Tensor, src: int, group: Group) -> Tensor:
    """Overwrite x with global rank src's x, in place, on every rank of the group."""
    return x if group.size == 1 else _broadcast(x, src, group)


def _broadcast(x: Tensor, src: int, group: Group) -> Tensor:
    if group.shm is not None and group.shm.fits(x):
        return group.shm.broadcast(x, group.ranks.index(src))
    with guarded(f"broadcast from rank {src}", group.ranks, src if src != dist.get_rank() else None):
        dist.broadcast(x, src, group=group.pg)
    return x


def broadcast_object(obj: object, src: int, group: Group) -> object:
    """Global rank src's picklable obj, on every rank of the group."""
    if group.size == 1:
        return obj
    box = [obj]
    with guarded(f"broadcast_object from rank {src}", group.ranks, src if src != dist.get_rank() else None):
        dist.broadcast_object_list(box, src, group=group.pg)
    return box[0]


def recv(x: Tensor, src: int) -> Tensor:
    """Point-to-point receive from global rank src into x; waits at most the world group's timeout."""
    with guarded(f"recv from rank {src}", tuple(sorted((dist.get_rank(), src))), src):
        dist.recv(x, src)
    return x


class Sent:
    """A pending isend: wait() before reusing the tensor."""

    def __init__(self, work: dist.Work, dst: int):
        self.work, self.dst = work, dst

    def wait(self) -> None:
        with guarded(f"send to rank {self.dst}", tuple(sorted((dist.get_rank(), self.dst))), self.dst):
            self.work.wait()


def isend(x: Tensor, dst: int) -> Sent:
    """Non-blocking send to global rank dst."""
    with guarded(f"send to rank {dst}", tuple(sorted((dist.get_rank(), dst))), dst):
        return Sent(dist.isend(x.contiguous(), dst), dst)


def barrier(group: Group) -> None:
    """Wait until every rank of the group arrives (at most the group's timeout)."""
    if group.size > 1:
        with guarded("barrier", group.ranks):
            dist.barrier(group=group.pg)


@functools.cache
def out_of_graphs() -> None:
    """Make torch.compile run the gloo / shared-memory collectives above between its graphs, not
    trace them. fast_decode calls this before it compiles; eager runs never do, because
    torch.compiler.disable imports torch._dynamo (~70 MiB of memory and ~1.3 s at start-up)."""
    global _all_reduce, _all_gather, _broadcast
    _all_reduce, _all_gather, _broadcast = map(torch.compiler.disable, (_all_reduce, _all_gather, _broadcast))
