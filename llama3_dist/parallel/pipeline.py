"""Pipeline stages: which contiguous layers each stage owns."""
from __future__ import annotations

from ..config import ConfigError, ParallelConfig
from ..model import ModelArgs
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
        raise ConfigError(f"parallel.stage_layers: {counts} sums to {sum(counts)}, "
                          f"but the model has {args.n_layers} layers")
    start = sum(counts[: mesh.stage])
    return range(start, start + counts[mesh.stage])
