"""Parallel layers on real gloo ranks == the dense layer (uneven splits too) and == fairscale's layers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from distributed import run_ranks

from llama3_dist.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                         VocabParallelHead, even_split, head_spans, shard)

TOL = 1e-5


def test_even_split_and_shard_are_contiguous_and_cover():
    for n in (1, 7, 9, 49152):
        for parts in (1, 2, 3, 4, 8):
            spans = even_split(n, parts)
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            sizes = [b - a for a, b in spans]
            assert max(sizes) - min(sizes) <= 1
    full = torch.arange(30).view(5, 6)
    assert torch.equal(torch.cat([shard(full, 1, r, 4) for r in range(4)], dim=1), full)


@pytest.mark.parametrize(("heads", "kv"), [(8, 2), (9, 3), (32, 8), (8, 8), (4, 1)])
def test_head_spans_cover_every_query_head_once(heads, kv):
    for size in range(1, heads + 1):
        spans = [head_spans(heads, kv, r, size) for r in range(size)]
        q = [h for (q0, q1), _ in spans for h in range(q0, q1)]
        assert q == list(range(heads))
        for (q0, q1), (k0, k1) in spans:
            nq, nkv = q1 - q0, k1 - k0
            assert nq >= 1 and nkv >= 1 and nq % nkv == 0  # uniform local grouping
            ratio = nq // nkv
            assert [h // (heads // kv) for h in range(q0, q1)] == [k0 + i // ratio for i in range(nq)]
            if size <= kv:
                assert nq == nkv * (heads // kv)  # no KV head is stored twice


def _layers_vs_dense(mesh, in_f: int, out_f: int, vocab: int):
    g = torch.Generator().manual_seed(0)  # every rank builds the same full tensors
    x = torch.randn(3, 5, in_f, generator=g)
    w = torch.randn(out_f, in_f, generator=g)
    emb = torch.randn(vocab, in_f, generator=g)
    tokens = torch.randint(0, vocab, (3, 5), generator=g)
    tp, diffs = mesh.tp, {}

    col = ColumnParallelLinear(in_f, out_f, tp)
    _, a, b = col.shard
    col.weight.data = w[a:b]
    diffs["column"] = (col(x) - F.linear(x, w)[..., a:b]).abs().max().item()

    row = RowParallelLinear(out_f, in_f, tp)
    _, a, b = row.shard
    row.weight.data = w.t().contiguous()[:, a:b]
    xr = torch.randn(3, 5, out_f, generator=g)
    diffs["row"] = (row(xr[..., a:b]) - F.linear(xr, w.t())).abs().max().item()

    embed = VocabParallelEmbedding(vocab, in_f, tp)
    embed.weight.data = shard(emb, 0, tp.rank, tp.size)
    diffs["embedding"] = (embed(tokens) - F.embedding(tokens, emb)).abs().max().item()

    head = VocabParallelHead(in_f, vocab, tp)
    head.weight.data = shard(emb, 0, tp.rank, tp.size)
    diffs["head"] = (head(x) - F.linear(x, emb)).abs().max().item()
    return diffs


def _layers_vs_fairscale(mesh, in_f: int, out_f: int, vocab: int):
    from fairscale.nn.model_parallel import initialize as fs_init
    from fairscale.nn.model_parallel import layers as fs

    fs_init.initialize_model_parallel(mesh.tp.size)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, in_f, generator=g)
    w = torch.randn(out_f, in_f, generator=g)
    emb = torch.randn(vocab, in_f, generator=g)
    tokens = torch.randint(0, vocab, (2, 4), generator=g)
    keep = lambda t: lambda *_: t  # noqa: E731 - init_method that loads a given shard
    tp, diffs = mesh.tp, {}
    with torch.no_grad():
        ours = ColumnParallelLinear(in_f, out_f, tp)
        ours.weight.data = shard(w, 0, tp.rank, tp.size)
        theirs = fs.ColumnParallelLinear(in_f, out_f, bias=False, gather_output=False)
        theirs.weight.copy_(shard(w, 0, tp.rank, tp.size))
        diffs["column"] = (ours(x) - theirs(x)).abs().max().item()

        ours = RowParallelLinear(out_f, in_f, tp)
        ours.weight.data = shard(w.t().contiguous(), 1, tp.rank, tp.size)
        theirs = fs.RowParallelLinear(out_f, in_f, bias=False, input_is_parallel=True)
        theirs.weight.copy_(ours.weight)
        xr = shard(torch.randn(2, 4, out_f, generator=g), 2, tp.rank, tp.size)
        diffs["row"] = (ours(xr) - theirs(xr)).abs().max().item()

        ours = VocabParallelEmbedding(vocab, in_f, tp)
        ours.weight.data = shard(emb, 0, tp.rank, tp.size)
        theirs = fs.VocabParallelEmbedding(vocab, in_f, init_method=keep(None))
        theirs.weight.copy_(ours.weight)
        diffs["embedding"] = (ours(tokens) - theirs(tokens)).abs().max().item()

        ours = VocabParallelHead(in_f, vocab, tp)
        ours.weight.data = shard(emb, 0, tp.rank, tp.size)
        theirs = fs.ColumnParallelLinear(in_f, vocab, bias=False, gather_output=True)
        theirs.weight.copy_(ours.weight)
        diffs["head"] = (ours(x) - theirs(x)).abs().max().item()
    return diffs


@pytest.mark.parametrize("world_size", [2, 4])
def test_parallel_layers_match_dense_including_uneven_splits(world_size):
    # 10 output features, 13 input features and 23 vocab rows never split evenly over 2 or 4 ranks
    for rank_diffs in run_ranks(_layers_vs_dense, world_size, 13, 10, 23):
        assert max(rank_diffs.values()) <= TOL, rank_diffs


@pytest.mark.parametrize("world_size", [2, 4])
def test_parallel_layers_match_fairscale(world_size):
    for rank_diffs in run_ranks(_layers_vs_fairscale, world_size, 16, 24, 32):
        assert set(rank_diffs) == {"column", "row", "embedding", "head"}
        assert max(rank_diffs.values()) <= TOL, rank_diffs
