"""`llama3-dist bench --serve URL`: a running server under 1, 2, 4, 8 concurrent streaming clients.

Every client sends the same kind of request (fixed pseudo-random prompt ids, greedy, ignore_eos,
--new-tokens tokens) and reads the stream; a round starts all its clients at once. Reported per
round: aggregate output tok/s (all tokens / the round's wall time), time to first token and
inter-token latency (gaps between a stream's chunks) at p50 / p99, and, next to it, the same
prompts run as one static batch through `generate` in this process (the model built from --set,
so give it the server's settings). Last, a late arrival: one request sent while 7 others decode,
against its prefill alone plus two decode steps.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import httpx
import torch

from ..assemble import assemble
from ..config import SamplingParams, load_config
from ..errors import UserError
from ..generate import generate
from .engines import prompt_ids


@dataclass
class Stream:
    """One streamed request's clock: when it was sent, when each chunk came, how many tokens it made."""

    sent: float = 0.0
    chunks: list[float] = field(default_factory=list)
    tokens: int = 0
    first: threading.Event = field(default_factory=threading.Event)

    @property
    def ttft(self) -> float:
        return self.chunks[0] - self.sent

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:])]


def stream_one(
    url: str, model: str, prompt: list[int], new_tokens: int, timeout: float, s: Stream | None = None
) -> Stream:
    s = s or Stream()
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": new_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    s.sent = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            raise UserError(f"bench --serve: the server answered {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[len("data: ") :])
            if "error" in obj:
                raise UserError(f"bench --serve: the server failed a request: {obj['error']['message']}")
            if obj["choices"] and obj["choices"][0]["text"]:
                s.chunks.append(time.perf_counter())
                s.first.set()
            if obj.get("usage"):
                s.tokens = obj["usage"]["completion_tokens"]
    return s


def run_clients(
    url: str, model: str, prompts: list[list[int]], new_tokens: int, timeout: float
) -> tuple[list[Stream], float]:
    """All prompts at once, one thread each; the streams and the round's wall time."""
    out: list[Stream | BaseException | None] = [None] * len(prompts)

    def client(i: int) -> None:
        try:
            out[i] = stream_one(url, model, prompts[i], new_tokens, timeout)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            out[i] = e

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    wall = time.perf_counter() - start
    for x in out:
        if isinstance(x, BaseException):
            raise x
        if x is None:
            raise UserError(f"bench --serve: a request took longer than {timeout:g}s")
    return out, wall


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] if xs else float("nan")


def late_arrival(url: str, model: str, prompts: list[list[int]], new_tokens: int, timeout: float) -> float:
    """TTFT of one request sent once 7 others have their first token (they run long enough to outlast it)."""
    others = [Stream() for _ in prompts[:7]]
    errors: list[BaseException] = []

    def background(p: list[int], s: Stream) -> None:
        try:
            stream_one(url, model, p, 4 * new_tokens, timeout, s)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
            s.first.set()

    threads = [threading.Thread(target=background, args=(p, s)) for p, s in zip(prompts[:7], others)]
    for t in threads:
        t.start()
    for s in others:  # all 7 past their prefill: decoding
        s.first.wait(timeout)
    if errors:
        raise errors[0]
    late = stream_one(url, model, prompts[7], 2, timeout)
    for t in threads:
        t.join(timeout)
    if errors:
        raise errors[0]
    return late.ttft


def static_batch(ready, prompts: list[list[int]], new_tokens: int) -> float:
    """Aggregate output tok/s of the prompts as one generate() batch, prefill included."""
    start = time.perf_counter()
    out = generate(ready.model, ready.mesh, prompts, SamplingParams(new_tokens, temperature=0.0), frozenset())
    wall = time.perf_counter() - start
    return sum(len(c.tokens) for c in out) / wall


def run_serving_bench(args) -> dict:
    url = args.serve.rstrip("/")
    try:
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, ValueError) as e:
        raise UserError(
            f"bench --serve {url}: no llama3-dist server answers there ({e}); start one with `llama3-dist serve`"
        ) from None
    clients = sorted({int(c) for c in args.clients.split(",")})
    if not clients or min(clients) < 1:
        raise UserError("bench --clients: give client counts >= 1, e.g. 1,2,4,8")
    torch.set_num_threads(args.threads)
    sets = [f"runtime.compile={'false' if args.eager else 'true'}", *args.set]
    cfg = load_config(None, sets)
    cfg.runtime.max_batch_size = max(clients + [8])
    cfg.runtime.max_seq_len = args.prompt_len + 4 * args.new_tokens
    ready = assemble(cfg, warm=(cfg.runtime.max_batch_size, cfg.runtime.max_seq_len))
    prompts = prompt_ids(ready.ckpt.args.vocab_size, max(clients + [8]), args.prompt_len)
    run_clients(url, model, prompts[:1], 4, args.timeout)  # the server's first request pays for nothing here
    rounds = []
    for c in clients:
        streams, wall = run_clients(url, model, prompts[:c], args.new_tokens, args.timeout)
        gaps = [g for s in streams for g in s.gaps]
        rounds.append(
            {
                "clients": c,
                "tok_s": sum(s.tokens for s in streams) / wall,
                "ttft_p50_ms": 1e3 * pct([s.ttft for s in streams], 50),
                "ttft_p99_ms": 1e3 * pct([s.ttft for s in streams], 99),
                "itl_p50_ms": 1e3 * pct(gaps, 50),
                "itl_p99_ms": 1e3 * pct(gaps, 99),
            }
        )
    late = late_arrival(url, model, prompts, args.new_tokens, args.timeout)
    static_batch(ready, prompts[:1], 4)
    for r in rounds:
        r["static_tok_s"] = static_batch(ready, prompts[: r["clients"]], args.new_tokens)
    alone = next((r for r in rounds if r["clients"] == 1), None)
    busy = max(rounds, key=lambda r: r["clients"])
    result = {
        "model": model,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "rounds": rounds,
        "late_ttft_ms": 1e3 * late,
    }
    if alone is not None:
        # a lone request's TTFT is its prefill plus one engine step; add two of the busy batch's steps
        result["late_ttft_bound_ms"] = 2 * (alone["ttft_p50_ms"] + 2 * busy["itl_p50_ms"])
    return result


def serving_table(result: dict) -> str:
    head = [
        "clients",
        "tok/s",
        "static batch tok/s",
        "serve/static",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "ITL p50 ms",
        "ITL p99 ms",
    ]
    body = [
        [
            str(r["clients"]),
            f"{r['tok_s']:.1f}",
            f"{r['static_tok_s']:.1f}",
            f"{r['tok_s'] / r['static_tok_s']:.2f}x",
            f"{r['ttft_p50_ms']:.0f}",
            f"{r['ttft_p99_ms']:.0f}",
            f"{r['itl_p50_ms']:.1f}",
            f"{r['itl_p99_ms']:.1f}",
        ]
        for r in result["rounds"]
    ]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *body]]
    rounds = {r["clients"]: r for r in result["rounds"]}
    if 1 in rounds and len(rounds) > 1:
        top = max(rounds)
        lines.append(f"{top} clients / 1 client aggregate tok/s: {rounds[top]['tok_s'] / rounds[1]['tok_s']:.2f}x")
    late = f"request arriving while 7 decode: TTFT {result['late_ttft_ms']:.0f} ms"
    if "late_ttft_bound_ms" in result:
        late += f" (target <= 2 x (prefill alone + 2 steps) = {result['late_ttft_bound_ms']:.0f} ms)"
    lines.append(late)
    lines.append(
        f"{result['model']}, prompt {result['prompt_len']} tokens, {result['new_tokens']} new tokens each, "
        f"greedy, ignore_eos"
    )
    return "\n".join(lines)
