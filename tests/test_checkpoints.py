"""Checkpoints: the tiny-checkpoint writers (helpers/checkpoints.py) hold the same weights as their transformers
oracle in every format, and our loaders read every format (Meta shards, HF shards, quantized GGUF, the synthetic
random checkpoint) to the same model."""

import json
import math
from pathlib import Path

import gguf
import pytest
import torch
import torch.nn.functional as F
from helpers.checkpoints import (
    LLAMA3_ROPE_SCALING,
    dequantized_reference,
    hf_state_to_meta,
    meta_ffn_hidden,
    meta_ffn_params,
    random_model,
    rope_freq_factors,
    tiny_config,
    write_gguf,
    write_hf,
    write_meta,
)
from helpers.parity import our_logits, our_model, prompts
from helpers.tiny import FORMATS
from transformers import AutoTokenizer, LlamaForCausalLM

from llama3_dist.checkpoint import load_model, meta_state, open_checkpoint
from llama3_dist.parallel.mesh import Mesh

CONFIGS = {
    "default": {},
    "llama3-rope": {"rope_scaling": LLAMA3_ROPE_SCALING},
    "llama3-rope-tied": {"rope_scaling": LLAMA3_ROPE_SCALING, "tie_word_embeddings": True},
}
FP32_ATOL = 1e-4


def _tokens(vocab_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))  # (B, T)


@torch.no_grad()
def _logits(model: LlamaForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens).logits  # (B, T, vocab)


# --- an independent Meta-style forward: complex rotary on interleaved pairs, as in llama_models/llama3/model.py ---


def _meta_apply_scaling(freqs: torch.Tensor, params: dict) -> torch.Tensor:
    factor = params["rope_scaling_factor"]
    low, high = params["rope_low_freq_factor"], params["rope_high_freq_factor"]
    old_context_len = params["rope_original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    wavelen = 2 * torch.pi / freqs
    new_freqs = torch.where(wavelen > low_freq_wavelen, freqs / factor, freqs)
    smooth = (old_context_len / wavelen - low) / (high - low)
    return torch.where(
        (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen),
        (1 - smooth) * new_freqs / factor + smooth * new_freqs,
        new_freqs,
    )


def _meta_rotary(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, T, H, head_dim/2)
    return torch.view_as_real(x_ * freqs_cis[None, :, None, :]).flatten(3)  # (B, T, H, head_dim)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _meta_forward(w: dict, params: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Full-sequence Llama 3 logits (B, T, vocab) from Meta-named weights and params.json."""
    B, T = tokens.shape
    n_heads, n_kv_heads, eps = params["n_heads"], params["n_kv_heads"], params["norm_eps"]
    head_dim = params["dim"] // n_heads
    freqs = 1.0 / (params["rope_theta"] ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    if params["use_scaled_rope"]:
        freqs = _meta_apply_scaling(freqs, params)
    angles = torch.outer(torch.arange(T, dtype=torch.float32), freqs)
    freqs_cis = torch.polar(torch.ones_like(angles), angles)  # (T, head_dim/2) complex64
    mask = torch.full((T, T), float("-inf")).triu(1)

    h = w["tok_embeddings.weight"][tokens]  # (B, T, dim)
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = _rms_norm(h, w[p + "attention_norm.weight"], eps)
        q = (x @ w[p + "attention.wq.weight"].T).view(B, T, n_heads, head_dim)
        k = (x @ w[p + "attention.wk.weight"].T).view(B, T, n_kv_heads, head_dim)
        v = (x @ w[p + "attention.wv.weight"].T).view(B, T, n_kv_heads, head_dim)
        q, k = _meta_rotary(q, freqs_cis), _meta_rotary(k, freqs_cis)
        k = k.repeat_interleave(n_heads // n_kv_heads, dim=2)  # (B, T, n_heads, head_dim)
        v = v.repeat_interleave(n_heads // n_kv_heads, dim=2)
        scores = q.transpose(1, 2) @ k.transpose(1, 2).transpose(2, 3) / math.sqrt(head_dim) + mask  # (B, H, T, T)
        y = (scores.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(B, T, -1)  # (B, T, dim)
        h = h + y @ w[p + "attention.wo.weight"].T
        x = _rms_norm(h, w[p + "ffn_norm.weight"], eps)
        h = (
            h
            + (F.silu(x @ w[p + "feed_forward.w1.weight"].T) * (x @ w[p + "feed_forward.w3.weight"].T))
            @ w[p + "feed_forward.w2.weight"].T
        )
    h = _rms_norm(h, w["norm.weight"], eps)
    return h @ w.get("output.weight", w["tok_embeddings.weight"]).T


def _load_meta(directory: Path, rank: int = 0) -> tuple[dict, dict]:
    params = json.loads((directory / "params.json").read_text())
    return torch.load(directory / f"consolidated.{rank:02d}.pth", weights_only=True), params


def _meta_ffn_reference(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# --- config and model ---


@pytest.mark.parametrize(
    "dim,intermediate", [(64, 160), (64, 170), (64, 192), (64, 100), (64, 7), (576, 1536), (4096, 14336)]
)
def test_meta_ffn_params_reproduce_intermediate_size(dim, intermediate):
    multiple_of, multiplier = meta_ffn_params(dim, intermediate)
    assert _meta_ffn_reference(dim, multiple_of, multiplier) == intermediate
    assert meta_ffn_hidden(dim, multiple_of, multiplier) == intermediate


def test_meta_ffn_params_rejects_impossible_size():
    with pytest.raises(ValueError, match="intermediate_size=0"):
        meta_ffn_params(64, 0)


def test_tiny_config_rope_parameters():
    assert tiny_config().rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}
    scaled = tiny_config(rope_scaling=LLAMA3_ROPE_SCALING, rope_theta=10000.0).rope_parameters
    assert scaled == {**LLAMA3_ROPE_SCALING, "rope_theta": 10000.0}


def test_random_model_is_deterministic_per_seed():
    config = tiny_config()
    a, b, c = random_model(config, 0), random_model(config, 0), random_model(config, 1)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
        assert not torch.equal(pa, pc), name
    assert not torch.allclose(a.model.norm.weight, torch.ones(config.hidden_size), atol=0.01)


# --- Hugging Face safetensors ---


@pytest.mark.parametrize("name,shards", [("default", 1), ("default", 2), ("llama3-rope", 3), ("llama3-rope-tied", 2)])
def test_hf_round_trip_gives_identical_logits(tmp_path, name, shards):
    model = random_model(tiny_config(**CONFIGS[name]), seed=1)
    directory = write_hf(model, tmp_path, shards=shards)
    if shards == 1:
        assert (directory / "model.safetensors").is_file()
    else:
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert files == [f"model-{n:05d}-of-{shards:05d}.safetensors" for n in range(1, shards + 1)]
    loaded = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    assert loaded.config.rope_parameters == model.config.rope_parameters
    tokens = _tokens(model.config.vocab_size)
    torch.testing.assert_close(_logits(loaded, tokens), _logits(model, tokens), rtol=0, atol=0)


# --- Meta consolidated.*.pth ---


@pytest.mark.parametrize("name", CONFIGS)
def test_meta_forward_matches_hf(tmp_path, name):
    model = random_model(tiny_config(**CONFIGS[name]), seed=2)
    weights, params = _load_meta(write_meta(model, tmp_path))
    assert (
        _meta_ffn_reference(params["dim"], params["multiple_of"], params["ffn_dim_multiplier"])
        == (weights["layers.0.feed_forward.w1.weight"].shape[0])
    )
    assert ("output.weight" in weights) == (not model.config.tie_word_embeddings)
    tokens = _tokens(model.config.vocab_size)
    torch.testing.assert_close(_meta_forward(weights, params, tokens), _logits(model, tokens), rtol=0, atol=FP32_ATOL)


def test_meta_rope_scaling_is_visible_in_logits(tmp_path):
    model = random_model(tiny_config(rope_scaling=LLAMA3_ROPE_SCALING), seed=2)
    weights, params = _load_meta(write_meta(model, tmp_path))
    assert params["use_scaled_rope"] and params["rope_original_max_position_embeddings"] == 192
    tokens = _tokens(model.config.vocab_size)
    unscaled = _meta_forward(weights, {**params, "use_scaled_rope": False}, tokens)
    assert (unscaled - _logits(model, tokens)).abs().max() > 100 * FP32_ATOL


def test_meta_mp2_shards_concatenate_to_mp1(tmp_path):
    model = random_model(tiny_config(rope_scaling=LLAMA3_ROPE_SCALING), seed=3)
    full, params = _load_meta(write_meta(model, tmp_path / "mp1"))
    shard0, params0 = _load_meta(write_meta(model, tmp_path / "mp2", mp=2), rank=0)
    shard1, _ = _load_meta(tmp_path / "mp2", rank=1)
    assert params0 == params
    assert set(shard0) == set(shard1) == set(full)
    split_dims = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "tok_embeddings": 0, "wo": 1, "w2": 1}
    for name, tensor in full.items():
        dim = split_dims.get(name.removesuffix(".weight").split(".")[-1])
        if dim is None:
            assert torch.equal(shard0[name], tensor) and torch.equal(shard1[name], tensor), name
        else:
            assert shard0[name].shape[dim] == tensor.shape[dim] // 2, name
            assert torch.equal(torch.cat([shard0[name], shard1[name]], dim=dim), tensor), name


def test_meta_rejects_mp_that_does_not_divide_kv_heads(tmp_path):
    with pytest.raises(ValueError, match="n_kv_heads=2"):
        write_meta(random_model(tiny_config(), seed=0), tmp_path, mp=4)


# --- GGUF ---


@pytest.mark.parametrize("name", ["default", "llama3-rope-tied"])
def test_gguf_f32_loads_in_transformers_with_same_logits(tmp_path, name):
    config_kwargs = dict(CONFIGS[name])
    # transformers' GGUF loader ignores rope_freqs.weight, so it can only check unscaled rotary
    config_kwargs.pop("rope_scaling", None)
    model = random_model(tiny_config(**config_kwargs), seed=4)
    path = write_gguf(model, tmp_path / "tiny.gguf")
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    assert loaded.config.tie_word_embeddings == model.config.tie_word_embeddings
    tokens = _tokens(model.config.vocab_size)
    torch.testing.assert_close(_logits(loaded, tokens), _logits(model, tokens), rtol=0, atol=FP32_ATOL)


def test_gguf_metadata_and_llama3_rope_freqs(tmp_path):
    config = tiny_config(rope_scaling=LLAMA3_ROPE_SCALING)
    model = random_model(config, seed=5)
    reader = gguf.GGUFReader(write_gguf(model, tmp_path / "tiny.gguf"))
    expected = {
        "general.architecture": "llama",
        "llama.block_count": 4,
        "llama.context_length": 256,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 160,
        "llama.attention.head_count": 8,
        "llama.attention.head_count_kv": 2,
        "llama.rope.freq_base": 500000.0,
        "llama.vocab_size": 256,
        "llama.rope.dimension_count": 8,
        "tokenizer.ggml.model": "gpt2",
    }
    assert {key: reader.fields[key].contents() for key in expected} == expected
    assert reader.fields["llama.attention.layer_norm_rms_epsilon"].contents() == pytest.approx(1e-5)
    assert not any(key.startswith("llama.rope.scaling") for key in reader.fields)

    tensors = {t.name: t for t in reader.tensors}
    factors = torch.from_numpy(tensors["rope_freqs.weight"].data.copy())
    assert tensors["rope_freqs.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    torch.testing.assert_close(factors, rope_freq_factors(config))
    # llama.cpp divides each base frequency by its factor; that must give HF's llama3 inv_freq
    head_dim = config.head_dim
    base = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    torch.testing.assert_close(base / factors, model.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    # all three llama3 regimes occur: kept, interpolated, divided by factor
    assert factors[0] == 1 and 1 < factors[1] < 8 and factors[-1] == 8


def test_gguf_without_rope_scaling_has_no_rope_freqs(tmp_path):
    reader = gguf.GGUFReader(write_gguf(random_model(tiny_config(), seed=0), tmp_path / "tiny.gguf"))
    assert "rope_freqs.weight" not in {t.name for t in reader.tensors}


@pytest.mark.parametrize(
    "qtype,rel_tol", [("F32", 0), ("F16", 1e-3), ("BF16", 1e-2), ("Q8_0", 1e-2), ("Q4_0", 0.13), ("Q4_1", 0.07)]
)
def test_gguf_dequantized_weights_are_close(tmp_path, qtype, rel_tol):
    model = random_model(tiny_config(rope_scaling=LLAMA3_ROPE_SCALING), seed=6)
    path = write_gguf(model, tmp_path / "tiny.gguf", qtype=qtype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["token_embd.weight"] == types["blk.0.attn_q.weight"] == types["output.weight"] == qtype
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == types["rope_freqs.weight"] == "F32"

    expected, _ = hf_state_to_meta(model)
    got = dequantized_reference(path)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].shape == tensor.shape, name
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=rel_tol * tensor.abs().max().item(), msg=name)
        if tensor.ndim == 1:
            assert torch.equal(got[name], tensor), name


def test_gguf_q8_0_reference_matches_transformers_loader(tmp_path):
    model = random_model(tiny_config(), seed=7)
    path = write_gguf(model, tmp_path / "tiny.gguf", qtype="Q8_0")
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    reference = dequantized_reference(path)
    for name, tensor in hf_state_to_meta(loaded)[0].items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0, msg=name)


def test_gguf_byte_tokenizer_is_usable_by_transformers(tmp_path):
    path = write_gguf(random_model(tiny_config(vocab_size=258), seed=0), tmp_path / "tiny.gguf")
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.merges"].contents() == []
    assert fields["tokenizer.ggml.tokens"].contents()[256:] == [
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
    ]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert tokenizer("Hi ö").input_ids == list("Hi ö".encode())


def test_gguf_copies_tokenizer_from_smollm2(tmp_path, smollm2_gguf):
    source = smollm2_gguf
    model = random_model(tiny_config(vocab_size=49152, num_hidden_layers=1, tie_word_embeddings=True), seed=8)
    src = gguf.GGUFReader(source).fields
    dst = gguf.GGUFReader(write_gguf(model, tmp_path / "tiny.gguf", tokenizer_from=str(source))).fields
    tokenizer_keys = [key for key in src if key.startswith("tokenizer.")]
    assert {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template"} <= set(tokenizer_keys)
    for key in tokenizer_keys:
        assert dst[key].types == src[key].types, key
        assert dst[key].contents() == src[key].contents(), key
    with pytest.raises(ValueError, match="vocab_size is 256"):
        write_gguf(random_model(tiny_config(), seed=0), tmp_path / "bad.gguf", tokenizer_from=str(source))


# --- our loaders ---


def test_formats_give_the_same_model(tiny):
    hf = tiny.model("gqa-rope-scaling")
    tokens = prompts(hf.config.vocab_size, seed=3)
    logits = {fmt: our_logits(our_model(tiny.path("gqa-rope-scaling", fmt)), tokens) for fmt in FORMATS}
    for fmt, x in logits.items():
        assert (x - logits["meta"]).abs().max().item() <= 1e-5, fmt


def test_meta_mp2_shards_join_to_the_same_tensors(tiny_meta, tiny_meta_mp2):
    one, two = open_checkpoint(tiny_meta), open_checkpoint(tiny_meta_mp2)
    assert one.shapes() == two.shapes()
    for name, shape in one.shapes().items():
        assert torch.equal(one.read(name), two.read(name)), name
        if len(shape) == 2:  # a slice that straddles the two shards, along each dim
            for dim in (0, 1):
                lo, hi = shape[dim] // 4, 3 * shape[dim] // 4
                assert torch.equal(one.read(name, dim, lo, hi), two.read(name, dim, lo, hi)), (name, dim)


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_quantized_gguf_loads_the_dequantized_weights(tiny, qtype):
    path = tiny.path("gqa", f"gguf-{qtype}")
    reference = dequantized_reference(path)
    model = our_model(path)
    params = dict(meta_state(model))
    for name, want in reference.items():
        assert torch.equal(params[name].data, want), name
    ck = open_checkpoint(path)
    for name in ("layers.0.feed_forward.w2.weight", "layers.1.attention.wo.weight"):  # column slices
        assert torch.equal(ck.read(name, 1, 32, 96), reference[name][:, 32:96]), name
        assert torch.equal(ck.read(name, 1, 5, 40), reference[name][:, 5:40]), name


def test_random_checkpoint_is_the_same_model_at_every_layout():
    from llama3_dist.args import ModelArgs
    from llama3_dist.checkpoint.synthetic import RandomCheckpoint
    from llama3_dist.parallel.comm import Group
    from llama3_dist.parallel.layers import feature_split

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=160)
    ckpt = RandomCheckpoint(args, seed=1)
    assert ckpt.read("layers.1.feed_forward.w2.weight").shape == (64, 160)
    assert torch.equal(
        ckpt.read("layers.1.feed_forward.w2.weight", 1, 80, 160), ckpt.read("layers.1.feed_forward.w2.weight")[:, 80:]
    )
    assert not torch.equal(
        ckpt.read("layers.1.attention.wq.weight"), RandomCheckpoint(args, seed=2).read("layers.1.attention.wq.weight")
    )
    full = load_model(ckpt, Mesh.single(), torch.float32)
    for rank in range(2):  # each tensor-parallel rank holds its rows of the one model
        tp = Group(rank, 2, (0, 1))
        part = load_model(ckpt, Mesh(rank, 2, tp, Group.single(rank), torch.device("cpu")), torch.float32)
        q = full.layers["0"].attention.wqkv.weight[rank * 32 : (rank + 1) * 32]
        assert torch.equal(part.layers["0"].attention.wqkv.weight[:32], q)
        start, stop = feature_split(160, tp)  # whole 32-feature blocks: 96 | 64
        assert torch.equal(
            part.layers["1"].feed_forward.w2.weight, full.layers["1"].feed_forward.w2.weight[:, start:stop]
        )
    with pytest.raises(Exception, match="no tokenizer"):
        ckpt.tokenizer()
