"""The fast decode path's logic on CPU: fixed-shape (CUDA-graph-style) steps, torch.compile and its eager
fallback give the eager tokens, on one rank and at TP=2. The CUDA runs themselves are in tests/gpu."""

from __future__ import annotations

import pytest
import torch
from helpers.distributed import run_ranks
from helpers.parity import BATCH, GREEDY, logits_and_tokens, our_model

from llama3_dist import fast_decode, kernels
from llama3_dist.checkpoint import load_model, open_checkpoint
from llama3_dist.generate import generate
from llama3_dist.kernels import quant
from llama3_dist.parallel.mesh import Mesh


class WholeCacheSteps:
    """DecodeGraphs' contract without a GPU: records that each decode step saw the whole cache."""

    def __init__(self, model):
        self.model, self.lengths = model, []

    fixed_shapes = True

    def __call__(self, x, pos, freqs_cis, mask, cache):
        self.lengths.append(mask.shape[-1])
        return self.model.run_layers(x, pos, freqs_cis, mask, cache)


def test_fixed_shape_decode_steps_give_the_same_tokens(tiny_meta):
    """A CUDA-graphed step attends over the whole cache under the mask; the tokens must not change."""
    model = our_model(tiny_meta)
    batch = [[3, 4, 5, 6], [7], [8, 9, 10, 11, 12, 13, 14]]  # ragged: pad slots lie inside the mask's reach
    want = [c.tokens for c in generate(model, Mesh.single(), batch, GREEDY, frozenset())]
    model.decode_step = steps = WholeCacheSteps(model)
    got = [c.tokens for c in generate(model, Mesh.single(), batch, GREEDY, frozenset())]
    assert got == want
    assert steps.lengths and set(steps.lengths) == {model.cache.seq_len}


def test_cuda_graphs_need_a_cuda_model(tiny_meta):
    model = our_model(tiny_meta)
    with pytest.raises(ValueError, match="CUDA"):
        fast_decode.enable(model, compile=False, cuda_graphs=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decode_gives_the_eager_tokens(tiny_meta, dtype):
    model = our_model(tiny_meta, dtype)
    batch = [[3, 4, 5, 6], [7], [8, 9, 10, 11, 12, 13, 14]]
    eager = [c.tokens for c in generate(model, Mesh.single(), batch, GREEDY, frozenset())]
    fast_decode.enable(model, compile=True, cuda_graphs=False)
    with torch.profiler.profile() as prof:
        assert [c.tokens for c in generate(model, Mesh.single(), batch, GREEDY, frozenset())] == eager
    assert model.decode_step.compiled_runs > 0, "the compiled decode step never ran"
    assert model.decode_step.one_graph, "a one-rank decode step should compile to one graph"
    ran = {e.name for e in prof.events()}
    assert f"llama3_dist::attend_decode_{kernels.variant()}" in ran, "the compiled step did not attend with the kernel"
    assert "aten::bmm" not in ran, "attention ran as two batched matmuls"


def test_each_model_runs_its_own_compiled_graph(tiny_meta):
    """The compiled step skips guards on module attributes (fast_decode); a second model in the process
    with another structure (quantized weights) must compile its own graph, not run the first one's."""
    from torch._dynamo.utils import counters

    batch = [[3, 4, 5, 6], [7]]
    first = our_model(tiny_meta)
    fast_decode.enable(first, compile=True, cuda_graphs=False)
    generate(first, Mesh.single(), batch, GREEDY, frozenset())
    second = load_model(open_checkpoint(tiny_meta), Mesh.single(), torch.float32, weights="int8")
    eager = [c.tokens for c in generate(second, Mesh.single(), batch, GREEDY, frozenset())]
    graphs = counters["stats"]["unique_graphs"]
    fast_decode.enable(second, compile=True, cuda_graphs=False)
    assert [c.tokens for c in generate(second, Mesh.single(), batch, GREEDY, frozenset())] == eager
    assert second.decode_step.compiled_runs > 0, "the compiled decode step never ran"
    assert counters["stats"]["unique_graphs"] > graphs, "the second model ran the first one's graph"


def test_models_of_one_shape_run_their_own_weights(tiny_meta):
    """The one-graph stack holds its weights in the graph (install_free_tensors): a second model of
    the same shape with other weights must decode with its own, not the first one's."""
    batch = [[3, 4, 5, 6], [7]]
    first, second = our_model(tiny_meta), our_model(tiny_meta)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in second.parameters():
            w.add_(torch.randn(w.shape, generator=gen) * w.std())
    eager = [[c.tokens for c in generate(m, Mesh.single(), batch, GREEDY, frozenset())] for m in (first, second)]
    assert eager[0] != eager[1], "the perturbed weights should change the tokens"
    for model, want in zip((first, second), eager):
        fast_decode.enable(model, compile=True, cuda_graphs=False)
        assert [c.tokens for c in generate(model, Mesh.single(), batch, GREEDY, frozenset())] == want
        assert model.decode_step.compiled_runs > 0 and model.decode_step.one_graph


def test_a_failing_compile_falls_back_to_eager_decoding(tiny_meta, caplog):
    import torch._inductor.config as inductor

    model = our_model(tiny_meta)
    batch = [[3, 4, 5, 6], [7]]
    eager = [c.tokens for c in generate(model, Mesh.single(), batch, GREEDY, frozenset())]
    torch._dynamo.reset()  # compile now, under the patch, not from another test's cached graph
    fast_decode.enable(model, compile=True, cuda_graphs=False)
    with inductor.patch({"cpp.cxx": (None, "/nonexistent/g++"), "force_disable_caches": True}):
        got = [c.tokens for c in generate(model, Mesh.single(), batch, GREEDY, frozenset())]
    assert got == eager
    assert model.decode_step.compiled is None and model.decode_step.compiled_runs == 0
    assert "torch.compile failed" in caplog.text and "decoding without it" in caplog.text


def compiled_tokens(mesh: Mesh, path: str):
    """Greedy tokens with the decode step compiled: the shm all-reduce is an op inside the graph."""
    model = load_model(open_checkpoint(path), mesh, torch.float32)
    fast_decode.enable(model, compile=True, cuda_graphs=False)
    tokens = [c.tokens for c in generate(model, mesh, BATCH, GREEDY, frozenset())]
    assert model.decode_step.compiled_runs > 0, "the compiled decode step never ran"
    return tokens, model.decode_step.one_graph


def test_compiled_graphs_are_cached_under_the_kernels_sources(tmp_path, monkeypatch):
    """torch keys its on-disk cache of compiled graphs on the graph, which names our kernel ops but
    not their code: a graph cached before qlinear gained its int8-activation flag once ran every Q4_1
    matmul of a later version with int8 activations. The key must change with the kernels' sources,
    and keep a tag the user set."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    w, x = quant.quantize(torch.randn(64, 96), "Q8_0"), torch.randn(1, 96)
    quant.linear(x, w, "Q8_0")  # the kernels built and loaded eagerly, as a model's prefill does
    counters = torch._dynamo.utils.counters

    def compile_and_run() -> tuple[int, int]:
        """(graphs read from the cache, graphs compiled) by one fresh compile."""
        torch._dynamo.reset()
        counters.clear()
        fast_decode._configure_dynamo()
        torch.compile(lambda x: quant.linear(x, w, "Q8_0").relu(), dynamic=False)(x)
        return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]

    with torch.compiler.config.patch(cache_key_tag="users-own"):
        assert compile_and_run() == (0, 1)
        assert compile_and_run() == (1, 0), "the same sources should reuse the cached graph"
        tag = torch.compiler.config.cache_key_tag
        assert tag == f"users-own+{fast_decode.KERNELS_TAG}{kernels.source_digest()}"

        edited = []  # the same sources with a comment added, as a new version of the ops would be
        for path in kernels.SOURCES:
            edited.append(tmp_path / path.name)
            edited[-1].write_text(path.read_text() + "// another version\n")
        (tmp_path / "isa.h").write_text(kernels.SOURCES[0].with_name("isa.h").read_text())
        monkeypatch.setattr(kernels, "SOURCES", edited)
        assert compile_and_run() == (0, 1), "a graph cached against other kernel sources was reused"
        assert torch.compiler.config.cache_key_tag.startswith("users-own+")
        assert torch.compiler.config.cache_key_tag != tag
    torch._dynamo.reset()


def test_compiled_decode_at_tp2_gives_tp1_tokens(tiny_meta):
    path = str(tiny_meta)
    _, want = logits_and_tokens(Mesh.single(), path)
    for shm in (True, False):  # the all-reduce inside the compiled graph (one graph), or gloo between graphs
        assert run_ranks(compiled_tokens, 2, path, shm=shm) == [(want, shm), (want, shm)], shm


def test_a_warmed_up_server_never_compiles_again(tiny):
    """serve warms its compiled decode step up at the full batch and at one row; every batch in
    between decodes the first rows of the same cache and must find a graph ready, for a compile
    in the middle of serving stalls every client for minutes on a small CPU. The 9/3-head model
    has 3 KV heads, as many as the keys of the warm-up's first decode step (duck sizing would tie
    the two and compile again at the next step). The last batch's one-token prompt makes its
    prefill a T = 1 step with keys of length 1, which must run eagerly, not compile a graph."""
    from torch._dynamo.utils import counters

    from llama3_dist.generate import warm_up

    model = our_model(tiny.path("9-3-heads"))
    fast_decode.enable(model, compile=True, cuda_graphs=False)
    max_batch, seq_len = 4, 48
    warm_up(model, Mesh.single(), max_batch, seq_len)
    warm_up(model, Mesh.single(), 1, seq_len)
    graphs = counters["stats"]["unique_graphs"]
    batches = [[[3, 4, 5, 6], [7], [8, 9]], [[5, 6], [7, 8, 9, 10, 11]], [[1, 2, 3]] * 4, [[9]]]
    eager = our_model(tiny.path("9-3-heads"))
    for batch in batches:
        got = [c.tokens for c in generate(model, Mesh.single(), batch, GREEDY, frozenset())]
        assert model.cache.batch == max_batch  # generate kept the server-sized cache: the batch was its first rows
        assert got == [c.tokens for c in generate(eager, Mesh.single(), batch, GREEDY, frozenset())]
    assert model.decode_step.compiled_runs > 0, "the compiled decode step never ran"
    assert counters["stats"]["unique_graphs"] == graphs, "serving compiled a graph the warm-up had not"
