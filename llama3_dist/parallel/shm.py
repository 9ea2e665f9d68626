"""Same-host collectives through shared memory: the CPU fast path beside gloo (parallel.collectives).

Every rank of a group maps one file in /dev/shm holding, twice over (even and odd calls alternate,
so a rank may write call n + 1 while a slower peer still reads call n), a flag and a data slot per
rank. A collective copies this rank's tensor into its slot, publishes the call number in its flag,
waits until every flag has reached it, and reads the slots. A gloo round trip between two
processes on this machine costs ~1.4 ms whatever the size; this costs microseconds, which is what
tensor parallelism on one CPU host needs (two all-reduces per layer per token). Tensors larger
than a slot (prefill activations) go through gloo, where bandwidth, not latency, is what counts.

Every rank reduces the slots in the same order, so all ranks get bit-identical results. Stores
are ordered on x86 (TSO): the data copy completes before the flag store that publishes it. A peer
process that has exited is noticed at once (its pid is in the segment); a hung one after timeout_s.
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

SHM_DIR = Path("/dev/shm")
SLOT_BYTES = 4 << 20  # per rank and parity: decode activations, logits and tokens fit


class ShmCollectives:
    """all_reduce / all_gather / broadcast among the `size` ranks of process group `pg` on one host."""

    by_key: dict[int, "ShmCollectives"] = {}  # lets a compiled graph name its group by an int

    def __init__(self, rank: int, size: int, pg: dist.ProcessGroup | None, timeout_s: float):
        self.rank, self.size, self.timeout_s = rank, size, timeout_s
        self.key = len(ShmCollectives.by_key)
        ShmCollectives.by_key[self.key] = self
        name = [f"llama3_dist-{uuid.uuid4().hex}" if rank == 0 else None]
        dist.broadcast_object_list(name, src=dist.get_global_rank(pg, 0) if pg is not None else 0, group=pg)
        path = SHM_DIR / name[0]
        header = 8 * 3 * size  # pids, then flags of the two parities
        if rank == 0:
            with open(path, "wb") as f:
                f.truncate(header + 2 * size * SLOT_BYTES)
        dist.barrier(group=pg)
        mem = torch.from_file(str(path), shared=True, size=header + 2 * size * SLOT_BYTES, dtype=torch.uint8)
        dist.barrier(group=pg)
        if rank == 0:
            path.unlink()  # the mappings stay valid; nothing is left behind in /dev/shm
        words = mem[:header].view(torch.int64)
        self.pids, self.flags = words[:size], words[size:].view(2, size)
        self.slots = mem[header:].view(2, size, SLOT_BYTES)
        self.pids[rank] = os.getpid()
        self.calls = 0
        dist.barrier(group=pg)

    def fits(self, x: Tensor) -> bool:
        return x.numel() * max(x.element_size(), 4) <= SLOT_BYTES

    def _publish(self, x: Tensor) -> Tensor:
        """Write x into this rank's slot of the next call, wait for every peer; (size, numel) view."""
        self.calls += 1
        parity = self.calls % 2
        slots = self.slots[parity, :, : x.numel() * x.element_size()].view(x.dtype)
        slots[self.rank].copy_(x.reshape(-1))
        self.flags[parity, self.rank] = self.calls
        self._wait(self.flags[parity])
        return slots

    def _wait(self, flags: Tensor) -> None:
        start = checked = time.monotonic()
        while int(flags.min()) < self.calls:
            os.sched_yield()  # hand the core to a peer that shares it
            now = time.monotonic()
            if now - checked > 0.5:
                checked = now
                self._check_peers(flags, now - start)

    def _check_peers(self, flags: Tensor, waited: float) -> None:
        for r, pid in enumerate(self.pids.tolist()):
            if int(flags[r]) < self.calls:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    raise RuntimeError(f"shm collective: rank {r} of the group (pid {pid}) has exited") from None
        if waited > self.timeout_s:
            raise TimeoutError(f"shm collective: a peer did not arrive within {self.timeout_s:.0f} s")

    def all_reduce(self, x: Tensor) -> Tensor:
        slots = self._publish(x)
        x.copy_(slots.sum(dim=0, dtype=torch.float32).view(x.shape))  # one order on every rank
        return x

    def all_gather(self, x: Tensor, sizes: list[int], dim: int) -> Tensor:
        """Every rank's x joined along dim; rank r contributes sizes[r] entries there."""
        moved = x.movedim(dim, -1)  # (..., n_local)
        padded = moved.new_zeros(*moved.shape[:-1], max(sizes))
        padded[..., : moved.shape[-1]] = moved
        slots = self._publish(padded)
        parts = [slots[r].view(padded.shape)[..., : sizes[r]] for r in range(self.size)]
        return torch.cat(parts, dim=-1).movedim(-1, dim)

    def broadcast(self, x: Tensor, src: int) -> Tensor:
        """x of group rank src on every rank."""
        slots = self._publish(x)
        x.copy_(slots[src].view(x.shape))
        return x
