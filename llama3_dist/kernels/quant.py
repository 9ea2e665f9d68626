"""Weight-only quantized weights in llama.cpp's block formats: matmuls, lookups, quantizing on load.

A quantized weight of (N, K) features is a uint8 tensor (N, K / block * block_bytes), each row its
blocks byte for byte as in a GGUF file, so a checkpoint's blocks are copied, not converted, and a
tensor-parallel slice is a slice of rows or of whole blocks. `qtype` names the format (GGML's
names); None means a float weight.

    Q8_0  32 int8 + fp16 scale                   (34 bytes / 32)   int8 on load
    Q4_0  32 4-bit + fp16 scale, offset -8       (18 bytes / 32)
    Q4_1  32 4-bit + fp16 scale and minimum      (20 bytes / 32)   int4 on load
    Q4_K  256: 8 x 32 4-bit, 6-bit scales/mins   (144 bytes / 256)
    Q6_K  256: 16 x 16 6-bit, int8 scales        (210 bytes / 256)

A decode step (at most MAX_ROWS rows of x) on CPU runs `quant.cpp`, which dequantizes in registers
and accumulates in float32 (with runtime.activations=int8, it rounds x to int8 per 32 elements and
multiplies integers, as llama.cpp does): the variant of the kernel family that `kernels` chose (its avx2 and
AVX-512 builds run AVX2 + FMA loops, its portable build a loop the compiler vectorises). Larger
inputs (prefill) dequantize a block of rows at a time (kernels.linear_by_rows). Where the family is not
built (no compiler, LLAMA3_DIST_KERNELS=torch, or CUDA) every path is torch's: the dequantizers
below, then F.linear.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import kernels

# qtype -> (code in quant.cpp, elements per block, bytes per block)
FORMATS = {"Q8_0": (0, 32, 34), "Q4_0": (1, 32, 18), "Q4_1": (2, 32, 20), "Q4_K": (3, 256, 144), "Q6_K": (4, 256, 210)}
# runtime.weights -> the format float matrices are quantized to on load. The embedding table (and the
# output head) stays Q8_0 under int4, as llama.cpp's 4-bit presets keep it at 6-8 bits: it carries
# most of int4's error (SmolLM2: perplexity +4% with a 4-bit table, +0.x% with an 8-bit one).
ON_LOAD = {"int8": "Q8_0", "int4": "Q4_1"}
ON_LOAD_TABLE = {"int8": "Q8_0", "int4": "Q8_0"}
MAX_ROWS = 16
# runtime.activations=int8 rounds the input of a matmul against these formats (round_activations)
INT8_X_FORMATS = ("Q8_0", "Q4_0", "Q4_1")


def block_size(qtype: str) -> int:
    return FORMATS[qtype][1]


def row_bytes(qtype: str, in_features: int) -> int:
    """Bytes of one quantized row of `in_features` elements (a multiple of the block size)."""
    _, block, nbytes = FORMATS[qtype]
    return in_features // block * nbytes


def in_features(w: Tensor, qtype: str) -> int:
    _, block, nbytes = FORMATS[qtype]
    return w.shape[-1] // nbytes * block


class Ops:
    """One variant's quantized ops: qlinear(x, w, code) and dequant(w, code)."""

    def __init__(self, variant: str):
        self.variant = variant
        self.qlinear = kernels.op(variant, "qlinear")
        self.dequant = kernels.op(variant, "dequant")


_ops: dict[str, Ops] = {}


def ops_of(variant: str) -> Ops:
    """`variant`'s ops, built on first use (raises kernels.BuildError), with their shapes for torch.compile."""
    if variant in _ops:
        return _ops[variant]
    found = _ops[variant] = Ops(variant)
    torch.library.register_fake(f"llama3_dist::qlinear_{variant}")(
        lambda x, w, qtype, int8_x=False: x.new_empty(x.shape[0], w.shape[0])
    )
    torch.library.register_fake(f"llama3_dist::dequant_{variant}")(
        lambda w, qtype: w.new_empty(w.shape[0], w.shape[1] // _BYTES[qtype] * _BLOCK[qtype], dtype=torch.float32)
    )
    return found


def load() -> Ops | None:
    """The quantized ops of the variant `kernels` chose, or None where quantized matmuls use torch."""
    return None if kernels.load() is None else ops_of(kernels.variant())


_BLOCK = [b for _, b, _ in FORMATS.values()]
_BYTES = [n for _, _, n in FORMATS.values()]


def _kernel(w: Tensor):
    return load() if w.device.type == "cpu" else None


def dequantize(w: Tensor, qtype: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """Rows of a quantized weight (N, bytes) as floats (N, K) in `dtype`."""
    ops = _kernel(w)
    if ops is not None and w.is_contiguous():
        return ops.dequant(w, FORMATS[qtype][0]).to(dtype)
    return dequantize_torch(w, qtype).to(dtype)


def linear(x: Tensor, w: Tensor, qtype: str | None, int8_x: bool = False) -> Tensor:
    """x @ W.T (no bias) for a float weight (qtype None) or a quantized one; float32 accumulation.

    int8_x (a weight in INT8_X_FORMATS): x @ W.T with x rounded as round_activations rounds it; a
    decode step's kernel then multiplies integers (llama.cpp's scheme)."""
    if qtype is None:
        return kernels.linear(x, w)
    K = x.shape[-1]
    rows = x.numel() // K
    ops = _kernel(w)
    if ops is not None and rows <= MAX_ROWS and x.dtype in (torch.float32, torch.bfloat16):
        return ops.qlinear(x.reshape(rows, K), w, FORMATS[qtype][0], int8_x).view(*x.shape[:-1], w.shape[0])
    if int8_x:
        x = round_activations(x)
    return kernels.linear_by_rows(x, w, lambda rows: dequantize(rows, qtype, x.dtype))


def round_activations(x: Tensor) -> Tensor:
    """x rounded to int8 codes and back, per 32 elements of its last dimension, as llama.cpp rounds
    activations to Q8_0: dx = max|x| / 127, x ~ dx * round-half-even(x / dx). In x's dtype, computed in float32."""
    xb = x.float().unflatten(-1, (-1, 32))
    d = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, 0.0)
    return (torch.round(xb * inv) * d).flatten(-2).to(x.dtype)


def embedding(tokens: Tensor, w: Tensor, qtype: str | None, dtype: torch.dtype) -> Tensor:
    """Rows `tokens` of an embedding table, (..., dim) in `dtype`; quantized rows dequantized on lookup."""
    if qtype is None:
        return F.embedding(tokens, w)
    rows = w.index_select(0, tokens.reshape(-1))
    return dequantize(rows, qtype, dtype).view(*tokens.shape, -1)


# --- torch reference (the fallback, and the tests' second opinion) ---------------------------------


def _f16(b: Tensor) -> Tensor:
    """Little-endian fp16 from pairs of bytes (..., 2) -> float32 (..., 1)."""
    return b.contiguous().view(torch.float16).float()


def dequantize_torch(w: Tensor, qtype: str) -> Tensor:
    """Torch (any device) dequantizer of (N, bytes) rows to float32 (N, K); K-quants go through gguf on CPU."""
    nbytes = FORMATS[qtype][2]
    N = w.shape[0]
    b = w.reshape(N, -1, nbytes)  # (N, blocks, bytes)
    if qtype == "Q8_0":
        d, q = _f16(b[..., :2]), b[..., 2:].contiguous().view(torch.int8).float()
        return (d * q).reshape(N, -1)
    if qtype in ("Q4_0", "Q4_1"):
        d = _f16(b[..., :2])
        m = _f16(b[..., 2:4]) if qtype == "Q4_1" else -8.0 * d
        qs = b[..., 4 if qtype == "Q4_1" else 2 :]
        q = torch.cat([qs & 0xF, qs >> 4], dim=-1).float()  # elements 0-15 in low nibbles, 16-31 in high
        return (d * q + m).reshape(N, -1)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    out = gguf_dequantize(w.cpu().numpy(), GGMLQuantizationType[qtype])
    return torch.from_numpy(np.array(out, dtype=np.float32)).to(w.device)


QUANTIZE_CHUNK = 1 << 18  # float elements converted at a time (1 MiB as float32): the temporaries stay small


def quantize(t: Tensor, qtype: str, chunk: int = QUANTIZE_CHUNK) -> Tensor:
    """Float weights (N, K) -> blocks (N, bytes) in Q8_0, Q4_0 or Q4_1, as llama.cpp's reference quantizer rounds.

    Rows are converted `chunk` elements at a time, so the float32 temporaries stay a few MiB."""
    if qtype not in ("Q8_0", "Q4_0", "Q4_1"):
        raise ValueError(f"cannot quantize to {qtype} (only Q8_0, Q4_0, Q4_1)")
    N, K = t.shape
    out = torch.empty(N, row_bytes(qtype, K), dtype=torch.uint8)
    step = max(1, chunk // K)
    for r in range(0, N, step):
        out[r : r + step] = _quantize_rows(t[r : r + step].float(), qtype)
    return out


def _quantize_rows(x: Tensor, qtype: str) -> Tensor:
    N = x.shape[0]
    x = x.reshape(N, -1, 32)  # (N, blocks, 32)
    if qtype == "Q8_0":
        d = x.abs().amax(-1, keepdim=True) / 127
        q = x * torch.where(d == 0, 0.0, 1 / d)
        q = (q.sign() * (q.abs() + 0.5).floor()).to(torch.int8).view(torch.uint8)  # round half away from 0
        head = [d.half().view(torch.uint8)]
    elif qtype == "Q4_0":
        amax_idx = x.abs().argmax(-1, keepdim=True)
        mx = x.gather(-1, amax_idx)  # the signed value of largest magnitude
        d = mx / -8
        inv = torch.where(d == 0, 0.0, 1 / d)
        q = (x * inv + 8.5).trunc().clamp(0, 15).to(torch.uint8)
        head = [d.half().view(torch.uint8)]
    else:
        mx, mn = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)
        d = (mx - mn) / 15
        inv = torch.where(d == 0, 0.0, 1 / d)
        q = ((x - mn) * inv + 0.5).trunc().clamp(0, 15).to(torch.uint8)
        head = [d.half().view(torch.uint8), mn.half().view(torch.uint8)]
    if qtype != "Q8_0":
        q = q[..., :16] | (q[..., 16:] << 4)
    return torch.cat([*head, q], dim=-1).reshape(N, -1)
