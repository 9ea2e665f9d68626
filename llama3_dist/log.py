"""Diagnostics to stderr through `logging`: rank 0 logs INFO, other ranks only warnings (all INFO if verbose)."""

from __future__ import annotations

import logging
import sys


def setup_logging(rank: int, verbose: bool = False) -> None:
    """Route the package's log records to stderr, tagged with the rank when it is not 0."""
    handler = logging.StreamHandler(sys.stderr)
    tag = f"[rank {rank}] " if rank else ""
    handler.setFormatter(logging.Formatter(f"llama3_dist: {tag}%(message)s"))
    root = logging.getLogger("llama3_dist")
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(logging.INFO if rank == 0 or verbose else logging.WARNING)


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory (Linux VmHWM), or None where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024
