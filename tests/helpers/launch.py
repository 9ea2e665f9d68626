"""The torchrun command line the multi-rank CLI tests start."""

from __future__ import annotations

import sys


def torchrun_cmd(nproc: int, *args: str, launcher: tuple[str, ...] = ()) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc-per-node N [launcher...] -m llama3_dist ARGS...`."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return [*run, *launcher, "-m", "llama3_dist", *args]
