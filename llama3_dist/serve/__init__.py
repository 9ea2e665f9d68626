"""`llama3-dist serve`: an OpenAI-compatible server with continuous batching, on every parallel layout.

World rank 0 answers HTTP (api.py, in a thread) and schedules (scheduler.py); every rank runs the
same step loop (engine.py) on the control messages rank 0 broadcasts (control.py).
"""

from __future__ import annotations

import logging
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

from ..assemble import assemble
from ..checkpoint import default_checkpoint
from ..config import Config
from ..generate import warm_up
from ..parallel.mesh import shutdown, world_from_env
from .api import HttpServer, ServerState, create_app
from .engine import Engine, EngineFailed
from .metrics import Metrics
from .scheduler import Scheduler

__all__ = ["EngineFailed", "checkpoint_name", "serve"]

log = logging.getLogger(__name__)

QUANT_SUFFIX = re.compile(r"[.-](q\d[\w]*|iq\d[\w]*|f16|f32|bf16|fp16|fp32)$", re.IGNORECASE)


def checkpoint_name(path: str | Path) -> str:
    """The name a checkpoint is served under: its file or directory name, without extension or quantization.

    SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct; Meta-Llama-3-8B/original -> Meta-Llama-3-8B.
    """
    p = Path(path).expanduser().resolve()
    name = p.parent.name if p.is_dir() and p.name == "original" else p.name
    if p.is_file():
        name = name.removesuffix(p.suffix)
    return QUANT_SUFFIX.sub("", name) or name


def serve(cfg: Config, announce: Callable[[str], None]) -> None:
    """Load the model, serve until SIGTERM / SIGINT (rank 0) or a failure; announce(line) once ready.

    Raises EngineFailed when a rank dies or stops answering.
    """
    rank = world_from_env()[0]
    s, r = cfg.serve, cfg.runtime
    if r.compile is None:  # fast by default: serving runs long enough to repay compiling
        r.compile = True
    http = state = None
    if rank == 0:
        name = s.model_name or checkpoint_name(cfg.model.checkpoint or default_checkpoint())
        state = ServerState(name, r.max_seq_len, r.max_batch_size, Metrics(r.max_batch_size))
        http = HttpServer(create_app(state), s.host, s.port)  # /health says 503 while loading
        log.info("loading the model; GET /health answers 503 until it is ready")
    try:
        ready = assemble(cfg, warm=(r.max_batch_size, r.max_seq_len))
        if ready.model.decode_step is not None:  # a lone request's batch of one is a shape of its own
            warm_up(ready.model, ready.mesh, 1, r.max_seq_len, cfg.parallel.microbatches)
        engine = Engine(
            ready.model, ready.mesh, r.max_batch_size, r.max_seq_len, cfg.parallel.microbatches, r.timeout_s
        )
        scheduler = None
        if rank == 0:
            scheduler = Scheduler(
                ready.tokenizer, r.max_batch_size, s.max_queue, s.heartbeat(r.timeout_s), state.metrics
            )
            state.tokenizer, state.scheduler = ready.tokenizer, scheduler
            announce(f"listening on http://{s.host}:{http.port}")
        handle_signals(scheduler, s.shutdown_grace_s)
        try:
            engine.run(scheduler)
        except BaseException as e:  # a failed collective, or a bug: no client may wait on a dead engine
            if scheduler is not None:
                scheduler.fail(str(e) or type(e).__name__)
            raise
    finally:
        if http is not None:
            http.stop()
    shutdown()


def handle_signals(scheduler: Scheduler | None, grace_s: float) -> None:
    """Rank 0: SIGTERM / SIGINT stop taking requests and end the server (a second one exits at once).

    Other ranks ignore them (torchrun signals every worker): they leave when rank 0 says stop, or
    when rank 0 is gone and their next collective fails.
    """
    if scheduler is None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        return

    def on_signal(signum, frame):
        if scheduler.closing_at is not None:
            os._exit(128 + signum)
        log.info("%s: finishing in-flight requests (up to %gs), then exiting", signal.Signals(signum).name, grace_s)
        scheduler.close(grace_s)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
