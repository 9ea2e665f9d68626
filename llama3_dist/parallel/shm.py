"""Same-host collectives through shared memory: the CPU fast path beside gloo (parallel.collectives).

Every rank of a group maps one file in /dev/shm holding, twice over (even and odd calls alternate,
so a rank may write call n + 1 while a slower peer still reads call n), a flag and a data slot per
rank. A collective copies this rank's tensor into its slot, publishes the call number in its flag,
waits until every flag has reached it, and reads the slots. A gloo round trip between two
processes on this machine costs ~1.4 ms whatever the size; this costs microseconds, which is what
tensor parallelism on one CPU host needs (two all-reduces per layer per token). Tensors larger
than a slot (prefill activations) go through gloo, where bandwidth, not latency, is what counts.

Every rank reduces the slots in the same order, so all ranks get bit-identical results.

Memory ordering: this relies on x86-64's TSO model. A writer copies its data, then stores its flag;
x86 never reorders a store with an earlier store, so a peer that sees the flag sees the data (glibc's
non-temporal memcpy path ends in an sfence, which keeps that true for large copies). A reader loads
the flags, then the slots; x86 never reorders a load with an earlier load, so it reads the data that
was published. The two steps are separate calls into torch, so no compiler reorders them either.
Weakly ordered CPUs (ARM, POWER) give neither guarantee, and torch offers no fence to add from
Python, so `supported()` refuses them and the job uses the backend (gloo) instead.

Every wait is bounded: a peer process that has exited is noticed at once (its pid is in the
segment), a hung or stopped one after timeout_s; the error names the operation and the rank.

The segment file is created mode 0600 (owner only) and unlinked as soon as every rank has mapped
it, on every exit path; its name carries the creator's pid, so a segment left behind by a job
killed between creating and unlinking it (SIGKILL) is removed by the next job on this host, and
a uuid, so two jobs on one host never share one.
"""

from __future__ import annotations

import os
import platform
import re
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import CollectiveError

SHM_DIR = Path("/dev/shm")
SLOT_BYTES = 4 << 20  # per rank and parity: decode activations, logits and tokens fit
PREFIX = "llama3_dist-"
SEGMENT = re.compile(rf"{PREFIX}(\d+)-[0-9a-f]+$")  # llama3_dist-<creator pid>-<uuid>
TSO_MACHINES = ("x86_64", "amd64", "i386", "i686")


def supported() -> str | None:
    """None when shared-memory collectives are safe here, else why not (one short reason)."""
    machine = platform.machine()
    if machine.lower() not in TSO_MACHINES:
        return f"{machine} does not order stores like x86 (TSO), which the shared-memory collectives rely on"
    if not SHM_DIR.is_dir():
        return f"{SHM_DIR} is missing"
    return None


def remove_stale_segments(shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink this package's segments whose creating process is gone (a job killed mid-setup)."""
    removed = []
    for path in shm_dir.glob(f"{PREFIX}*"):
        m = SEGMENT.match(path.name)
        if m is None or _alive(int(m.group(1))):
            continue
        try:
            path.unlink()
            removed.append(path.name)
        except OSError:  # another user's segment, or already gone
            pass
    return removed


def _alive(pid: int) -> bool:
    """Whether process pid runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]  # the field after "(comm)"
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


class ShmUnavailable(Exception):
    """The segment could not be made (e.g. /dev/shm is full): use the backend instead."""


class ShmCollectives:
    """all_reduce / all_gather / broadcast among the `size` ranks of process group `pg` on one host."""

    by_key: dict[int, ShmCollectives] = {}  # lets a compiled graph name its group by an int

    def __init__(self, rank: int, size: int, pg: dist.ProcessGroup | None, timeout_s: float):
        self.rank, self.size, self.timeout_s = rank, size, timeout_s
        self.global_ranks = [dist.get_global_rank(pg, r) if pg is not None else r for r in range(size)]
        nbytes = 8 * 3 * size + 2 * size * SLOT_BYTES  # pids, flags of the two parities, then the slots
        # rank 0 creates the file and sends its name (or why it could not) to the others
        made = [create_segment(nbytes) if rank == 0 else None]
        dist.broadcast_object_list(made, src=self.global_ranks[0], group=pg)
        path, why = made[0]
        try:
            if why is not None:
                raise ShmUnavailable(why)
            mem = torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)
            dist.barrier(group=pg)
        finally:
            if rank == 0 and path is not None:
                Path(path).unlink(missing_ok=True)  # the mappings stay valid; nothing is left in /dev/shm
        header = 8 * 3 * size
        words = mem[:header].view(torch.int64)
        self.pids, self.flags = words[:size], words[size:].view(2, size)
        self.slots = mem[header:].view(2, size, SLOT_BYTES)
        self.pids[rank] = os.getpid()
        self.calls = 0
        self.key = len(ShmCollectives.by_key)
        ShmCollectives.by_key[self.key] = self
        dist.barrier(group=pg)

    def fits(self, x: Tensor) -> bool:
        return x.numel() * max(x.element_size(), 4) <= SLOT_BYTES

    def _publish(self, x: Tensor, op: str) -> Tensor:
        """Write x into this rank's slot of the next call, wait for every peer; (size, numel) view."""
        self.calls += 1
        parity = self.calls % 2
        slots = self.slots[parity, :, : x.numel() * x.element_size()].view(x.dtype)
        slots[self.rank].copy_(x.reshape(-1))
        self.flags[parity, self.rank] = self.calls
        self._wait(self.flags[parity], op)
        return slots

    def _wait(self, flags: Tensor, op: str) -> None:
        start = checked = time.monotonic()
        while int(flags.min()) < self.calls:
            os.sched_yield()  # hand the core to a peer that shares it
            now = time.monotonic()
            if now - checked > 0.5:
                checked = now
                self._check_peers(flags, now - start, op)

    def _check_peers(self, flags: Tensor, waited: float, op: str) -> None:
        late = [r for r in range(self.size) if int(flags[r]) < self.calls]
        ranks = ", ".join(map(str, self.global_ranks))
        for r in late:
            pid = int(self.pids[r])
            if not _alive(pid):
                raise CollectiveError(
                    f"shm {op} over ranks ({ranks}): rank {self.global_ranks[r]} (pid {pid}) has exited"
                )
        if waited > self.timeout_s:
            who = ", ".join(f"rank {self.global_ranks[r]} (pid {int(self.pids[r])})" for r in late)
            raise CollectiveError(
                f"shm {op} over ranks ({ranks}): {who} did not arrive within "
                f"runtime.timeout_s={self.timeout_s:g} s; it is stopped, hung or swapped out"
            )

    def all_reduce(self, x: Tensor) -> Tensor:
        slots = self._publish(x, "all_reduce")
        x.copy_(slots.sum(dim=0, dtype=torch.float32).view(x.shape))  # one order on every rank
        return x

    def all_gather(self, x: Tensor, sizes: list[int], dim: int) -> Tensor:
        """Every rank's x joined along dim; rank r contributes sizes[r] entries there."""
        moved = x.movedim(dim, -1)  # (..., n_local)
        padded = moved.new_zeros(*moved.shape[:-1], max(sizes))
        padded[..., : moved.shape[-1]] = moved
        slots = self._publish(padded, "all_gather")
        parts = [slots[r].view(padded.shape)[..., : sizes[r]] for r in range(self.size)]
        return torch.cat(parts, dim=-1).movedim(-1, dim)

    def broadcast(self, x: Tensor, src: int) -> Tensor:
        """x of group rank src on every rank."""
        slots = self._publish(x, "broadcast")
        x.copy_(slots[src].view(x.shape))
        return x


def create_segment(nbytes: int) -> tuple[str | None, str | None]:
    """(path, None) of a new owner-only segment of nbytes, its pages reserved; (None, why) if it cannot be."""
    remove_stale_segments()
    path = SHM_DIR / f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        return None, f"cannot create {path}: {e.strerror}"
    try:
        os.posix_fallocate(fd, 0, nbytes)  # a full /dev/shm fails here, not with SIGBUS mid-run
    except OSError as e:
        path.unlink(missing_ok=True)
        return None, f"{SHM_DIR} has no room for {nbytes >> 20} MiB ({e.strerror})"
    finally:
        os.close(fd)
    return str(path), None
