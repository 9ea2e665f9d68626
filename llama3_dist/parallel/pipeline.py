"""Pipeline stages: which contiguous layers each stage owns, and the micro-batched forward pass.

Activations move from stage k to stage k + 1 point to point, between ranks with the same tp-rank;
the last stage's logits stay there (its tp-rank 0 samples and broadcasts the tokens).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..args import ModelArgs
from ..config import ParallelConfig
from ..errors import ConfigError
from .comm import isend, recv
from .layers import even_split
from .mesh import Mesh


def layer_bytes(args: ModelArgs) -> tuple[int, int, int]:
    """Parameter counts of (one layer, the embedding, the final norm + head)."""
    d, hd, f, v = args.dim, args.hd, args.hidden_dim, args.vocab_size
    layer = d * hd * (2 * args.n_heads + 2 * args.n_kv_heads) + 3 * d * f + 2 * d
    return layer, v * d, d + v * d


def balance_stages(args: ModelArgs, stages: int) -> list[int]:
    """Layers per stage so each stage holds about the same parameter bytes (embedding on the first,
    norm + head on the last); every stage gets at least one layer."""
    if stages > args.n_layers:
        raise ConfigError(f"parallel.pipeline: {stages} stages but the model has only {args.n_layers} layers")
    layer, first, last = layer_bytes(args)
    counts = [1] * stages
    load = [layer + first * (s == 0) + last * (s == stages - 1) for s in range(stages)]
    for _ in range(args.n_layers - stages):  # give each remaining layer to the lightest stage
        s = min(range(stages), key=lambda i: (load[i], i))
        counts[s] += 1
        load[s] += layer
    return counts


def stage_layer_ids(args: ModelArgs, parallel: ParallelConfig, mesh: Mesh) -> range:
    """The contiguous global layer ids this rank's stage owns."""
    counts = parallel.stage_layers or balance_stages(args, mesh.n_stages)
    if sum(counts) != args.n_layers:
        raise ConfigError(
            f"parallel.stage_layers: {counts} sums to {sum(counts)}, but the model has {args.n_layers} layers"
        )
    start = sum(counts[: mesh.stage])
    return range(start, start + counts[mesh.stage])


def send_forward(x: Tensor, mesh: Mesh):
    """Hand this stage's activations to the same tp-rank of the next stage (non-blocking)."""
    return isend(x, mesh.pp.ranks[mesh.stage + 1])


def recv_forward(shape: tuple[int, ...], dtype: torch.dtype, mesh: Mesh) -> Tensor:
    """Activations from the same tp-rank of the previous stage."""
    return recv(torch.empty(shape, dtype=dtype, device=mesh.device), mesh.pp.ranks[mesh.stage - 1])


def run_stages(
    model: nn.Module,
    mesh: Mesh,
    tokens: Tensor,
    pos: Tensor,
    last: Tensor | None,
    microbatches: int,
    first_row: int = 0,
) -> Tensor | None:
    """One forward pass of the whole pipeline (model: this stage's Transformer) over a batch split into micro-batches.

    The batch's sequences live in cache rows first_row.. (the server prefills one slot at a time).

    Stage k starts micro-batch i + 1 as soon as it has sent micro-batch i, so stage k + 1 works on
    micro-batch i while stage k works on i + 1. Returns the logits (B, 1 or T, vocab) on the last
    stage and None elsewhere.
    """
    B, T = tokens.shape
    pending, outs = [], []
    for start, stop in even_split(B, microbatches):
        if start == stop:
            continue
        if mesh.is_pp_first_stage:
            x = tokens[start:stop]
        else:
            x = recv_forward((stop - start, T, model.args.dim), model.dtype, mesh)
        y = model(
            x,
            pos[start:stop],
            None if last is None else last[start:stop],
            model.cache.rows(first_row + start, first_row + stop),
        )
        if mesh.is_pp_last_stage:
            outs.append(y)
        else:
            pending.append((send_forward(y, mesh), y))  # keep y alive until the send completes
    for work, _ in pending:
        work.wait()
    return torch.cat(outs) if outs else None
