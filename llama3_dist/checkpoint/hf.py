"""Hugging Face format: config.json + (sharded) safetensors, renamed to Meta's names on read.

HF stores wq/wk rows permuted per head (rotate-half rotary: all real parts, then all imaginary
parts); Meta interleaves (real, imag) pairs. Reading whole heads and un-permuting within each head
gives Meta's layout, so a head-aligned slice is read straight from the file. Files are read with
plain reads at the slice's offsets, never mapped, so a rank's memory holds only what it owns.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import torch
from torch import Tensor

from ..args import ModelArgs, RopeScaling
from ..errors import CheckpointError
from ..tokenizer import hf_tokenizer
from .base import Checkpoint

LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
TOP_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight$")


def meta_name(hf: str) -> str | None:
    """HF tensor name -> Meta name (None for tensors Meta has no use for, e.g. rotary inv_freq)."""
    if hf in TOP_NAMES:
        return TOP_NAMES[hf]
    m = LAYER.match(hf)
    if m and m.group(2) in LAYER_NAMES:
        return f"layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.weight"
    return None if hf.endswith("rotary_emb.inv_freq") else hf


def hf_name(meta: str) -> str:
    """Meta name -> HF tensor name (the inverse of meta_name)."""
    top = {m: h for h, m in TOP_NAMES.items()}
    if meta in top:
        return top[meta]
    i, _, rest = meta.removeprefix("layers.").partition(".")
    layer = {m: h for h, m in LAYER_NAMES.items()}[rest.removesuffix(".weight")]
    return f"model.layers.{i}.{layer}.weight"


def hf_to_meta_rows(w: Tensor, n_heads: int) -> Tensor:
    """HF rotate-half rows of wq/wk -> Meta's interleaved (real, imag) rows, head by head."""
    hd = w.shape[0] // n_heads
    return w.view(n_heads, 2, hd // 2, w.shape[1]).transpose(1, 2).reshape(n_heads * hd, w.shape[1])


def meta_to_hf_rows(w: Tensor, n_heads: int) -> Tensor:
    """The inverse of hf_to_meta_rows."""
    hd = w.shape[0] // n_heads
    return w.view(n_heads, hd // 2, 2, w.shape[1]).transpose(1, 2).reshape(n_heads * hd, w.shape[1])


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
            scaling = RopeScaling(
                float(rope["factor"]),
                float(rope.get("low_freq_factor", 1.0)),
                float(rope.get("high_freq_factor", 4.0)),
                int(rope.get("original_max_position_embeddings", 8192)),
            )
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


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
CHUNK_BYTES = 64 << 20  # a column slice is cut from row blocks of about this size


class SafetensorsFile:
    """One .safetensors file read with plain file reads (no mmap): a slice costs only its own bytes."""

    def __init__(self, path: Path):
        self.path = path
        fix = "it is truncated or corrupt, copy it again"
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise CheckpointError(
                        f"{path}: not a safetensors file (its header length {n} exceeds the file's {size} bytes); {fix}"
                    )
                header = json.loads(f.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}); {fix}") from None
        if not isinstance(header, dict) or not all(
            isinstance(v, dict) and "data_offsets" in v and "shape" in v and "dtype" in v
            for k, v in header.items()
            if k != "__metadata__"
        ):
            raise CheckpointError(f"{path}: the safetensors header is not a table of tensors; {fix}")
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.entries = header  # name -> {"dtype", "shape", "data_offsets": [begin, end]}
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.base + end > path.stat().st_size:
            raise CheckpointError(
                f"cannot read {path}: it is shorter than its header says (the file is truncated; copy it again)"
            )

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def _read(self, f, offset: int, nbytes: int) -> Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        f.seek(self.base + offset)
        if f.readinto(memoryview(buf.numpy())) != nbytes:
            raise CheckpointError(f"cannot read {self.path}: unexpected end of file (truncated?)")
        return buf

    def read(self, name: str, dim: int | None, start: int, stop: int | None) -> Tensor:
        entry = self.entries[name]
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(
                f"{self.path}: {name} has dtype {entry['dtype']}; only F32, F16 and BF16 safetensors are supported"
            )
        shape, begin = list(entry["shape"]), entry["data_offsets"][0]
        row = dtype.itemsize * (shape[1] if len(shape) > 1 else 1)
        with open(self.path, "rb") as f:
            if dim is None or dim == 0:  # whole rows: one contiguous read
                stop = shape[0] if stop is None or dim is None else stop
                start = 0 if dim is None else start
                return (
                    self._read(f, begin + start * row, (stop - start) * row).view(dtype).view(stop - start, *shape[1:])
                )
            stop = shape[1] if stop is None else stop
            out = torch.empty(shape[0], stop - start, dtype=dtype)
            step = max(1, CHUNK_BYTES // row)
            for r in range(0, shape[0], step):  # column slice: read row blocks, keep the columns
                n = min(step, shape[0] - r)
                block = self._read(f, begin + r * row, n * row).view(dtype).view(n, shape[1])
                out[r : r + n] = block[:, start:stop]
            return out


class HFCheckpoint(Checkpoint):
    """A Hugging Face model directory of (sharded) safetensors."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.args = config_to_args(json.loads((path / "config.json").read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path / 'config.json'}: cannot parse ({e})") from None
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: cannot parse ({e})") from None
        elif (path / "model.safetensors").is_file():
            weight_map = None
        else:
            raise CheckpointError(
                f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors weights are supported)"
            )
        self.files: dict[str, SafetensorsFile] = {}
        for file in sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]:
            if not (path / file).is_file():
                raise CheckpointError(
                    f"{path}: shard {file} named in {index.name} is missing; copy it into this directory"
                )
            self.files[file] = SafetensorsFile(path / file)
        if weight_map is None:
            weight_map = {k: "model.safetensors" for k in self.files["model.safetensors"].entries}
        self._where: dict[str, tuple[SafetensorsFile, str]] = {}  # meta name -> (file, hf name)
        for hf_name, file in weight_map.items():
            name = meta_name(hf_name)
            if name is not None:
                self._where[name] = (self.files[file], hf_name)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: f.shape(h) for name, (f, h) in self._where.items()}

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> Tensor:
        file, hf_name = self._where[name]
        heads = self._permuted_heads(name)
        if not heads:
            return file.read(hf_name, dim, start, stop)
        hd = self.args.hd
        if dim == 0 and (start % hd or (stop or 0) % hd):
            raise CheckpointError(f"{name}: slice [{start}, {stop}) is not head-aligned")
        if dim in (None, 0):  # whole heads: read them, then un-permute within each head
            t = file.read(hf_name, dim, start, stop)
            return hf_to_meta_rows(t, t.shape[0] // hd)
        t = hf_to_meta_rows(file.read(hf_name, None, 0, None), heads)
        stop = t.shape[dim] if stop is None else stop
        return t.narrow(dim, start, stop - start).clone()

    def _permuted_heads(self, name: str) -> int:
        """Number of heads if `name` is stored HF-permuted (wq, wk), else 0."""
        if name.endswith("attention.wq.weight"):
            return self.args.n_heads
        if name.endswith("attention.wk.weight"):
            return self.args.n_kv_heads
        return 0

    def tokenizer(self):
        return hf_tokenizer(self.path)
