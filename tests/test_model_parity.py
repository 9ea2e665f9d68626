"""One rank: our model == transformers' LlamaForCausalLM on random tiny checkpoints in every format."""
from __future__ import annotations

import pytest
import torch

from llama3_dist import fast_decode
from checkpoints import dequantized_reference, random_model, tiny_config, write_gguf, write_hf, write_meta

from llama3_dist.checkpoint import load_model, meta_state, open_checkpoint
from llama3_dist.generate import SamplingParams, generate
from llama3_dist.parallel.mesh import Mesh

TOL = 1e-4  # fp32 max-abs logit difference against transformers
SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 64}
CONFIGS = {
    "gqa": {},
    "gqa-rope-scaling": {"rope_scaling": SCALING},
    "tied-mha": {"tie_word_embeddings": True, "num_key_value_heads": 8},
    "9-3-heads": {"hidden_size": 72, "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 192},
}
WRITERS = {
    "meta": lambda m, d: write_meta(m, d / "meta"),
    "meta-mp2": lambda m, d: write_meta(m, d / "meta2", mp=2),
    "hf": lambda m, d: write_hf(m, d / "hf"),
    "hf-sharded": lambda m, d: write_hf(m, d / "hf2", shards=2),
    "gguf": lambda m, d: write_gguf(m, d / "m.gguf"),
}


def prompts(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(seed))


def our_model(path, dtype=torch.float32):
    return load_model(open_checkpoint(path), Mesh.single(), dtype)


def our_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    B, T = tokens.shape
    model.setup_caches(B, T)
    with torch.inference_mode():
        return model(tokens, torch.arange(T).expand(B, T))


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        for _ in range(n):
            nxt = hf(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


# Meta's MP=2 layout needs the head counts to split evenly, which 9/3 heads do not.
CASES = [(f, c) for f in sorted(WRITERS) for c in sorted(CONFIGS) if (f, c) != ("meta-mp2", "9-3-heads")]


@pytest.mark.parametrize(("fmt", "config"), CASES)
def test_logits_and_greedy_match_transformers(tmp_path, fmt, config):
    hf = random_model(tiny_config(**CONFIGS[config]), seed=1)
    model = our_model(WRITERS[fmt](hf, tmp_path))
    tokens = prompts(hf.config.vocab_size)
    with torch.inference_mode():
        want = hf(tokens).logits
    got = our_logits(model, tokens)
    assert (got - want).abs().max().item() <= TOL
    prompt = tokens[0, :5].tolist()
    [done] = generate(model, Mesh.single(), [prompt], GREEDY, frozenset())
    assert done.tokens == hf_greedy(hf, prompt, GREEDY.max_new_tokens)
    assert done.finish_reason == "length"


def test_formats_give_the_same_model(tmp_path):
    hf = random_model(tiny_config(rope_scaling=SCALING), seed=2)
    tokens = prompts(hf.config.vocab_size, seed=3)
    logits = {fmt: our_logits(our_model(w(hf, tmp_path)), tokens) for fmt, w in WRITERS.items()}
    for fmt, x in logits.items():
        assert (x - logits["meta"]).abs().max().item() <= 1e-5, fmt


def test_meta_mp2_shards_join_to_the_same_tensors(tmp_path):
    hf = random_model(tiny_config(), seed=4)
    one, two = open_checkpoint(write_meta(hf, tmp_path / "a")), open_checkpoint(write_meta(hf, tmp_path / "b", mp=2))
    assert one.shapes() == two.shapes()
    for name, shape in one.shapes().items():
        assert torch.equal(one.read(name), two.read(name)), name
        if len(shape) == 2:  # a slice that straddles the two shards, along each dim
            for dim in (0, 1):
                lo, hi = shape[dim] // 4, 3 * shape[dim] // 4
                assert torch.equal(one.read(name, dim, lo, hi), two.read(name, dim, lo, hi)), (name, dim)


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_quantized_gguf_loads_the_dequantized_weights(tmp_path, qtype):
    hf = random_model(tiny_config(), seed=5)
    path = write_gguf(hf, tmp_path / f"m-{qtype}.gguf", qtype=qtype)
    reference = dequantized_reference(path)
    model = our_model(path)
    params = dict(meta_state(model))
    for name, want in reference.items():
        assert torch.equal(params[name].data, want), name
    ck = open_checkpoint(path)
    for name in ("layers.0.feed_forward.w2.weight", "layers.1.attention.wo.weight"):  # column slices
        assert torch.equal(ck.read(name, 1, 32, 96), reference[name][:, 32:96]), name
        assert torch.equal(ck.read(name, 1, 5, 40), reference[name][:, 5:40]), name


def test_ragged_batch_equals_one_by_one(tmp_path):
    hf = random_model(tiny_config(), seed=6)
    model = our_model(write_meta(hf, tmp_path / "m"))
    g = torch.Generator().manual_seed(7)
    batch = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 9, 1, 6)]
    together = generate(model, Mesh.single(), batch, GREEDY, frozenset())
    alone = [generate(model, Mesh.single(), [p], GREEDY, frozenset())[0] for p in batch]
    assert [c.tokens for c in together] == [c.tokens for c in alone]
    assert [c.tokens for c in alone] == [hf_greedy(hf, p, GREEDY.max_new_tokens) for p in batch]


def test_stop_token_ends_a_row_and_is_excluded(tmp_path):
    hf = random_model(tiny_config(), seed=8)
    model = our_model(write_meta(hf, tmp_path / "m"))
    prompt = [1, 2, 3]
    [free] = generate(model, Mesh.single(), [prompt], GREEDY, frozenset())
    stop = free.tokens[4]
    [stopped] = generate(model, Mesh.single(), [prompt], GREEDY, frozenset({stop}))
    assert stopped.finish_reason == "stop"
    assert stopped.tokens == free.tokens[: free.tokens.index(stop)]


def test_sampling_is_reproducible_with_a_seed(tmp_path):
    model = our_model(write_meta(random_model(tiny_config(), seed=9), tmp_path / "m"))
    batch = [[5, 6, 7], [8, 9]]

    def run(seed):
        params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, top_k=50, seed=seed)
        return [c.tokens for c in generate(model, Mesh.single(), batch, params, frozenset())]

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_bfloat16_runs_close_to_float32(tmp_path):
    hf = random_model(tiny_config(), seed=10)
    path = write_hf(hf, tmp_path / "hf")
    tokens = prompts(hf.config.vocab_size)
    full = our_logits(our_model(path), tokens)
    half = our_model(path, torch.bfloat16)
    assert half.tok_embeddings.weight.dtype == torch.bfloat16
    low = our_logits(half, tokens)
    assert low.dtype == torch.float32
    assert (low - full).abs().max().item() < 0.25 * full.abs().max().item()


class WholeCacheSteps:
    """DecodeGraphs' contract without a GPU: records that each decode step saw the whole cache."""

    def __init__(self, model):
        self.model, self.lengths = model, []

    fixed_shapes = True

    def __call__(self, x, pos, freqs_cis, mask, cache):
        self.lengths.append(mask.shape[-1])
        return self.model.run_layers(x, pos, freqs_cis, mask, cache)


def test_fixed_shape_decode_steps_give_the_same_tokens(tmp_path):
    """A CUDA-graphed step attends over the whole cache under the mask; the tokens must not change."""
    hf = random_model(tiny_config(), seed=12)
    model = our_model(write_meta(hf, tmp_path / "m"))
    batch = [[3, 4, 5, 6], [7], [8, 9, 10, 11, 12, 13, 14]]  # ragged: pad slots lie inside the mask's reach
    want = [c.tokens for c in generate(model, Mesh.single(), batch, GREEDY, frozenset())]
    model.decode_step = steps = WholeCacheSteps(model)
    got = [c.tokens for c in generate(model, Mesh.single(), batch, GREEDY, frozenset())]
    assert got == want
    assert steps.lengths and set(steps.lengths) == {model.cache.seq_len}


def test_cuda_graphs_need_a_cuda_model(tmp_path):
    model = our_model(write_meta(random_model(tiny_config(), seed=13), tmp_path / "m"))
    with pytest.raises(ValueError, match="CUDA"):
        fast_decode.enable(model, compile=False, cuda_graphs=True)


def test_random_checkpoint_is_the_same_model_at_every_layout():
    from llama3_dist.checkpoint.synthetic import RandomCheckpoint
    from llama3_dist.model import ModelArgs
    from llama3_dist.parallel.comm import Group
    from llama3_dist.parallel.layers import feature_split
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=160)
    ckpt = RandomCheckpoint(args, seed=1)
    assert ckpt.read("layers.1.feed_forward.w2.weight").shape == (64, 160)
    assert torch.equal(ckpt.read("layers.1.feed_forward.w2.weight", 1, 80, 160),
                       ckpt.read("layers.1.feed_forward.w2.weight")[:, 80:])
    assert not torch.equal(ckpt.read("layers.1.attention.wq.weight"), RandomCheckpoint(args, seed=2).read(
        "layers.1.attention.wq.weight"))
    full = load_model(ckpt, Mesh.single(), torch.float32)
    for rank in range(2):  # each tensor-parallel rank holds its rows of the one model
        tp = Group(rank, 2, (0, 1))
        part = load_model(ckpt, Mesh(rank, 2, tp, Group.single(rank), torch.device("cpu")), torch.float32)
        q = full.layers["0"].attention.wqkv.weight[rank * 32:(rank + 1) * 32]
        assert torch.equal(part.layers["0"].attention.wqkv.weight[:32], q)
        start, stop = feature_split(160, tp)  # whole 32-feature blocks: 96 | 64
        assert torch.equal(part.layers["1"].feed_forward.w2.weight, full.layers["1"].feed_forward.w2.weight[:, start:stop])
    with pytest.raises(Exception, match="no tokenizer"):
        ckpt.tokenizer()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decode_gives_the_eager_tokens(tmp_path, dtype):
    model = our_model(write_meta(random_model(tiny_config(), seed=14), tmp_path / "m"), dtype)
    batch = [[3, 4, 5, 6], [7], [8, 9, 10, 11, 12, 13, 14]]
    eager = [c.tokens for c in generate(model, Mesh.single(), batch, GREEDY, frozenset())]
    fast_decode.enable(model, compile=True, cuda_graphs=False)
    assert [c.tokens for c in generate(model, Mesh.single(), batch, GREEDY, frozenset())] == eager
    assert model.decode_step.compiled_runs > 0, "the compiled decode step never ran"


def test_a_failing_compile_falls_back_to_eager_decoding(tmp_path, caplog):
    import torch._inductor.config as inductor
    model = our_model(write_meta(random_model(tiny_config(), seed=15), tmp_path / "m"))
    batch = [[3, 4, 5, 6], [7]]
    eager = [c.tokens for c in generate(model, Mesh.single(), batch, GREEDY, frozenset())]
    torch._dynamo.reset()  # compile now, under the patch, not from another test's cached graph
    fast_decode.enable(model, compile=True, cuda_graphs=False)
    with inductor.patch({"cpp.cxx": (None, "/nonexistent/g++"), "force_disable_caches": True}):
        got = [c.tokens for c in generate(model, Mesh.single(), batch, GREEDY, frozenset())]
    assert got == eager
    assert model.decode_step.compiled is None and model.decode_step.compiled_runs == 0
    assert "torch.compile failed" in caplog.text and "decoding without it" in caplog.text
