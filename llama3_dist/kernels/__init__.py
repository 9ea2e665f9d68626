"""CPU decode kernels, one build per instruction set, chosen at run time from the CPU's features.

`linear(x, w)` is F.linear, except that a few rows of x (a decode step) go through the gemv of
`decode.cpp`, which streams the weights once at close to memory bandwidth, and that larger float32
products run on oneDNN on AVX-512 CPUs (`gemm`). `fused(name, x)` hands
out the fused steps of an eager decode layer (rms_norm, rope, attend_decode, cache_write); `quant.py`
the matmuls over quantized blocks of `quant.cpp`. The same sources are compiled together for each
variant below with its own -m flags, and register torch.ops.llama3_dist.<op>_<variant>:

    avx512bf16  AVX-512 F/BW/VL + AVX512-BF16 + AVX512-VNNI (every CPU with the first has the second):
                fp32 FMAs, bf16 dot products (vdpbf16ps), int8 dot products (vpdpbusd)
    avx512      AVX-512 F/BW/VL: fp32 FMAs, bf16 widened to fp32 in registers (a shift and a mask)
    avx2        AVX2 + FMA + F16C: the same on 8 lanes (the x86-64 baseline of the last decade)
    portable    plain C++ the compiler vectorises for its default target (any CPU, ARM included)

Dispatch: the first variant of that list whose flags /proc/cpuinfo lists (read once). The
environment variable LLAMA3_DIST_KERNELS=auto|avx512bf16|avx512|avx2|portable|torch forces one
(torch: F.linear everywhere); forcing a variant this CPU cannot execute is a UserError naming the
ones it can. Each variant is JIT-built once with torch.utils.cpp_extension into its own folder of
TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), under an flock so that one process (rank)
builds while the others wait, at most LLAMA3_DIST_KERNELS_TIMEOUT seconds (default 600). A
killed build cannot block later runs: the flock dies with its process, and torch's own lock file
left in the folder is removed by whoever holds the flock. If the build fails (no compiler) or the
wait times out, decode stays on F.linear, with one warning.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError

log = logging.getLogger(__name__)

MAX_ROWS = 16  # above this, x @ W.T is a real matrix product and oneDNN/MKL win
VARIANTS = ("avx512bf16", "avx512", "avx2", "portable")  # best first
CHOICES = ("auto", *VARIANTS, "torch")
_AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx2", "fma")
REQUIRES = {
    "avx512bf16": (*_AVX512, "avx512_bf16", "avx512_vnni"),
    "avx512": _AVX512,
    "avx2": ("avx2", "fma", "f16c"),
    "portable": (),
}
CFLAGS = {
    "avx512bf16": [
        "-DL3D_AVX512BF16",
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512bf16",
        "-mavx512vnni",
        "-mavx2",
        "-mfma",
        "-mf16c",
    ],
    "avx512": ["-DL3D_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
    "avx2": ["-DL3D_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "portable": [],
}
SOURCES = [Path(__file__).with_name(name) for name in ("decode.cpp", "quant.cpp")]  # + isa.h
FUSED = ("rms_norm", "rope", "attend_decode", "cache_write")  # ops beside gemv, one per eager decode step part
# Of those, the ones a compiled decode step calls too: inductor fuses the pointwise steps itself, but
# attention's two small products go to a BLAS call each (~18 us per layer on a 2-core Zen 3) with a
# softmax kernel between; the fused op made a compiled SmolLM2 step 5% faster (8.53 -> 8.08 ms).
IN_GRAPHS = ("attend_decode",)

_built: set[str] = set()  # variants built and loaded in this process
_chosen: str | None = None  # the variant linear() uses, "torch" for F.linear; None: not decided yet
_gemv = None  # the chosen op


class BuildError(RuntimeError):
    """A kernel variant could not be built or loaded (no compiler, a compile error, a lock timeout)."""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, ARM `Features`); empty where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def supported() -> list[str]:
    """The variants this CPU can execute, best first (portable always)."""
    have = cpu_flags()
    return [v for v in VARIANTS if all(flag in have for flag in REQUIRES[v])]


def isa_summary() -> str:
    """The instruction sets that matter here, as listed by the CPU (e.g. 'avx2 fma f16c')."""
    wanted = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "avx2", "fma", "f16c", "asimd", "sve")
    return " ".join(f for f in wanted if f in cpu_flags()) or "none of avx2/avx512/neon listed"


def requested() -> str:
    """The variant LLAMA3_DIST_KERNELS asks for, resolved ('auto' -> the best supported one)."""
    want = os.environ.get("LLAMA3_DIST_KERNELS", "auto").strip().lower() or "auto"
    if want not in CHOICES:
        raise UserError(f"LLAMA3_DIST_KERNELS={want}: unknown kernel variant; use one of {', '.join(CHOICES)}")
    can = supported()
    if want == "auto":
        return can[0]
    if want != "torch" and want not in can:
        missing = " ".join(f for f in REQUIRES[want] if f not in cpu_flags())
        raise UserError(
            f"LLAMA3_DIST_KERNELS={want}: this CPU lacks {missing}; use auto or one of {', '.join([*can, 'torch'])}"
        )
    return want


def source_digest() -> str:
    """A digest of the kernels' C++ sources and build flags. Compiled graphs call the ops by name, and
    torch keys its compile caches on the graph, not on the code behind an op: the compile settings
    (fast_decode) add this digest to the key, so a graph cached against an older build of the ops
    (another signature, say) is never run against this one."""
    h = hashlib.sha256()
    for path in sorted([*SOURCES, SOURCES[0].with_name("isa.h")]):
        h.update(path.read_bytes())
    h.update(repr(sorted(CFLAGS.items())).encode())
    return h.hexdigest()[:16]


def build_dir(variant: str) -> Path:
    """Where `variant` is built: its own folder of TORCH_EXTENSIONS_DIR, per torch version."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return root / f"llama3_dist_kernels_{variant}-torch{torch.__version__.split('+')[0]}"


def _lock(path: Path, timeout: float):
    """An exclusive flock on `path`, waiting at most `timeout` seconds; the open file (close to release)."""
    f = open(path, "a+")  # noqa: SIM115 - held until the build is done
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if time.monotonic() >= deadline:
                f.close()
                raise BuildError(
                    f"waited {timeout:g} s for another process building {path.with_suffix('')} "
                    f"(raise LLAMA3_DIST_KERNELS_TIMEOUT, or remove the folder)"
                ) from None
            time.sleep(0.1)


def _build(variant: str) -> None:
    """Build (or find built) and load `variant`, and give its ops their shapes for torch.compile. Raises BuildError."""
    from torch.utils.cpp_extension import load as cpp_load

    out = build_dir(variant)
    out.mkdir(parents=True, exist_ok=True)
    timeout = float(os.environ.get("LLAMA3_DIST_KERNELS_TIMEOUT", "600"))
    lock = _lock(out.with_name(out.name + ".lock"), timeout)
    try:
        baton = out / "lock"  # torch's FileBaton: under our flock nobody else builds here, so it is stale
        if baton.exists():
            log.info("removing the stale build lock %s (a build killed earlier)", baton)
            baton.unlink()
        if not any(out.glob("*.so")):
            log.info("building the %s decode kernel in %s (once per machine, ~20 s)", variant, out)
        with warnings.catch_warnings():  # torch's compiler-check warnings: our one warning says it all
            warnings.simplefilter("ignore")
            cpp_load(
                f"llama3_dist_kernels_{variant}",
                [str(path) for path in SOURCES],
                build_directory=str(out),
                extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off", *CFLAGS[variant]],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
    except BuildError:
        raise
    except Exception as e:  # no compiler, no ninja, a compile error: the caller decides
        raise BuildError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from e
    finally:
        lock.close()
    fakes = {
        "gemv": lambda x, w: x.new_empty(x.shape[0], w.shape[0]),
        "rms_norm": lambda x, w, eps: x.new_empty(x.shape),
        "rope": lambda x, freqs: x.new_empty(x.shape),
        "attend_decode": lambda q, k, v, mask: q.new_empty(q.shape),
        "cache_write": lambda k, v, all_k, all_v, i, pos: None,
    }  # quant.py gives its ops (qlinear_<variant>, dequant_<variant>) their shapes
    for name, fake in fakes.items():
        torch.library.register_fake(f"llama3_dist::{name}_{variant}")(fake)


def op(variant: str, name: str = "gemv"):
    """torch.ops.llama3_dist.<name>_<variant>, its variant built and loaded on first use (raises BuildError)."""
    if variant not in _built:
        _build(variant)
        _built.add(variant)
    return getattr(torch.ops.llama3_dist, f"{name}_{variant}")


def load():
    """The op linear() uses, or None where decode stays on F.linear (LLAMA3_DIST_KERNELS=torch, a failed build).

    Decided once per process and logged; a failed build warns once.
    """
    global _chosen, _gemv
    if _chosen is not None:
        return _gemv
    want = requested()
    if want != "torch":
        try:
            _gemv = op(want)
        except BuildError as e:
            log.warning("could not build the %s decode kernels (%s); decode matmuls use torch's F.linear", want, e)
            want = "torch"
    _chosen = want
    log.info("decode kernels: %s (CPU: %s)", want, isa_summary())
    return _gemv


def fused(name: str, x: Tensor):
    """The chosen variant's fused op `name` (one of FUSED) for input x, or None: x not a CPU
    float32/bfloat16 tensor, autograd on, the kernels on F.linear, or inside torch.compile where
    `name` is not one of IN_GRAPHS (inductor fuses those steps itself)."""
    if (
        (torch.compiler.is_compiling() and name not in IN_GRAPHS)
        or x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.bfloat16)
        or torch.is_grad_enabled()
        or load() is None
    ):
        return None
    return getattr(torch.ops.llama3_dist, f"{name}_{_chosen}")


def fusable(name: str, tokens_dim: int):
    """Decorate the model's function of that step: in an eager CPU decode step (one token per sequence:
    size 1 along tokens_dim of the first argument) its fused op runs in its place; elsewhere the
    function itself (a prefill's activations are large, and torch's kernels are right for them)."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args):
            op = fused(name, args[0]) if args[0].shape[tokens_dim] == 1 else None
            return fn(*args) if op is None else op(*args)

        return run

    return wrap


def variant() -> str:
    """The variant linear() uses: one of VARIANTS, or 'torch' (F.linear)."""
    load()
    return _chosen


def reset() -> None:
    """Forget the dispatch decision (built ops stay loaded): the next load() reads LLAMA3_DIST_KERNELS again."""
    global _chosen, _gemv
    _chosen = _gemv = None


def gemv(x: Tensor, w: Tensor) -> Tensor:
    """x (M, K) @ w (N, K).T with the chosen kernel (load() must have returned an op)."""
    return _gemv(x, w)


# A CPU listing one of these multiplies bfloat16 in hardware; elsewhere torch's bf16 matmul emulates
# it, about 6x slower than float32 on an AVX2 CPU.
_NATIVE_BF16 = bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
WIDEN_CHUNK_BYTES = 32 << 20  # float32 bytes of a weight widened at a time for a matrix-matrix product


# torch's float32 matmul on CPU is MKL's sgemm, which picks its code by CPU vendor: on a 2-core AMD
# Zen 5 (AVX-512) it ran SmolLM2's prefill products (128 rows) at 133-195 GFLOP/s, less than half of
# oneDNN's 325-382 (torch's own bf16 path; its verbose line reports "AVX-512 with DL Boost and
# bfloat16" there). AVX2 CPUs keep F.linear (measured there: prefill at or above llama.cpp's); an
# Intel AVX-512 CPU, where MKL runs its AVX-512 code, takes oneDNN too (not measured).
_ONEDNN_FP32 = "avx512f" in cpu_flags() and torch.backends.mkldnn.is_available()


def gemm(x: Tensor, w: Tensor) -> Tensor:
    """x @ w.T for a product larger than a decode step: F.linear, or oneDNN's float32 matmul on an
    AVX-512 CPU (not with LLAMA3_DIST_KERNELS=torch, which keeps F.linear everywhere)."""
    if (
        _ONEDNN_FP32
        and x.dtype == w.dtype == torch.float32
        and x.device.type == "cpu"
        and w.is_contiguous()
        and not torch.is_grad_enabled()
        and variant() != "torch"
    ):
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), w, None, "none", [], "")
        return y.view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)


def _emulated_bf16(x: Tensor) -> bool:
    """Whether a bfloat16 product with x would run on torch's bf16 emulation (a CPU without bf16 hardware)."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and not _NATIVE_BF16


def linear_by_rows(x: Tensor, w: Tensor, widen) -> Tensor:
    """x @ widen(w).T for a product larger than a decode step, `widen` (rows of w -> rows in x's dtype:
    a bf16 weight itself, quantized blocks dequantized) applied WIDEN_CHUNK_BYTES of rows at a time.
    A bfloat16 product on a CPU without bf16 hardware runs in float32 on the bf16 values and is
    rounded to bf16 once: what torch's bf16 matmul computes (float32 sums), at float32 speed."""
    xm = x.float() if _emulated_bf16(x) else x
    step = max(1, WIDEN_CHUNK_BYTES // (4 * x.shape[-1]))
    parts = [gemm(xm, widen(w[r : r + step]).to(xm.dtype)) for r in range(0, w.shape[0], step)]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).type_as(x)


def linear(x: Tensor, w: Tensor) -> Tensor:
    """x @ w.T (no bias); decode-sized inputs on CPU use the streaming kernel when it is available,
    a larger bfloat16 product on a CPU without bf16 hardware (a prefill on AVX2) linear_by_rows."""
    rows = x.numel() // x.shape[-1]
    if (
        rows <= MAX_ROWS
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and w.dtype == x.dtype
        and w.is_contiguous()
        and not torch.is_grad_enabled()
        and load() is not None
    ):
        return _gemv(x.reshape(rows, x.shape[-1]), w).view(*x.shape[:-1], w.shape[0])
    if w.dtype == torch.bfloat16 and _emulated_bf16(x):
        return linear_by_rows(x, w, lambda rows: rows)
    return gemm(x, w)
