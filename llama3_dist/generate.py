"""Batched KV-cache generation: prefill once, then decode one token per step. Returns data, never prints.

Prompts of different lengths share one batch: they are right-padded for the prefill and each row
then decodes at its own position, so a row gives the tokens it would give alone. One rank samples
(tp-rank 0 of the last stage) and broadcasts, so every rank feeds the same tokens next step and
takes the same decision to stop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import SamplingParams
from .errors import UserError
from .model import Transformer
from .parallel.comm import broadcast
from .parallel.mesh import Mesh
from .parallel.pipeline import run_stages


class GenerationError(UserError):
    """A prompt or a generation setting cannot be served."""


@dataclass
class Completion:
    prompt_tokens: list[int]
    tokens: list[int]  # generated ids, stop token excluded
    finish_reason: str  # "stop" | "length"
    prefill_ms: float
    decode_tokens_per_s: float


def check_prompts(prompts: list[list[int]], max_new_tokens: int, max_seq_len: int, max_batch_size: int) -> None:
    """Reject empty prompts, too many prompts and prompts that cannot fit max_seq_len."""
    if not prompts:
        raise GenerationError("no prompt given: pass --prompt TEXT (repeatable)")
    if len(prompts) > max_batch_size:
        raise GenerationError(
            f"{len(prompts)} prompts exceed runtime.max_batch_size={max_batch_size}; "
            f"raise it with --set runtime.max_batch_size={len(prompts)}"
        )
    for i, p in enumerate(prompts):
        if not p:
            raise GenerationError(f"prompt {i} is empty: give some text")
        if len(p) + max_new_tokens > max_seq_len:
            raise GenerationError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that exceeds "
                f"runtime.max_seq_len={max_seq_len}; shorten it, lower --max-new-tokens or "
                f"--set runtime.max_seq_len={len(p) + max_new_tokens}"
            )


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """Next token per row from float logits (B, V): greedy at temperature 0, else top-k, min-p, then top-p."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    # subtract the max before dividing: the top logit becomes 0 and the rest <= 0, so a tiny
    # temperature drives them to -inf (probability 0), never to inf - inf = NaN
    z = logits.float()
    probs = torch.softmax((z - z.amax(dim=-1, keepdim=True)) / params.temperature, dim=-1)
    if params.top_k:
        kth = torch.topk(probs, min(params.top_k, probs.shape[-1]), dim=-1).values[:, -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if params.min_p:  # relative to the likeliest token, so it does not matter which filter runs first
        probs = probs.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    # keep the smallest prefix whose mass reaches top_p (the first token always survives)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs > params.top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(-1, keepdim=True), 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


class Penalties:
    """The history that presence, frequency and repetition penalties read, for B rows on the sampler
    rank: how often each token was generated, and which tokens were seen (prompt included)."""

    def __init__(self, prompts: list[list[int]], vocab: int, device: torch.device):
        self.counts = torch.zeros(len(prompts), vocab, device=device)
        self.seen = torch.zeros(len(prompts), vocab, dtype=torch.bool, device=device)
        for b, p in enumerate(prompts):
            self.seen[b, torch.tensor(p, dtype=torch.long, device=device)] = True

    def __call__(self, logits: Tensor, params: SamplingParams) -> Tensor:
        """Float logits (B, V) with the penalties applied, as vLLM applies them before sampling."""
        z = logits.float()
        if params.repetition_penalty != 1:
            r = params.repetition_penalty
            z = torch.where(self.seen, torch.where(z > 0, z / r, z * r), z)
        return z - params.frequency_penalty * self.counts - params.presence_penalty * (self.counts > 0)

    def add(self, tokens: Tensor) -> None:
        """Record each row's new token (B,)."""
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        self.counts[rows, tokens] += 1
        self.seen[rows, tokens] = True


class Sampler:
    """Runs one forward step on every rank and returns the sampled tokens, identical on all ranks."""

    def __init__(self, model: Transformer, mesh: Mesh, params: SamplingParams, microbatches: int, prompts):
        self.model, self.mesh, self.params, self.microbatches = model, mesh, params, microbatches
        self.generator = self.penalties = None
        if mesh.rank == mesh.sampler_rank and params.seed is not None:
            self.generator = torch.Generator(device=mesh.device).manual_seed(params.seed)
        if mesh.rank == mesh.sampler_rank and params.penalized:
            self.penalties = Penalties(prompts, model.args.vocab_size, mesh.device)

    def __call__(self, tokens: Tensor, pos: Tensor, last: Tensor | None = None) -> Tensor:
        logits = run_stages(self.model, self.mesh, tokens, pos, last, self.microbatches)
        if self.mesh.rank == self.mesh.sampler_rank:
            if self.penalties is None:
                nxt = sample(logits[:, -1], self.params, self.generator)
            else:
                nxt = sample(self.penalties(logits[:, -1], self.params), self.params, self.generator)
                self.penalties.add(nxt)
        else:
            nxt = torch.empty(tokens.shape[0], dtype=torch.long, device=self.mesh.device)
        return broadcast(nxt, self.mesh.sampler_rank, self.mesh.world)  # (B,)


def warm_up(model: Transformer, mesh: Mesh, batch: int, seq_len: int, microbatches: int = 1) -> None:
    """A tiny generation on caches of the final size, so compiling stays out of the timed run."""
    model.setup_caches(batch, seq_len)
    generate(model, mesh, [[0, 1]] * batch, SamplingParams(3, temperature=0.0), frozenset(), microbatches=microbatches)


@torch.inference_mode()
def generate(
    model: Transformer,
    mesh: Mesh,
    prompts: list[list[int]],
    params: SamplingParams,
    stop_ids: frozenset[int],
    on_token: Callable[[int, int], None] | None = None,
    microbatches: int = 1,
    stop_check: Callable[[list[int]], int | None] | None = None,
) -> list[Completion]:
    """Complete every prompt; on_token(row, token_id) is called as each kept token is produced.

    A row ends at a token of stop_ids, or when stop_check(its tokens) returns how many of them to
    keep (e.g. a stop string appeared). With pipeline stages, the batch flows through them as
    `microbatches` micro-batches.
    """
    device = mesh.device
    lens = torch.tensor([len(p) for p in prompts], device=device)
    B, T = len(prompts), int(lens.max())
    model.setup_caches(B, T + params.max_new_tokens)
    tokens = torch.zeros(B, T, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p, dtype=torch.long)
    step = Sampler(model, mesh, params, microbatches, prompts)

    start = time.perf_counter()
    nxt = step(tokens, torch.arange(T, device=device).expand(B, T), last=lens - 1)
    ids = nxt.tolist()  # on a GPU this waits for the prefill to finish
    prefill_s = time.perf_counter() - start

    out: list[list[int]] = [[] for _ in prompts]
    reason: list[str | None] = [None] * B
    decode_start = time.perf_counter()
    for i in range(params.max_new_tokens):
        for b, tok in enumerate(ids):
            if reason[b] is not None:
                continue
            if tok in stop_ids:
                reason[b] = "stop"
                continue
            out[b].append(tok)
            if on_token is not None:
                on_token(b, tok)
            keep = None if stop_check is None else stop_check(out[b])
            if keep is not None:
                del out[b][keep:]
                reason[b] = "stop"
            elif len(out[b]) == params.max_new_tokens:
                reason[b] = "length"
        if all(r is not None for r in reason):
            break
        nxt = step(nxt.unsqueeze(1), (lens + i).unsqueeze(1))  # each row at its own position
        ids = nxt.tolist()
    decode_s = time.perf_counter() - decode_start
    steps = i  # decode forward passes run after the prefill
    rate = steps / decode_s if steps and decode_s > 0 else 0.0
    return [Completion(p, o, r or "length", prefill_s * 1e3, rate) for p, o, r in zip(prompts, out, reason)]
