"""Optional CPU kernels for decode: an AVX-512 / AVX512-BF16 matrix-vector product, JIT-built once.

`linear(x, w)` is F.linear, except that on a CPU with AVX512-BF16 a few rows of x (a decode step)
go through `gemv.cpp`, which streams the weights once at close to memory bandwidth. The kernel is
compiled with torch.utils.cpp_extension on first use and cached (TORCH_EXTENSIONS_DIR); without a
compiler or the CPU features, or with LLAMA3_DIST_KERNELS=torch, everything stays on F.linear.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

MAX_ROWS = 16  # above this, x @ W.T is a real matrix product and oneDNN/MKL win
_gemv = None
_tried = False


def _cpu_has(*flags: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            line = next(x for x in f if x.startswith("flags"))
    except (OSError, StopIteration):
        return False
    have = set(line.split())
    return all(flag in have for flag in flags)


def load() -> object | None:
    """The compiled op (torch.ops.llama3_dist.gemv), or None where it cannot be had (logged once)."""
    global _gemv, _tried
    if _tried:
        return _gemv
    _tried = True
    if os.environ.get("LLAMA3_DIST_KERNELS", "auto") == "torch":
        return None
    if not _cpu_has("avx512f", "avx512_bf16"):
        log.info("CPU lacks AVX-512 BF16: decode matmuls use torch's kernels")
        return None
    try:
        from torch.utils.cpp_extension import load as build
        build("llama3_dist_gemv", [str(Path(__file__).with_name("gemv.cpp"))], is_python_module=False,
              extra_cflags=["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma"],
              verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, ...: fall back, never fail
        log.warning("could not build the gemv kernel (%s); using torch's kernels", str(e).splitlines()[0])
        return None
    torch.library.register_fake("llama3_dist::gemv")(lambda x, w: x.new_empty(x.shape[0], w.shape[0]))
    _gemv = torch.ops.llama3_dist.gemv
    return _gemv


def gemv(x: Tensor, w: Tensor) -> Tensor:
    """x (M, K) @ w (N, K).T with the streaming kernel (load() must have succeeded)."""
    return _gemv(x, w)


def linear(x: Tensor, w: Tensor) -> Tensor:
    """x @ w.T (no bias); decode-sized inputs on CPU use the streaming kernel when it is available."""
    rows = x.numel() // x.shape[-1]
    if (rows <= MAX_ROWS and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and w.dtype == x.dtype and w.is_contiguous() and not torch.is_grad_enabled()
            and load() is not None):
        return _gemv(x.reshape(rows, x.shape[-1]), w).view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)
