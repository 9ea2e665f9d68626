"""Rank 0's side of the step loop: the FIFO queue, which sequence holds which slot, and when each one ends.

The HTTP side (another thread) submits and aborts sequences through a thread-safe inbox and gets
every token back through the sequence's `emit` callback; the engine asks `next_control()` before
each step and hands the step's tokens to `absorb()`.
"""

from __future__ import annotations

import codecs
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..config import SamplingParams
from .control import Control, NewRow, StepResult, TokenLogprobs
from .metrics import Metrics


class Unavailable(Exception):
    """The server takes no new requests: it is shutting down, or the engine failed."""


class QueueFull(Exception):
    """More requests wait than serve.max_queue allows."""


@dataclass
class Output:
    """News of one sequence: released text, the token behind it, and at the end a finish reason or an error."""

    index: int  # the choice this sequence is, within its request
    text: str = ""
    token: int | None = None
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    finish_reason: str | None = None  # "stop" | "length" on the last output
    stop: str | None = None  # with "stop": the stop string, or stop token's text, that ended it (None: EOS)
    error: str | None = None  # the engine failed or the server shut down: the last output


class TextStream:
    """Token ids -> text, holding back an unfinished UTF-8 character and any tail that could begin a stop string."""

    def __init__(self, tok, stops: list[str]):
        self.tok, self.stops = tok, stops
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.held = ""
        self.hit: str | None = None  # the stop string that appeared

    def push(self, token: int) -> tuple[str, bool]:
        """Text now safe to release, and whether a stop string appeared (the text before it is released)."""
        self.held += self.decoder.decode(self.tok.decode_bytes([token]))
        hits = [(i, s) for i, s in ((self.held.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            i, self.hit = min(hits, key=lambda h: h[0])
            out, self.held = self.held[:i], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        cut = len(self.held) - keep
        out, self.held = self.held[:cut], self.held[cut:]
        return out, False

    def flush(self) -> str:
        """Everything held back, at the end of a sequence that did not stop on a stop string."""
        out, self.held = self.held + self.decoder.decode(b"", final=True), ""
        return out


class Sequence:
    """One choice of one request: its prompt, settings, progress and where its outputs go."""

    def __init__(
        self,
        index: int,
        prompt: list[int],
        params: SamplingParams,
        emit: Callable[[Output], None],
        stop: list[str] = (),
        stop_ids: frozenset[int] = frozenset(),
        logprobs: int | None = None,
        echo: bool = False,
        ignore_eos: bool = False,
        stop_token_ids: frozenset[int] = frozenset(),
    ):
        self.index, self.prompt, self.params, self.emit = index, prompt, params, emit
        self.stop, self.stop_ids = list(stop), stop_ids  # stop strings; stop tokens beyond the tokenizer's
        self.stop_token_ids = stop_token_ids  # vLLM's: tokens that end the text, themselves included
        self.logprobs, self.echo, self.ignore_eos = logprobs, echo, ignore_eos
        self.n_generated = 0
        self.arrival = time.perf_counter()
        self.last_token_at: float | None = None
        self.text: TextStream | None = None


class Scheduler:
    """FIFO admission into the free slots, stop decisions, aborts, and the heartbeat of an idle server."""

    def __init__(self, tokenizer, n_slots: int, max_queue: int, heartbeat_s: float, metrics: Metrics):
        self.tok, self.n_slots, self.max_queue, self.heartbeat_s = tokenizer, n_slots, max_queue, heartbeat_s
        self.metrics = metrics
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}
        self.to_free: list[int] = []
        self.lock = threading.Lock()
        self.pending = 0  # sequences submitted and not yet ended (under lock)
        self.failed: str | None = None
        self.closing_at: float | None = None  # SIGTERM: end what is left at this time

    # --- the HTTP thread ---

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue a request's sequences; raises Unavailable or QueueFull (nothing queued then)."""
        with self.lock:
            if self.failed is not None:
                raise Unavailable(f"the engine failed: {self.failed}")
            if self.closing_at is not None:
                raise Unavailable("the server is shutting down")
            if self.pending + len(seqs) - self.n_slots > self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting (serve.max_queue); retry later")
            self.pending += len(seqs)
        self.inbox.put(("submit", seqs))

    def abort(self, seqs: list[Sequence]) -> None:
        """The client went away: drop these sequences and free their slots at the next step."""
        self.inbox.put(("abort", seqs))

    def close(self, grace_s: float) -> None:
        """Stop taking requests; those in flight get grace_s to finish, then end with an error."""
        with self.lock:
            if self.closing_at is None:
                self.closing_at = time.monotonic() + grace_s
        self.inbox.put(("wake", None))

    @property
    def busy_slots(self) -> int:
        return len(self.running)

    @property
    def n_waiting(self) -> int:
        return len(self.waiting)

    # --- the engine thread ---

    def next_control(self) -> Control:
        """The next step's control: frees, admissions, stop; an empty one is a decode step or a heartbeat."""
        idle = not self.running and not self.waiting and not self.to_free
        try:
            item = self.inbox.get(timeout=self.heartbeat_s) if idle else self.inbox.get_nowait()
            while True:
                self._handle(*item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass
        if self.closing_at is not None and (not (self.running or self.waiting) or time.monotonic() >= self.closing_at):
            self.end_all("the server is shutting down")
            return Control(stop=True)
        new = []
        free = sorted(set(range(self.n_slots)) - set(self.running))
        while self.waiting and free:
            seq, slot = self.waiting.popleft(), free.pop(0)
            self.running[slot] = seq
            new.append(NewRow(slot, seq.prompt, seq.params, seq.logprobs, seq.echo and seq.logprobs is not None))
            self.metrics.prompt_tokens.inc(len(seq.prompt))
        ctrl = Control(new=new, free=self.to_free)
        self.to_free = []
        self._gauges()
        return ctrl

    def absorb(self, result: StepResult) -> None:
        """Hand each slot's new token to its sequence; end the ones that are done (freed next step)."""
        now = time.perf_counter()
        for slot, token in result.tokens.items():
            seq = self.running[slot]
            if seq.text is None:  # its first token
                seq.text = TextStream(self.tok, seq.stop)
                self.metrics.ttft.observe(now - seq.arrival)
            else:
                self.metrics.itl.observe(now - seq.last_token_at)
            seq.last_token_at = now
            out = Output(
                seq.index,
                token=token,
                logprobs=result.logprobs.get(slot),
                prompt_logprobs=result.prompt_logprobs.get(slot),
            )
            seq.n_generated += 1
            self.metrics.generation_tokens.inc()
            if token in seq.stop_ids or (token in self.tok.stop_ids and not seq.ignore_eos):
                out.text, out.finish_reason = seq.text.flush(), "stop"
                out.stop = self.tok.decode([token]) if token in seq.stop_ids else None
                out.token = out.logprobs = None  # the stop token is not part of the completion
                seq.n_generated -= 1
            else:
                out.text, stopped = seq.text.push(token)
                if stopped:
                    out.finish_reason, out.stop = "stop", seq.text.hit
                elif token in seq.stop_token_ids:
                    out.text += seq.text.flush()
                    out.finish_reason, out.stop = "stop", self.tok.decode([token])
                elif seq.n_generated == seq.params.max_new_tokens:
                    out.text += seq.text.flush()
                    out.finish_reason = "length"
            if out.finish_reason is not None:
                self._end(slot)
                self.metrics.finished.labels(out.finish_reason).inc()
            seq.emit(out)
        self._gauges()

    def fail(self, message: str) -> None:
        """The engine is gone: every sequence in flight ends with this error, new requests get 503."""
        with self.lock:
            self.failed = message
        while True:  # sequences submitted but not yet seen by the engine
            try:
                self._handle(*self.inbox.get_nowait())
            except queue.Empty:
                break
        self.end_all(f"the engine failed: {message}")

    def end_all(self, error: str) -> None:
        for slot, seq in list(self.running.items()):
            self._end(slot)
            seq.emit(Output(seq.index, error=error))
        while self.waiting:
            seq = self.waiting.popleft()
            self._release(1)
            seq.emit(Output(seq.index, error=error))
        self._gauges()

    def _handle(self, kind: str, seqs) -> None:
        if kind == "submit":
            self.waiting.extend(seqs)
        elif kind == "abort":
            for seq in seqs:
                slot = next((s for s, x in self.running.items() if x is seq), None)
                if slot is not None:
                    self._end(slot)
                elif seq in self.waiting:
                    self.waiting.remove(seq)
                    self._release(1)

    def _end(self, slot: int) -> None:
        del self.running[slot]
        self.to_free.append(slot)
        self._release(1)

    def _release(self, n: int) -> None:
        with self.lock:
            self.pending -= n

    def _gauges(self) -> None:
        self.metrics.running.set(len(self.running))
        self.metrics.waiting.set(len(self.waiting))
        self.metrics.slots_in_use.set(len(self.running))
