"""Tensor parallelism on real gloo ranks: the parallel layers == the dense layer (uneven splits too) and
fairscale's layers; every TP degree gives TP=1's logits and greedy tokens, and each rank loads only its part."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.distributed import run_ranks
from helpers.memory import reset_peak, status
from helpers.parity import BATCH, GREEDY, TOL, logits_and_tokens

from llama3_dist.checkpoint import load_model, open_checkpoint
from llama3_dist.generate import SamplingParams, generate
from llama3_dist.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelHead,
    even_split,
    head_spans,
    shard,
)
from llama3_dist.parallel.mesh import Mesh

LAYER_TOL = 1e-5

# ---------------------------------------------------------------- layers


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
        assert max(rank_diffs.values()) <= LAYER_TOL, rank_diffs


@pytest.mark.parametrize("world_size", [2, 4])
def test_parallel_layers_match_fairscale(world_size):
    for rank_diffs in run_ranks(_layers_vs_fairscale, world_size, 16, 24, 32):
        assert set(rank_diffs) == {"column", "row", "embedding", "head"}
        assert max(rank_diffs.values()) <= LAYER_TOL, rank_diffs


# ---------------------------------------------------------------- the model at every TP degree


def check_all_degrees(path, degrees=(2, 3, 4), batch=BATCH, params=GREEDY):
    want_logits, want_tokens = logits_and_tokens(Mesh.single(), str(path), batch, params)
    for tp in degrees:
        for rank, (logits, tokens) in enumerate(run_ranks(logits_and_tokens, tp, str(path), batch, params)):
            assert (logits - want_logits).abs().max().item() <= TOL, (tp, rank)
            assert tokens == want_tokens, (tp, rank)
    return want_tokens


@pytest.mark.parametrize("heads", [(8, 2), (9, 3)])
def test_every_tp_degree_matches_tp1(tiny, heads):
    n_heads, n_kv = heads  # variant tp-8-2 / tp-9-3: dim 8 * n_heads, FFN 200, vocab 250
    check_all_degrees(tiny.path(f"tp-{n_heads}-{n_kv}", "hf"))


def test_meta_mp2_checkpoint_loads_at_tp1_2_4(tiny_meta_mp2, tiny_meta):
    tokens = check_all_degrees(tiny_meta_mp2, degrees=(2, 4))
    single = logits_and_tokens(Mesh.single(), str(tiny_meta))[1]
    assert tokens == single


def test_quantized_gguf_at_tp2_and_tp3(tiny):
    check_all_degrees(tiny.path("gqa", "gguf-Q8_0"), degrees=(2, 3))


def test_ranks_agree_on_sampled_tokens(tiny_meta):
    path = tiny_meta
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5)
    results = run_ranks(logits_and_tokens, 2, str(path), BATCH, params)
    assert results[0][1] == results[1][1]
    assert results[0][1] == logits_and_tokens(Mesh.single(), str(path), BATCH, params)[1]


def smollm2_tokens(mesh: Mesh, path: str, prompts: list[list[int]]):
    model = load_model(open_checkpoint(path), mesh, torch.float32)
    return [c.tokens for c in generate(model, mesh, prompts, SamplingParams(16, temperature=0.0), frozenset())]


@pytest.mark.parametrize("tp", [2, 4])
def test_real_smollm2_at_tp_matches_tp1(smollm2_gguf, tp):
    prompts = [[504, 3575, 282, 4649, 314], [1248, 253, 1345, 1112, 288, 4238, 30]]
    want = smollm2_tokens(Mesh.single(), str(smollm2_gguf), prompts)
    for got in run_ranks(smollm2_tokens, tp, str(smollm2_gguf), prompts):
        assert got == want


def _load_peak_mib(mesh: Mesh, path: str) -> tuple[float, float]:
    """(peak RSS growth while loading, this rank's parameter MiB): the high-water mark is reset first."""
    reset_peak()
    base = status("VmRSS")
    model = load_model(open_checkpoint(path), mesh, torch.float32)
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return (status("VmHWM") - base) / 2**20, params


def test_tp2_loads_about_half_the_memory_per_rank(tmp_path):
    from llama3_dist.checkpoint.synthetic import write_random_meta

    params = {
        "dim": 512,
        "n_layers": 8,
        "n_heads": 8,
        "n_kv_heads": 2,
        "vocab_size": 32000,
        "multiple_of": 256,
        "norm_eps": 1e-5,
        "rope_theta": 500000.0,
    }
    path = str(write_random_meta(tmp_path / "m", params, dtype=torch.float32))  # ~220 MiB of fp32
    [(tp1_peak, tp1_params)] = run_ranks(_load_peak_mib, 1, path)
    for tp2_peak, tp2_params in run_ranks(_load_peak_mib, 2, path):
        assert tp2_params < 0.55 * tp1_params
        assert tp2_peak < 0.75 * tp1_peak, (tp2_peak, tp1_peak)
