"""The decode kernel equals F.linear; `bench` runs end to end (a smoke run: no timing is asserted)."""
from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from llama3_dist import kernels
from llama3_dist.bench import run_bench, table


def test_kernel_is_built_where_the_cpu_supports_it():
    if kernels._cpu_has("avx512f", "avx512_bf16"):
        assert kernels.load() is not None, "the gemv kernel failed to build on a CPU that supports it"
    else:
        assert kernels.load() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "k", "n"), [(1, 576, 1536), (3, 577, 100), (16, 33, 7), (17, 64, 64), (1, 5, 3)])
def test_linear_matches_torch(dtype, rows, k, n):
    g = torch.Generator().manual_seed(rows * 1000 + k)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    with torch.inference_mode():
        got = kernels.linear(x.unsqueeze(0), w)  # (1, rows, n): leading dims are kept
        want = F.linear(x.float(), w.float()).unsqueeze(0)
    assert got.shape == want.shape and got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2 * want.abs().max().item()
    assert (got.float() - want).abs().max().item() <= tol


def test_bench_smoke_run_ours_and_transformers_agree():
    args = argparse.Namespace(quick=True, threads=2, prompt_len=16, new_tokens=4, timeout=600, work_dir=None,
                              eager=True)
    [row] = run_bench(args)
    assert row["setting"] == "SmolLM2 fp32 b1" and row["bandwidth_gb_s"] > 0
    ours, hf = row["engines"]["ours"], row["engines"]["transformers"]
    assert "error" not in ours and "error" not in hf, row
    assert ours["decode_tok_s"] > 0 and 0 < ours["roofline_pct"]
    assert hf["same_tokens"] is True  # same weights, same prompt ids, greedy: the same tokens
    text = table([row])
    assert "ours/peer decode" in text and "transformers" in text and "GB/s" in text


def test_bench_on_cuda_without_a_gpu_is_one_clear_error(capsys, monkeypatch):
    from llama3_dist.cli import main
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    assert main(["bench", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: bench --device cuda: CUDA is not available here; run it on a GPU machine"]
