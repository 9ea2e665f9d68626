"""Hugging Face format: config.json + (sharded) safetensors, renamed to Meta's names on read.

HF stores wq/wk rows permuted per head (rotate-half rotary: all real parts, then all imaginary
parts); Meta interleaves (real, imag) pairs. Reading whole heads and un-permuting within each head
gives Meta's layout, and a head-aligned slice can be read straight from the file with get_slice.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import Tensor

from ..errors import CheckpointError
from ..model import ModelArgs, RopeScaling
from .base import Checkpoint

LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight$")


def meta_name(hf: str) -> str | None:
    """HF tensor name -> Meta name (None for tensors Meta has no use for, e.g. rotary inv_freq)."""
    if hf in TOP_NAMES:
        return TOP_NAMES[hf]
    m = LAYER.match(hf)
    if m and m.group(2) in LAYER_NAMES:
        return f"layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.weight"
    return None if hf.endswith("rotary_emb.inv_freq") else hf


def config_to_args(cfg: dict) -> ModelArgs:
    """config.json of a LlamaForCausalLM -> ModelArgs (rope scaling from rope_scaling/rope_parameters)."""
    if cfg.get("model_type", "llama") != "llama":
        raise CheckpointError(f"config.json: model_type {cfg.get('model_type')!r} is not supported (only llama)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise CheckpointError("config.json: attention_bias/mlp_bias are not supported (Llama 3 has no biases)")
    rope = dict(cfg.get("rope_parameters") or {})
    rope.update(cfg.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise CheckpointError(f"config.json: rope type {kind!r} is not supported (default or llama3)")
    try:
        n_heads = int(cfg["num_attention_heads"])
        scaling = None
        if kind == "llama3":
            scaling = RopeScaling(float(rope["factor"]), float(rope.get("low_freq_factor", 1.0)),
                                  float(rope.get("high_freq_factor", 4.0)),
                                  int(rope.get("original_max_position_embeddings", 8192)))
        return ModelArgs(
            dim=int(cfg["hidden_size"]),
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            vocab_size=int(cfg["vocab_size"]),
            hidden_dim=int(cfg["intermediate_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rope_scaling=scaling,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            head_dim=cfg.get("head_dim"),
            max_position_embeddings=cfg.get("max_position_embeddings"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"config.json: missing or invalid field {e}") from None


class HFCheckpoint(Checkpoint):
    """A Hugging Face model directory; every safetensors file is opened lazily and read by slice."""

    def __init__(self, path: Path):
        self.path = path
        self._files: dict[str, object] = {}  # file name -> open safetensors handle
        try:
            self.args = config_to_args(json.loads((path / "config.json").read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path / 'config.json'}: cannot parse ({e})") from None
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (path / "model.safetensors").is_file():
            weight_map = {k: "model.safetensors" for k in self._open("model.safetensors").keys()}
        else:
            raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                  f"(only safetensors weights are supported)")
        self._where: dict[str, tuple[str, str]] = {}  # meta name -> (file, hf name)
        for hf_name, file in weight_map.items():
            name = meta_name(hf_name)
            if name is not None:
                self._where[name] = (file, hf_name)

    def _open(self, file: str):
        if file not in self._files:
            f = self.path / file
            if not f.is_file():
                raise CheckpointError(f"{self.path}: shard {file} listed in the index is missing")
            try:
                self._files[file] = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"cannot read {f}: {e} (the file is truncated or corrupt)") from None
        return self._files[file]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(self._open(f).get_slice(h).get_shape()) for name, (f, h) in self._where.items()}

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> Tensor:
        file, hf_name = self._where[name]
        sl = self._open(file).get_slice(hf_name)
        heads = self._permuted_heads(name)
        hd = self.args.hd
        if heads and dim is not None and dim != 0:
            t = self._unpermute(sl[:], heads)
            stop = t.shape[dim] if stop is None else stop
            return t.narrow(dim, start, stop - start)
        if dim is None:
            t = sl[:]
        else:
            stop = sl.get_shape()[dim] if stop is None else stop
            if heads and (start % hd or stop % hd):
                raise CheckpointError(f"{name}: slice [{start}, {stop}) is not head-aligned")
            t = sl[start:stop] if dim == 0 else sl[:, start:stop]
        return self._unpermute(t, t.shape[0] // hd) if heads else t

    def _permuted_heads(self, name: str) -> int:
        """Number of heads if `name` is stored HF-permuted (wq, wk), else 0."""
        if name.endswith("attention.wq.weight"):
            return self.args.n_heads
        if name.endswith("attention.wk.weight"):
            return self.args.n_kv_heads
        return 0

    def _unpermute(self, w: Tensor, n_heads: int) -> Tensor:
        """HF rotate-half rows -> Meta interleaved rows, head by head."""
        hd = self.args.hd
        return w.view(n_heads, 2, hd // 2, w.shape[1]).transpose(1, 2).reshape(n_heads * hd, w.shape[1])

    def tokenizer(self):
        from ..tokenizer import hf_tokenizer
        return hf_tokenizer(self.path)

