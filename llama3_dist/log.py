"""Diagnostics to stderr through `logging`; rank 0 logs INFO, other ranks only warnings."""
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
    if rank == 0:
        root.setLevel(logging.DEBUG if verbose else logging.INFO)
    else:
        root.setLevel(logging.WARNING)
