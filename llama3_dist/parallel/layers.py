"""Column-, row- and vocab-parallel layers, hand-written over `comm` (Megatron's names and split rules).

Each layer owns one contiguous slice of its full weight, recorded as `shard = (dim, start, stop)`
so a loader can read exactly that slice from disk. With a group of size 1 every layer is the
plain dense layer, so one model.py serves every layout.

A weight is float, or quantized in one of llama.cpp's block formats (`qtype`, kernels/quant.py):
then it is uint8 (rows, blocks x block bytes), and the loader sets `qtype` when it fills it, and
`int8_x` where the layer's input is rounded to int8 first (runtime.activations=int8).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kernels.quant import embedding, linear
from .comm import Group, all_gather, all_reduce

Span = tuple[int, int]


def even_split(n: int, parts: int) -> list[Span]:
    """Split range(n) into `parts` contiguous spans; the first n % parts spans get one more."""
    base, extra = divmod(n, parts)
    spans, start = [], 0
    for p in range(parts):
        stop = start + base + (p < extra)
        spans.append((start, stop))
        start = stop
    return spans


def feature_split(n: int, group: Group) -> Span:
    """This rank's span of n features, cut in whole blocks so that a quantized weight split along its
    input features splits on block boundaries: 256-feature blocks (K-quants) when they split evenly,
    else 32-feature blocks (uneven by at most one block), else single features."""
    size = group.size
    unit = 256 if n % (256 * size) == 0 else 32 if n % 32 == 0 and n >= 32 * size else 1
    start, stop = even_split(n // unit, size)[group.rank]
    return start * unit, stop * unit


def shard(full: Tensor, dim: int, rank: int, size: int) -> Tensor:
    """This rank's contiguous slice of `full` along dim (uneven splits allowed)."""
    start, stop = even_split(full.shape[dim], size)[rank]
    return full.narrow(dim, start, stop - start)


def head_spans(n_heads: int, n_kv_heads: int, rank: int, size: int) -> tuple[Span, Span]:
    """(query-head span, kv-head span) owned by `rank` of a tensor-parallel group of `size`.

    size <= n_kv_heads: split the KV heads (unevenly if needed); each rank takes the query heads
    of its KV heads, so no KV head is stored twice. size > n_kv_heads: spread the ranks over the
    KV groups; ranks sharing a KV group split its query heads and each keeps a copy of that KV head.
    Either way a rank's local query head i reads local KV head i // (n_local_q // n_local_kv).
    """
    group = n_heads // n_kv_heads
    if size <= n_kv_heads:
        kv0, kv1 = even_split(n_kv_heads, size)[rank]
        return (kv0 * group, kv1 * group), (kv0, kv1)
    for kv, (r0, r1) in enumerate(even_split(size, n_kv_heads)):
        if r0 <= rank < r1:
            q0, q1 = even_split(group, r1 - r0)[rank - r0]
            return (kv * group + q0, kv * group + q1), (kv, kv + 1)
    raise AssertionError("unreachable: rank outside the group")


def _empty(rows: int, cols: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(rows, cols), requires_grad=False)


class ColumnParallelLinear(nn.Module):
    """y_r = x @ W[rows_r].T: output features split across ranks, input replicated; no communication."""

    def __init__(self, in_features: int, out_features: int, group: Group, rows: Span | None = None):
        super().__init__()
        start, stop = rows or even_split(out_features, group.size)[group.rank]
        self.shard = (0, start, stop)
        self.weight = _empty(stop - start, in_features)
        self.qtype: str | None = None
        self.int8_x = False

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.qtype, self.int8_x)


class MergedColumnParallelLinear(nn.Module):
    """Column-parallel weights that read the same input, stacked: one matmul and one pass over x.

    `parts` lists (checkpoint name, full out_features, this rank's row span) of each stacked weight,
    so the loader fills the stack from the separate tensors the checkpoint holds.
    """

    def __init__(self, in_features: int, parts: list[tuple[str, int, Span]], group: Group):
        super().__init__()
        self.parts = parts
        self.sizes = [stop - start for _, _, (start, stop) in parts]
        self.weight = _empty(sum(self.sizes), in_features)
        self.qtype: str | None = None  # one format for the whole stack
        self.int8_x = False

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return linear(x, self.weight, self.qtype, self.int8_x).split(self.sizes, dim=-1)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r @ W[:, cols_r].T: input features split, output all-reduced."""

    def __init__(self, in_features: int, out_features: int, group: Group, cols: Span | None = None):
        super().__init__()
        start, stop = cols or feature_split(in_features, group)
        self.group = group
        self.shard = (1, start, stop)
        self.weight = _empty(out_features, stop - start)
        self.qtype: str | None = None
        self.int8_x = False

    def forward(self, x: Tensor) -> Tensor:
        return all_reduce(linear(x, self.weight, self.qtype, self.int8_x), self.group)


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split: mask ids outside this rank's rows, look up, zero, all-reduce."""

    def __init__(self, vocab_size: int, dim: int, group: Group):
        super().__init__()
        start, stop = even_split(vocab_size, group.size)[group.rank]
        self.group = group
        self.shard = (0, start, stop)
        self.weight = _empty(stop - start, dim)
        self.qtype: str | None = None
        self.dtype = torch.float32  # of the rows looked up in a quantized table (the loader sets runtime.dtype)

    def forward(self, tokens: Tensor) -> Tensor:
        if self.group.size == 1:
            return embedding(tokens, self.weight, self.qtype, self.dtype)
        _, start, stop = self.shard
        outside = (tokens < start) | (tokens >= stop)
        x = embedding((tokens - start).masked_fill(outside, 0), self.weight, self.qtype, self.dtype)
        x.masked_fill_(outside.unsqueeze(-1), 0.0)
        return all_reduce(x, self.group)


class VocabParallelHead(ColumnParallelLinear):
    """Output head: this rank's vocab slice of the logits, all-gathered into full-vocab logits."""

    def __init__(self, dim: int, vocab_size: int, group: Group):
        super().__init__(dim, vocab_size, group)
        self.group = group
        self.sizes = [b - a for a, b in even_split(vocab_size, group.size)]

    def tie(self, table: VocabParallelEmbedding) -> None:
        """Read the embedding's table (same vocab split, same format) instead of a weight of its own."""
        self.weight, self.qtype = table.weight, table.qtype

    def forward(self, x: Tensor) -> Tensor:
        return all_gather(linear(x, self.weight, self.qtype, self.int8_x), self.group, self.sizes, dim=-1)
