"""run_ranks(): spawn real gloo ranks on this host, run a function on each, re-raise the first failure."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import time
import traceback
from datetime import timedelta

TIMEOUT_S = 240.0


def _worker(fn, rank: int, world_size: int, init_file: str, layout: tuple[int, int, bool], args, results) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "OMP_NUM_THREADS": "1",
        }
    )
    try:
        import torch
        import torch.distributed as dist

        from llama3_dist.parallel.mesh import build_mesh

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
        )
        mesh = build_mesh(layout[0], layout[1], torch.device("cpu"), shm=layout[2], timeout_s=60)
        # plain pickle copies tensors into the message: the queue's own pickler would pass a shared-memory
        # fd that the parent can only collect while this process is alive
        results.put((rank, True, pickle.dumps(fn(mesh, *args))))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        results.put((rank, False, traceback.format_exc()))


def run_ranks(
    fn,
    world_size: int,
    *args,
    tensor: int | None = None,
    pipeline: int = 1,
    timeout: float = TIMEOUT_S,
    outcomes: bool = False,
    shm: bool = False,
) -> list:
    """fn(mesh, *args) on `world_size` gloo ranks (tensor x pipeline); returns each rank's result.

    shm=True gives the tensor-parallel groups the shared-memory collectives (parallel.collectives=shm).

    By default the first failing rank's traceback is raised at once. With outcomes=True every rank
    is waited for and (ok, result-or-traceback, seconds) is returned per rank instead.
    """
    tensor = world_size // pipeline if tensor is None else tensor
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "llama3_dist.model"])
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_worker, args=(fn, r, world_size, init_file, (tensor, pipeline, shm), args, results))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        out: dict[int, object] = {}
        start = time.monotonic()
        try:
            while len(out) < world_size:
                try:
                    rank, ok, value = results.get(timeout=max(0.1, start + timeout - time.monotonic()))
                except queue.Empty:
                    raise TimeoutError(
                        f"ranks {sorted(set(range(world_size)) - set(out))} did not finish within {timeout:.0f} s"
                    ) from None
                value = pickle.loads(value) if ok else value
                if outcomes:
                    out[rank] = (ok, value, time.monotonic() - start)
                elif not ok:
                    raise RuntimeError(f"rank {rank} failed:\n{value}")
                else:
                    out[rank] = value
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.terminate()
                    p.join()
    return [out[r] for r in range(world_size)]
