"""GGUF (llama.cpp) format: one file, memory-mapped; tensors dequantized per slice to float32, or their
blocks copied as they are (`read_quant`) for the block formats the quantized kernels run.

llama.cpp's converter stores wq/wk rows in Meta's interleaved rotary order, so only names change.
Quantized rows are whole blocks of a row, so a row slice reads just its rows' bytes, and a column
slice reads just its blocks when it falls on block boundaries.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from torch import Tensor

from ..args import ModelArgs
from ..errors import CheckpointError
from ..kernels.quant import FORMATS as QUANT_FORMATS
from ..kernels.quant import block_size
from ..kernels.quant import dequantize as dequantize_blocks
from ..tokenizer import gguf_tokenizer
from .base import Checkpoint, release_pages

SUPPORTED = {
    GGMLQuantizationType[n]
    for n in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
}
NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
LAYER_NAMES = {
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_up": "feed_forward.w3",
    "ffn_down": "feed_forward.w2",
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
}
_GGUF_TOP = {meta: g for g, meta in NAMES.items()}
_GGUF_LAYER = {meta: g for g, meta in LAYER_NAMES.items()}
BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight$")
ROPE_FREQS = "rope_freqs.weight"


def gguf_name(meta: str) -> str:
    """Meta name -> llama.cpp tensor name (the inverse of meta_name)."""
    stem = meta.removesuffix(".weight")
    if stem.startswith("layers."):
        _, i, rest = stem.split(".", 2)
        return f"blk.{i}.{_GGUF_LAYER[rest]}.weight"
    return f"{_GGUF_TOP[stem]}.weight"


def meta_name(gguf_name: str) -> str:
    """llama.cpp tensor name -> Meta name (unknown names pass through, and fail the shape check)."""
    m = BLOCK.match(gguf_name)
    if m and m.group(2) in LAYER_NAMES:
        return f"layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.weight"
    stem = gguf_name.removesuffix(".weight")
    return f"{NAMES[stem]}.weight" if stem in NAMES else gguf_name


class GGUFCheckpoint(Checkpoint):
    """A llama-architecture .gguf file."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.reader = GGUFReader(path)
        except (ValueError, OSError, IndexError, KeyError) as e:
            raise CheckpointError(
                f"{path}: not a readable GGUF file ({e}); it is truncated or corrupt, copy it again"
            ) from None
        self.tensors = {meta_name(t.name): t for t in self.reader.tensors if t.name != ROPE_FREQS}
        for t in self.tensors.values():
            if t.tensor_type not in SUPPORTED:
                raise CheckpointError(
                    f"{path}: tensor {t.name} uses GGUF type {t.tensor_type.name}, which is not supported "
                    f"(supported: {', '.join(sorted(q.name for q in SUPPORTED))}); re-quantize to Q8_0 or F16"
                )
        self.args = self._args()

    def field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def _args(self) -> ModelArgs:
        arch = self.field("general.architecture")
        if arch != "llama":
            raise CheckpointError(f"{self.path}: architecture {arch!r} is not supported (only llama)")
        scaling = self.field("llama.rope.scaling.type", "none")
        if scaling not in ("none", "llama3"):
            raise CheckpointError(f"{self.path}: rope scaling {scaling!r} is not supported")
        factors = None
        rope = next((t for t in self.reader.tensors if t.name == ROPE_FREQS), None)
        if rope is not None:
            factors = tuple(float(x) for x in dequantize(rope.data, rope.tensor_type).reshape(-1))
        try:
            n_heads = int(self.field("llama.attention.head_count"))
            dim = int(self.field("llama.embedding_length"))
            vocab = self.field("llama.vocab_size") or self.tensors["tok_embeddings.weight"].shape[-1]
            return ModelArgs(
                dim=dim,
                n_layers=int(self.field("llama.block_count")),
                n_heads=n_heads,
                n_kv_heads=int(self.field("llama.attention.head_count_kv", n_heads)),
                vocab_size=int(vocab),
                hidden_dim=int(self.field("llama.feed_forward_length")),
                norm_eps=float(self.field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(self.field("llama.rope.freq_base", 10000.0)),
                rope_freq_factors=factors,
                tie_embeddings="output.weight" not in self.tensors,
                head_dim=self.field("llama.attention.key_length"),
                max_position_embeddings=self.field("llama.context_length"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: missing or invalid llama metadata ({e})") from None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(int(n) for n in reversed(t.shape)) for name, t in self.tensors.items()}

    def qtype(self, name: str) -> str | None:
        name_ = self.tensors[name].tensor_type.name
        return name_ if name_ in QUANT_FORMATS else None

    def read_quant(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> Tensor:
        t = self.tensors[name]
        data = t.data  # uint8 (rows, row bytes), mapped from the file
        if dim == 0:
            data = data[start:stop]
        elif dim == 1:
            block, nbytes = GGML_QUANT_SIZES[t.tensor_type]
            stop = int(t.shape[0]) if stop is None else stop
            if start % block or stop % block:
                raise ValueError(f"{name}: columns {start}:{stop} do not fall on {block}-element blocks")
            data = data[:, start // block * nbytes : stop // block * nbytes]
        out = torch.from_numpy(np.array(data, dtype=np.uint8))  # a copy of just this slice
        release_pages(t.data.ctypes.data, t.data.nbytes)
        return out

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> Tensor:
        t = self.tensors[name]
        qtype = self.qtype(name)
        block = block_size(qtype) if qtype else 1
        if qtype is not None and (dim != 1 or start % block == 0 and (stop or 0) % block == 0):
            return dequantize_blocks(self.read_quant(name, dim, start, stop), qtype)  # the C++ dequantizer: same values
        data, qtype = t.data, t.tensor_type
        shape = tuple(int(n) for n in reversed(t.shape))
        if dim is None:
            out = dequantize(data, qtype)
        elif dim == 0:
            out = dequantize(data[start:stop], qtype)
        else:
            stop = shape[1] if stop is None else stop
            block, nbytes = GGML_QUANT_SIZES[qtype]
            if data.dtype != np.uint8:  # F32 / F16 come as typed element arrays
                block = nbytes = 1
            if start % block == 0 and stop % block == 0:  # whole blocks: read only these columns
                out = dequantize(data[:, start // block * nbytes : stop // block * nbytes], qtype)
            else:
                out = dequantize(data, qtype)[:, start:stop]
        out = torch.from_numpy(np.array(out, dtype=np.float32))  # a copy: the file stays read-only
        release_pages(data.ctypes.data, data.nbytes)
        return out

    def tokenizer(self):
        return gguf_tokenizer(self.reader)
