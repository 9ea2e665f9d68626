"""The command lines the CLI tests start: `python -m llama3_dist ...`, alone or under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil


def torchrun_cmd(nproc: int, *args: str, launcher: tuple[str, ...] = ()) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc-per-node N [launcher...] -m llama3_dist ARGS...`."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return [*run, *launcher, "-m", "llama3_dist", *args]


def workers(launcher_pid: int) -> dict[int, psutil.Process]:
    """The worker processes under a launcher (torchrun), by their RANK; helpers that have exited
    (zombies) or cannot be read are skipped."""
    out = {}
    for p in psutil.Process(launcher_pid).children(recursive=True):
        try:
            rank = p.environ().get("RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # ZombieProcess is a NoSuchProcess
            continue
        if rank is not None:
            out[int(rank)] = p
    return out


def run_cli(*args: str, nproc: int = 1, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m llama3_dist ARGS` (under torchrun when nproc > 1) to its end: text output captured, stdin
    closed, `env` on top of this process's environment, and a timeout, so a hang fails the test."""
    cmd = torchrun_cmd(nproc, *args) if nproc > 1 else [sys.executable, "-m", "llama3_dist", *args]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


# A greedy generation far longer than any fault test waits: a job is surely mid-generation when the fault lands.
LONG_PROMPT = "a"
LONG_GENERATION = [
    *("--prompt", LONG_PROMPT, "--max-new-tokens", "30000", "--temperature", "0"),
    *("--set", "runtime.max_seq_len=30002"),
]
