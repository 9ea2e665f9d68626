"""Decode kernels: every variant this CPU executes equals F.linear; dispatch, forcing, and the build's locks.

Each test names the variant it ran: ops are called by name (torch.ops.llama3_dist.gemv_<variant>),
and linear()'s path is read off the dispatcher (a TorchDispatchMode records the ops it reaches).
A variant this CPU supports that fails to build fails its test: nothing here skips.
"""

from __future__ import annotations

import fcntl
import os
import platform
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from helpers.launch import run_cli
from torch.utils._python_dispatch import TorchDispatchMode

from llama3_dist import kernels
from llama3_dist.errors import UserError
from llama3_dist.model import write_cache

SUPPORTED = kernels.supported()
MATMULS = ("mm", "addmm", "bmm", "linear", "_linear_pointwise")  # torch op names of a matrix product


class RecordOps(TorchDispatchMode):
    """Names of the ops dispatched under it (e.g. 'llama3_dist.gemv_avx2.default', 'aten.mm.default'),
    and the dtype of each one's first argument."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []
        self.dtypes: list[torch.dtype | None] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        self.dtypes.append(args[0].dtype if args and isinstance(args[0], torch.Tensor) else None)
        return func(*args, **(kwargs or {}))


def reference(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 x @ w.T of the given (possibly bf16) values, and the error scale |x| @ |w|.T."""
    xf, wf = x.float(), w.float()
    return F.linear(xf, wf), F.linear(xf.abs(), wf.abs())


def assert_close(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """fp32: within 1e-5 of sum |x w| (a reordered fp32 sum); bf16: one bf16 rounding of the fp32 result."""
    want, scale = reference(x, w)
    assert got.shape == want.shape and got.dtype == x.dtype
    err = (got.float() - want).abs()
    if x.dtype == torch.float32:
        bound = 1e-5 * scale + 1e-30
    else:  # the fp32 sum, rounded once to bf16 (relative 2^-8), plus the same fp32 reordering slack
        bound = 2.0**-8 * want.abs() + 1e-5 * scale + 1e-30
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}, worst ratio {(err / bound).max().item():.3g}"


def test_dispatch_picks_the_best_variant_this_cpu_executes(force):
    flags = kernels.cpu_flags()
    assert SUPPORTED[-1] == "portable"
    assert ("avx2" in SUPPORTED) == ({"avx2", "fma", "f16c"} <= flags)
    assert ("avx512" in SUPPORTED) == ({"avx512f", "avx512bw", "avx512vl"} <= flags)
    assert ("avx512bf16" in SUPPORTED) == ("avx512" in SUPPORTED and "avx512_bf16" in flags)
    force("auto")
    assert kernels.variant() == SUPPORTED[0], "the best variant for this CPU failed to build: see the warning"
    assert kernels.load() is getattr(torch.ops.llama3_dist, f"gemv_{SUPPORTED[0]}")


@pytest.mark.parametrize("variant", kernels.VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_variant_equals_linear_at_odd_sizes(variant, dtype, force):
    if variant not in SUPPORTED:  # cannot run here: forcing it is one clear error naming what can
        force(variant)
        with pytest.raises(UserError, match=f"LLAMA3_DIST_KERNELS={variant}: this CPU lacks .*; use auto or one of "):
            kernels.load()
        return
    gemv = kernels.op(variant)  # raises BuildError: a supported variant that does not build fails here
    g = torch.Generator().manual_seed(0)
    for m in range(1, 17):
        for k, n in [(1, 1), (7, 3), (8, 9), (9, 17), (33, 65), (576, 130), (577, 64), (1031, 5)]:
            x, w = torch.randn(m, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)
            assert_close(gemv(x, w), x, w)


@pytest.mark.parametrize("variant", SUPPORTED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_runs_the_forced_variant(variant, dtype, force):
    force(variant)
    assert kernels.variant() == variant
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 577, generator=g).to(dtype)
    x = torch.randn(2, 3, 2 * 577, generator=g).to(dtype)[..., ::2]  # (2, 3, 577), not contiguous
    assert not x.is_contiguous()
    with torch.inference_mode(), RecordOps() as ops:
        got = kernels.linear(x, w)
    assert f"llama3_dist.gemv_{variant}.default" in ops.names
    assert got.shape == (2, 3, 300)
    assert_close(got.reshape(6, 300), x.reshape(6, 577), w)

    big = torch.randn(kernels.MAX_ROWS + 1, 577, generator=g).to(dtype)  # a prefill: torch's matmul
    with torch.inference_mode(), RecordOps() as ops:
        kernels.linear(big, w)
    assert not any(name.startswith("llama3_dist.") for name in ops.names)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_prefill_runs_in_float32_where_the_cpu_lacks_bf16(monkeypatch, native):
    """Without bf16 hardware (AVX2) a bf16 product larger than a decode step widens w a block of
    rows at a time and multiplies in float32; with it, torch's bf16 matmul runs. Both equal the
    float32 product of the bf16 values within one bf16 rounding."""
    monkeypatch.setattr(kernels, "_NATIVE_BF16", native)
    monkeypatch.setattr(kernels, "WIDEN_CHUNK_BYTES", 16 * 96 * 4)  # 16 rows of w at a time: 5 blocks
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 20, 96, generator=g).bfloat16()
    w = torch.randn(70, 96, generator=g).bfloat16()
    with torch.inference_mode(), RecordOps() as ops:
        got = kernels.linear(x, w)
    assert got.shape == (2, 20, 70) and got.dtype == torch.bfloat16
    assert_close(got.reshape(40, 70), x.reshape(40, 96), w)
    matmuls = [(n, d) for n, d in zip(ops.names, ops.dtypes) if n.split(".")[1] in MATMULS]
    assert [d for _, d in matmuls] == ([torch.bfloat16] if native else [torch.float32] * 5), matmuls


@pytest.mark.parametrize("onednn", [False, True])
def test_float32_prefill_products_run_on_onednn_on_avx512_cpus(monkeypatch, onednn):
    """A float32 product larger than a decode step runs on oneDNN where _ONEDNN_FP32 (an AVX-512 CPU),
    else on F.linear; both give the float32 product within float32 summation order."""
    monkeypatch.setattr(kernels, "_ONEDNN_FP32", onednn)
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(3, 40, 100, generator=g), torch.randn(70, 100, generator=g)
    with torch.inference_mode(), RecordOps() as ops:
        got = kernels.linear(x, w)
    assert got.shape == (3, 40, 70) and got.dtype == torch.float32
    torch.testing.assert_close(got, x.double().matmul(w.double().T).float(), rtol=1e-5, atol=1e-4)
    matmuls = [n for n in ops.names if n.split(".")[1] in MATMULS]
    assert matmuls == (["mkldnn._linear_pointwise.default"] if onednn else ["aten.linear.default"]), matmuls


def test_forcing_torch_uses_f_linear(force):
    force("torch")
    assert kernels.variant() == "torch" and kernels.load() is None
    x, w = torch.randn(1, 64), torch.randn(32, 64)
    with torch.inference_mode(), RecordOps() as ops:
        got = kernels.linear(x, w)
    assert not any(name.startswith("llama3_dist.") for name in ops.names)
    assert torch.equal(got, F.linear(x, w))


def test_an_unknown_variant_is_one_clear_error(force):
    force("avx9000")
    with pytest.raises(UserError, match="^LLAMA3_DIST_KERNELS=avx9000: unknown kernel variant; use one of auto, "):
        kernels.load()


def test_the_op_compiles_into_one_graph(force):
    force(SUPPORTED[0])
    assert kernels.variant() == SUPPORTED[0]  # decided before tracing, as load_model() does

    def f(x, w):
        return torch.relu(kernels.linear(x, w)) * 2

    graphs = []

    def backend(gm, example_inputs):  # dynamo's graph, traced with the op's fake kernel
        graphs.append([str(node.target) for node in gm.graph.nodes])
        return gm.forward

    x, w = torch.randn(1, 1, 100), torch.randn(40, 100)
    with torch.inference_mode():
        got = torch.compile(f, backend=backend, fullgraph=True)(x, w)
        assert torch.equal(got, f(x, w))
    [nodes] = graphs
    assert f"llama3_dist.gemv_{SUPPORTED[0]}" in nodes, nodes


def test_variants_this_cpu_cannot_run_still_compile(tmp_path):
    """Code for instruction sets this CPU lacks runs only elsewhere; here it must at least compile
    (same flags as the build, object files only: loading them could execute an unknown instruction)."""
    from torch.utils.cpp_extension import include_paths

    others = [v for v in kernels.VARIANTS if v not in SUPPORTED]
    if platform.machine() not in ("x86_64", "AMD64"):  # the x86 variants need an x86 compiler
        assert SUPPORTED == ["portable"]
        return
    procs = {
        (v, source): subprocess.Popen(
            [
                os.environ.get("CXX", "c++"),
                "-std=c++20",
                "-O3",
                "-fopenmp",
                "-ffp-contract=off",
                *kernels.CFLAGS[v],
                *[f"-I{p}" for p in include_paths()],
                "-c",
                str(source),
                "-o",
                str(tmp_path / f"{v}-{source.stem}.o"),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        for v in others
        for source in kernels.SOURCES
    }
    for (v, source), p in procs.items():
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"{v} {source.name}: {err[-2000:]}"
        assert (tmp_path / f"{v}-{source.stem}.o").stat().st_size > 0
    assert set(others) | set(SUPPORTED) == set(kernels.VARIANTS)


def test_a_variant_the_cpu_lacks_is_one_error_line_from_the_cli():
    wanted = next((v for v in kernels.VARIANTS if v not in SUPPORTED), "avx9000")  # avx9000: no CPU has it
    r = run_cli("generate", "--prompt", "hi", "--max-new-tokens", "2", timeout=300, env={"LLAMA3_DIST_KERNELS": wanted})
    assert r.returncode == 2 and r.stdout == ""
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [line for line in r.stderr.splitlines() if "LLAMA3_DIST_KERNELS" in line]
    assert (
        len(errors) == 1
        and errors[0].startswith(f"error: LLAMA3_DIST_KERNELS={wanted}: ")
        and "Traceback" not in r.stderr
    )


# ---- fused decode steps: each equals model.py's eager math (written out here, as model.py has it)


def eager_rms_norm(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def eager_rope(x, freqs):  # x (B, T, H, hd), freqs (B, T, hd/2, 2)
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = freqs.unsqueeze(2).unbind(-1)
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(3).type_as(x)


def eager_attend_decode(q, k, v, mask):  # q (B, Hq, 1, hd); k, v (B, Hkv, S, hd); mask (B, 1, 1, S)
    B, Hq, _, hd = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, Hq // Hkv, hd).float()
    scores = (qg @ k.float().transpose(-1, -2) * hd**-0.5).masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v.float()).type_as(q).view(B, Hq, 1, hd)


def assert_near(got, want, fp32_tol):
    """fp32 within fp32_tol of |want|'s max; bf16 within one bf16 rounding of each element, plus that
    float32 bound (both sides sum in float32, in different orders: where a sum cancels to near 0, its
    float32 error is large beside the result)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    err = (got.float() - want.float()).abs()
    scale = max(want.float().abs().max().item(), 1.0)
    if got.dtype == torch.float32:
        assert err.max().item() <= fp32_tol * scale
    else:
        assert bool((err <= 2.0**-7 * want.float().abs() + fp32_tol * scale).all()), err.max().item()


@pytest.mark.parametrize("variant", SUPPORTED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_steps_equal_the_eager_math(variant, dtype, force):
    force(variant)
    assert kernels.variant() == variant
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        x, w = torch.randn(3, 2, 577, generator=g).to(dtype), torch.randn(577, generator=g).to(dtype)
        assert_near(kernels.fused("rms_norm", x)(x, w, 1e-5), eager_rms_norm(x, w, 1e-5), 1e-6)

        q = torch.randn(2, 1, 9, 64, generator=g).to(dtype)
        angles = torch.rand(2, 1, 32, generator=g) * 300
        freqs = torch.view_as_real(torch.polar(torch.ones_like(angles), angles))
        assert_near(kernels.fused("rope", q)(q, freqs), eager_rope(q, freqs), 1e-6)

        caches = torch.randn(2, 3, 4, 3, 50, 64, generator=g).to(dtype)  # k | v, (B + 1, layers, Hkv, S, hd)
        want = caches.clone()
        k, v = (torch.randn(2, 1, 3, 64, generator=g).to(dtype).transpose(1, 2) for _ in range(2))  # (B, H, 1, hd)
        pos = torch.tensor([[7], [41]])
        write_cache.__wrapped__(k, v, want[0, 1:], want[1, 1:], 2, pos)  # rows 1-2: a view, as KVCache.rows gives
        rows_k, rows_v = caches[0, 1:], caches[1, 1:]
        with RecordOps() as ops:
            kernels.fused("cache_write", k)(k, v, rows_k, rows_v, 2, pos)
        assert ops.names == [f"llama3_dist.cache_write_{variant}.default"] and torch.equal(caches, want)

        B, Hq, Hkv, S = 2, 9, 3, 37  # S: a tail after the 8-wide softmax loop
        for hd in (64, 128, 40):  # head sizes with register-resident loops (64, 128) and without (40)
            cache_k, cache_v = (torch.randn(B + 1, Hkv, 50, hd, generator=g).to(dtype) for _ in range(2))
            k, v = cache_k[:B, :, :S], cache_v[:B, :, :S]  # views of the cache, as the model passes them
            q = torch.randn(B, 1, Hq, hd, generator=g).to(dtype).transpose(1, 2)
            mask = (torch.arange(S) <= torch.tensor([[20], [36]]).unsqueeze(-1)).unsqueeze(1)  # (B, 1, 1, S)
            with RecordOps() as ops:
                got = kernels.fused("attend_decode", q)(q, k, v, mask)
            assert ops.names == [f"llama3_dist.attend_decode_{variant}.default"]
            assert_near(got, eager_attend_decode(q, k, v, mask), 1e-5)


def test_no_fused_ops_on_torch_or_with_autograd(force):
    x = torch.randn(2, 8)
    force("torch")
    assert kernels.fused("rms_norm", x) is None
    force(SUPPORTED[0])
    with torch.inference_mode():
        assert kernels.fused("rms_norm", x) is getattr(torch.ops.llama3_dist, f"rms_norm_{SUPPORTED[0]}")
    with torch.enable_grad():
        assert kernels.fused("rms_norm", x) is None
    with torch.inference_mode():
        assert kernels.fused("rms_norm", x.to(torch.float16)) is None


# ---- the build: failures fall back once, locks never hang (each case in a fresh process and cache)

PROBE = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
from llama3_dist import kernels
print("VARIANT", kernels.variant())
"""


def probe(tmp_path, **env: str) -> subprocess.Popen:
    """A fresh process that loads the kernels with TORCH_EXTENSIONS_DIR=tmp_path; prints the variant."""
    full = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "LLAMA3_DIST_KERNELS": "auto", **env}
    return subprocess.Popen(
        [sys.executable, "-c", PROBE], env=full, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def finish(p: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """The variant a probe printed and its stderr; it must exit 0 within `timeout` seconds."""
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err
    return out.split("VARIANT ")[1].strip(), err


def test_a_failing_build_falls_back_to_torch_with_one_warning(tmp_path):
    variant, err = finish(probe(tmp_path, CXX="/bin/false"), 120)
    assert variant == "torch"
    warnings = [line for line in err.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and f"could not build the {SUPPORTED[0]} decode kernels" in warnings[0], err
    assert "decode matmuls use torch's F.linear" in warnings[0]


def test_a_wait_for_another_builder_times_out_into_torch(tmp_path):
    out = kernels.build_dir(SUPPORTED[0]).name
    with open(tmp_path / f"{out}.lock", "w") as held:  # another process is building (and stuck)
        fcntl.flock(held, fcntl.LOCK_EX)
        start = time.monotonic()
        variant, err = finish(probe(tmp_path, LLAMA3_DIST_KERNELS_TIMEOUT="1"), 60)
    assert variant == "torch" and time.monotonic() - start < 60
    [warning] = [line for line in err.splitlines() if line.startswith("WARNING")]
    assert "waited 1 s for another process building" in warning


def test_stale_locks_do_not_block_and_only_one_process_builds(tmp_path):
    """A build killed earlier left torch's lock file (and our lock file, unlocked): two processes
    starting together still load the kernel, in bounded time, and only one of them compiles it."""
    out = tmp_path / kernels.build_dir(SUPPORTED[0]).name
    out.mkdir()
    (out / "lock").write_text("")  # torch's FileBaton of a killed build: waited on forever before
    out.with_name(out.name + ".lock").write_text("")
    procs = [probe(tmp_path) for _ in range(2)]
    results = [finish(p, 300) for p in procs]
    assert [v for v, _ in results] == [SUPPORTED[0]] * 2, results
    logs = "".join(err for _, err in results)
    assert logs.count(f"building the {SUPPORTED[0]} decode kernel") == 1, logs
    assert logs.count("removing the stale build lock") == 1, logs
    assert not (out / "lock").exists()
