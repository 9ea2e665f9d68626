"""The Checkpoint interface every format implements, and the tensor shapes an architecture implies."""

from __future__ import annotations

import ctypes
import mmap
import sys
from pathlib import Path

import torch
from torch import Tensor

from ..args import ModelArgs


class Checkpoint:
    """Metadata plus lazy, sliceable reads of tensors under Meta's names, in Meta's layout."""

    path: Path
    args: ModelArgs

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Full shape of every tensor in the checkpoint, by Meta name."""
        raise NotImplementedError

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> Tensor:
        """Tensor `name`, or only its [start, stop) slice along dim, in memory of its own (no file mapping).

        Reads no more than it must, and drops the file pages it touched from this process, so peak
        memory while loading stays near the weights themselves.
        """
        raise NotImplementedError

    def qtype(self, name: str) -> str | None:
        """The block format (kernels/quant.py FORMATS) tensor `name` is stored in; None for float tensors."""
        return None

    def read_quant(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> Tensor:
        """The raw blocks of tensor `name` (or its [start, stop) slice along dim, in whole blocks) as
        uint8 (rows, blocks x block bytes), in memory of its own; only for tensors with a qtype."""
        raise NotImplementedError

    def tokenizer(self):
        """The tokenizer that belongs to this checkpoint."""
        raise NotImplementedError


class FloatView(Checkpoint):
    """Another checkpoint's tensors as floats only (its block formats dequantized, as a float export of the
    same model would hold them), so runtime.weights=int8 / int4 quantize every matrix anew."""

    def __init__(self, inner: Checkpoint):
        self.inner, self.path, self.args = inner, inner.path, inner.args

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.inner.shapes()

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> Tensor:
        return self.inner.read(name, dim, start, stop)


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Meta name -> full shape, for every tensor of the architecture."""
    d, hd, v, f = args.dim, args.hd, args.vocab_size, args.hidden_dim
    shapes = {"tok_embeddings.weight": (v, d), "norm.weight": (d,)}
    if not args.tie_embeddings:
        shapes["output.weight"] = (v, d)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update(
            {
                p + "attention.wq.weight": (args.n_heads * hd, d),
                p + "attention.wk.weight": (args.n_kv_heads * hd, d),
                p + "attention.wv.weight": (args.n_kv_heads * hd, d),
                p + "attention.wo.weight": (d, args.n_heads * hd),
                p + "feed_forward.w1.weight": (f, d),
                p + "feed_forward.w3.weight": (f, d),
                p + "feed_forward.w2.weight": (d, f),
                p + "attention_norm.weight": (d,),
                p + "ffn_norm.weight": (d,),
            }
        )
    return shapes


def narrow(t: Tensor, dim: int | None, start: int, stop: int | None) -> Tensor:
    """t[start:stop] along dim (all of t when dim is None)."""
    if dim is None:
        return t
    stop = t.shape[dim] if stop is None else stop
    return t.narrow(dim, start, stop - start)


_MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def release_pages(ptr: int, nbytes: int) -> None:
    """Drop the resident pages of a read-only file mapping [ptr, ptr + nbytes) from this process.

    The pages stay in the page cache and are read again if touched; without this, every mmap'd byte
    a rank has read counts in its RSS until the whole file is unmapped.
    """
    if _libc is None:
        return
    page = mmap.PAGESIZE
    start, end = -(-ptr // page) * page, (ptr + nbytes) // page * page
    if end > start:
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def copy_out(src: Tensor, chunk_bytes: int = 16 << 20) -> Tensor:
    """Copy a (possibly strided) view of an mmap'd tensor into fresh memory, block of rows by block,
    dropping each block's file pages once copied: peak memory grows by the copy plus one block."""
    out = torch.empty(src.shape, dtype=src.dtype)
    if src.dim() == 0 or src.numel() == 0:
        return out.copy_(src)
    row_bytes = max(1, src[0].numel() * src.element_size())
    step = max(1, chunk_bytes // row_bytes)
    for r in range(0, src.shape[0], step):
        block = src[r : r + step]
        out[r : r + step] = block
        end = block[-1].data_ptr() + (block[-1].numel() and row_bytes)  # rows share one stride
        release_pages(block.data_ptr(), end - block.data_ptr())
    return out


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps freed chunks below its mmap threshold,
    which a load's transient copies raise, so without this RSS stays above the live weights)."""
    if _libc is not None and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)
