"""The decode kernel: built where the CPU supports it, and equal to F.linear for every shape and dtype."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llama3_dist import kernels


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
