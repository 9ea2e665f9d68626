"""Random-weight tiny Llama checkpoints (HF safetensors, Meta .pth, GGUF) holding the weights of one HF oracle model.

Usage: `model = random_model(tiny_config(), seed=0)`, then `write_hf` / `write_meta` / `write_gguf`;
`hf_state_to_meta` and `dequantized_reference` give the expected tensors under canonical (Meta) names.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType, LlamaFileType, TokenType
from safetensors.torch import save_file
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM

# head_dim 8 at rope_theta 5e5 has wavelengths ~6, ~167, ~4443, ~1.2e5 tokens: with an original context of 192
# they land in all three llama3 regimes (kept, smoothly interpolated, divided by factor).
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 192,
}

_TINY_DEFAULTS = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    intermediate_size=160,  # Meta FFN formula: multiple_of=32, ffn_dim_multiplier=0.8 (int(0.8 * 170) -> 160)
    vocab_size=256,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    rope_scaling=None,
)

# HF per-layer module -> Meta per-layer name.
_HF_TO_META_LAYER = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}

# Meta name -> llama.cpp GGUF name (per-layer part, then top level).
_META_TO_GGUF_LAYER = {
    "attention.wq": "attn_q",
    "attention.wk": "attn_k",
    "attention.wv": "attn_v",
    "attention.wo": "attn_output",
    "feed_forward.w1": "ffn_gate",
    "feed_forward.w2": "ffn_down",
    "feed_forward.w3": "ffn_up",
    "attention_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
}
_META_TO_GGUF_TOP = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}
_GGUF_TO_META_LAYER = {v: k for k, v in _META_TO_GGUF_LAYER.items()}
_GGUF_TO_META_TOP = {v: k for k, v in _META_TO_GGUF_TOP.items()}

# Model-parallel split dim of each Meta tensor (llama_models/llama3/model.py): ColumnParallelLinear and
# VocabParallelEmbedding split dim 0, RowParallelLinear dim 1; norms (None) are replicated.
_META_SPLIT_DIM = {
    "tok_embeddings": 0,
    "output": 0,
    "wq": 0,
    "wk": 0,
    "wv": 0,
    "w1": 0,
    "w3": 0,
    "wo": 1,
    "w2": 1,
    "attention_norm": None,
    "ffn_norm": None,
    "norm": None,
}

_GGUF_QTYPES = {
    "F32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "F16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "BF16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "Q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "Q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "Q4_1": (GGMLQuantizationType.Q4_1, LlamaFileType.MOSTLY_Q4_1),
}


def tiny_config(**overrides) -> LlamaConfig:
    """A tiny LlamaConfig; `rope_scaling` (llama3 dict or None) and `rope_theta` go into `rope_parameters`."""
    kwargs = {**_TINY_DEFAULTS, **overrides}
    rope_scaling = kwargs.pop("rope_scaling")
    rope_theta = float(kwargs.pop("rope_theta"))
    rope = dict(rope_scaling) if rope_scaling else {"rope_type": "default"}
    kwargs.setdefault("rope_parameters", {**rope, "rope_theta": rope_theta})
    return LlamaConfig(**kwargs)


def random_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """An fp32 eval-mode LlamaForCausalLM whose weights depend only on `seed`."""
    # Matmul weights N(0, 1/fan_in) keep attention scores O(1), so a wrong rotary shows in the logits
    # (HF's std-0.02 init leaves attention nearly uniform); norm weights 1 + 0.1 N(0, 1) expose a misplaced norm.
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim == 1:
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))
    return model.float().eval()


def meta_ffn_hidden(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward hidden size for a model of width `dim` (llama_models/llama3/model.py)."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_ffn_params(dim: int, intermediate_size: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) for which Meta's formula gives `intermediate_size`; ValueError if none."""
    # Prefer no multiplier, then multipliers with the fewest decimals, then the largest power-of-two multiple_of.
    base = int(2 * 4 * dim / 3)
    powers = [m for m in (2**k for k in range(16, -1, -1)) if intermediate_size > 0 and intermediate_size % m == 0]
    for m in powers:
        if meta_ffn_hidden(dim, m, None) == intermediate_size:
            return m, None
    for decimals in range(1, 7):
        scale = 10**decimals
        for m in powers:
            # int(f * base) must land in (intermediate_size - m, intermediate_size]
            lo = math.floor((intermediate_size - m + 1) / base * scale)
            hi = math.ceil((intermediate_size + 1) / base * scale)
            for k in range(max(lo, 1), hi + 1):
                f = round(k / scale, decimals)
                if meta_ffn_hidden(dim, m, f) == intermediate_size:
                    return m, f
    raise ValueError(f"no Meta multiple_of/ffn_dim_multiplier gives intermediate_size={intermediate_size} at dim={dim}")


def rope_parameters(config: LlamaConfig) -> dict:
    """The config's rope dict: rope_type ('default' or 'llama3'), rope_theta and the llama3 scaling keys."""
    rope = dict(config.rope_parameters)
    rope.setdefault("rope_type", rope.get("type", "default"))
    if rope["rope_type"] not in ("default", "llama3"):
        raise ValueError(f"rope_type {rope['rope_type']!r} has no Meta/GGUF llama representation")
    return rope


def rope_freq_factors(config: LlamaConfig) -> Tensor:
    """llama3 per-frequency divisors, (head_dim // 2,) fp32, as convert_hf_to_gguf writes to rope_freqs.weight."""
    # convert_hf_to_gguf reads original_max_position_embeddings from the top level of config.json, where HF keeps
    # none, and so always uses 8192 (right for Llama 3.1); the config's own value is what HF and Meta compute with.
    rope = rope_parameters(config)
    head_dim = config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context_len = rope["original_max_position_embeddings"]
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_context_len / high:
            factors.append(1.0)
        elif wavelen > old_context_len / low:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _unpermute_rotary(w: Tensor, n_heads: int) -> Tensor:
    """Undo convert_llama_weights_to_hf's permute: HF rotate_half row order -> Meta's interleaved pairs."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_state_to_meta(model: LlamaForCausalLM) -> tuple[dict[str, Tensor], dict]:
    """Meta-named fp32 tensors and the params.json dict for `model`; output.weight is absent when tied."""
    cfg = model.config
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        raise ValueError(f"Meta format needs head_dim == dim // n_heads, got {cfg.head_dim}")
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"]}
    for i in range(cfg.num_hidden_layers):
        for hf_name, meta_name in _HF_TO_META_LAYER.items():
            w = sd[f"model.layers.{i}.{hf_name}.weight"]
            if hf_name == "self_attn.q_proj":
                w = _unpermute_rotary(w, cfg.num_attention_heads)
            elif hf_name == "self_attn.k_proj":
                w = _unpermute_rotary(w, cfg.num_key_value_heads)
            meta[f"layers.{i}.{meta_name}.weight"] = w
    meta["norm.weight"] = sd["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        meta["output.weight"] = sd["lm_head.weight"]

    rope = rope_parameters(cfg)
    multiple_of, ffn_dim_multiplier = meta_ffn_params(cfg.hidden_size, cfg.intermediate_size)
    params = {
        "dim": cfg.hidden_size,
        "n_layers": cfg.num_hidden_layers,
        "n_heads": cfg.num_attention_heads,
        "n_kv_heads": cfg.num_key_value_heads,
        "vocab_size": cfg.vocab_size,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": ffn_dim_multiplier,
        "norm_eps": cfg.rms_norm_eps,
        "rope_theta": rope["rope_theta"],
        "use_scaled_rope": rope["rope_type"] == "llama3",
    }
    if params["use_scaled_rope"]:
        params.update(
            rope_scaling_factor=rope["factor"],
            rope_low_freq_factor=rope["low_freq_factor"],
            rope_high_freq_factor=rope["high_freq_factor"],
            rope_original_max_position_embeddings=rope["original_max_position_embeddings"],
        )
    return meta, params


def meta_split_dim(name: str) -> int | None:
    """Dim along which Meta's model-parallel shards split tensor `name`; None when replicated."""
    return _META_SPLIT_DIM[name.removesuffix(".weight").split(".")[-1]]


def write_hf(model: LlamaForCausalLM, directory: str | Path, shards: int = 1) -> Path:
    """config.json + model.safetensors, or model-0000N-of-0000M.safetensors + index json when shards > 1."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]  # shares storage with embed_tokens; HF omits it too
    if shards == 1:
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
        return directory
    names = list(state)
    if not 1 < shards <= len(names):
        raise ValueError(f"shards must be in [1, {len(names)}], got {shards}")
    weight_map = {}
    for n, chunk in enumerate(np.array_split(np.array(names), shards), start=1):
        file = f"model-{n:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in chunk}, directory / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in chunk})
    total_size = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory


def write_meta(model: LlamaForCausalLM, directory: str | Path, mp: int = 1) -> Path:
    """params.json + consolidated.00.pth .. consolidated.{mp-1:02d}.pth, split like Meta's model-parallel shards."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, params = hf_state_to_meta(model)
    if params["n_heads"] % mp or params["n_kv_heads"] % mp:
        raise ValueError(f"mp={mp} must divide n_heads={params['n_heads']} and n_kv_heads={params['n_kv_heads']}")
    shards = [{} for _ in range(mp)]
    for name, t in tensors.items():
        dim = meta_split_dim(name)
        if dim is not None and t.shape[dim] % mp:
            raise ValueError(f"{name}: size {t.shape[dim]} along dim {dim} is not divisible by mp={mp}")
        parts = [t] * mp if dim is None else t.chunk(mp, dim=dim)
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    for rank, shard in enumerate(shards):
        torch.save(shard, directory / f"consolidated.{rank:02d}.pth")
    (directory / "params.json").write_text(json.dumps(params, indent=2))
    return directory


def _gguf_name(meta_name: str) -> str:
    parts = meta_name.removesuffix(".weight").split(".")
    if parts[0] == "layers":
        return f"blk.{parts[1]}.{_META_TO_GGUF_LAYER['.'.join(parts[2:])]}.weight"
    return f"{_META_TO_GGUF_TOP[parts[0]]}.weight"


def _meta_name(gguf_name: str) -> str:
    parts = gguf_name.removesuffix(".weight").split(".")
    if parts[0] == "blk":
        return f"layers.{parts[1]}.{_GGUF_TO_META_LAYER[parts[2]]}.weight"
    return f"{_GGUF_TO_META_TOP[parts[0]]}.weight"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class _GGUFWriter(gguf.GGUFWriter):
    """GGUFWriter that also writes empty arrays, which GGUF allows and GGUFWriter refuses."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            return (self._pack("I", vtype) if add_vtype else b"") + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


@functools.lru_cache(maxsize=4)
def _tokenizer_fields(source: Path) -> tuple[tuple[str, object, GGUFValueType, GGUFValueType | None], ...]:
    """(key, value, type, item type) of every tokenizer.* field; cached because parsing 49k tokens takes seconds."""
    fields = []
    for key, field in gguf.GGUFReader(source).fields.items():
        if not key.startswith("tokenizer."):
            continue
        item_type = None
        if field.types[0] == GGUFValueType.ARRAY:
            item_type = GGUFValueType(int(field.parts[3][0]))  # parts: key length, key, type, item type, count, ...
        fields.append((key, field.contents(), field.types[0], item_type))
    return tuple(fields)


def _copy_tokenizer(writer: _GGUFWriter, source: str | Path, vocab_size: int) -> None:
    fields = _tokenizer_fields(Path(source).resolve())
    n_tokens = len(next(value for key, value, _, _ in fields if key == gguf.Keys.Tokenizer.LIST))
    if n_tokens != vocab_size:
        raise ValueError(f"tokenizer_from has {n_tokens} tokens but the model's vocab_size is {vocab_size}")
    for key, value, vtype, item_type in fields:
        writer.add_key_value(key, value, vtype, sub_type=item_type)


def _write_byte_tokenizer(writer: _GGUFWriter, config: LlamaConfig) -> None:
    """A merge-free byte-level 'gpt2' vocab: id b < 256 is byte b, ids >= 256 are reserved control tokens."""
    if config.vocab_size < 256:
        raise ValueError(f"the byte-level tokenizer needs vocab_size >= 256, got {config.vocab_size}")
    byte_chars = _bytes_to_unicode()
    tokens = [byte_chars[b] for b in range(256)]
    tokens += [f"<|reserved_special_token_{i}|>" for i in range(config.vocab_size - 256)]
    types = [TokenType.NORMAL] * 256 + [TokenType.CONTROL] * (config.vocab_size - 256)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # llama.cpp and transformers both require the key; a byte-only vocab has no merged tokens to merge into.
    writer.add_key_value(gguf.Keys.Tokenizer.MERGES, [], GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    if config.bos_token_id is not None:
        writer.add_bos_token_id(config.bos_token_id)
    if eos is not None:
        writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)


def write_gguf(
    model: LlamaForCausalLM, path: str | Path, qtype: str = "F32", tokenizer_from: str | Path | None = None
) -> Path:
    """A llama.cpp-layout GGUF of `model`: Meta row order for q/k, 2-D weights in `qtype`, norms F32.

    Args:
        qtype: one of F32, F16, BF16, Q8_0, Q4_0, Q4_1.
        tokenizer_from: a GGUF whose tokenizer.* fields are copied (its vocab must match); default is a
            byte-level vocab of config.vocab_size tokens.
    """
    if qtype not in _GGUF_QTYPES:
        raise ValueError(f"qtype must be one of {sorted(_GGUF_QTYPES)}, got {qtype!r}")
    ggml_type, file_type = _GGUF_QTYPES[qtype]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    tensors, _ = hf_state_to_meta(model)
    rope = rope_parameters(cfg)

    writer = _GGUFWriter(path, arch="llama")
    writer.add_name("tiny-llama-random")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_file_type(file_type)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer_from is not None:
        _copy_tokenizer(writer, tokenizer_from, cfg.vocab_size)
    else:
        _write_byte_tokenizer(writer, cfg)

    # llama.cpp has no rope.scaling.* keys for llama3 scaling: convert_hf_to_gguf writes only this tensor.
    if rope["rope_type"] == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_freq_factors(cfg).numpy())
    for name, t in tensors.items():
        data = t.numpy()
        if data.ndim == 1 or ggml_type == GGMLQuantizationType.F32:
            writer.add_tensor(_gguf_name(name), data.astype(np.float32))
        elif ggml_type == GGMLQuantizationType.F16:
            writer.add_tensor(_gguf_name(name), data.astype(np.float16))
        else:
            # uint8 (rows, bytes per row); add_tensor recovers the element shape from raw_dtype
            writer.add_tensor(_gguf_name(name), gguf.quants.quantize(data, ggml_type), raw_dtype=ggml_type)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def dequantized_reference(path: str | Path) -> dict[str, Tensor]:
    """The GGUF's weights dequantized to fp32 under Meta names and (out, in) shapes; rope_freqs is left out."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(reversed([int(d) for d in t.shape]))  # GGUF stores ggml ne order (innermost first)
        out[_meta_name(t.name)] = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))
    return out
