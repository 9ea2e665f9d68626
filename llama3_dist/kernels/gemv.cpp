// Decode-time matrix-vector products for CPU: y = x @ W.T for a few rows of x (M <= 16).
//
// At batch 1 a decode step is bound by reading the weights once, so the kernel streams each
// rank's rows of W exactly once, splits them over the torch thread pool, and dots every row of W
// with all M rows of x while that row sits in L1. fp32 uses AVX-512 FMAs; bf16 uses AVX512-BF16
// dot products (vdpbf16ps: pairs of bf16 multiplied and summed into fp32 lanes).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

namespace {

constexpr int64_t kGrain = 64;  // rows of W per task: enough work per thread, still balanced

inline float dot_f32(const float* a, const float* b, int64_t k) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
  }
  for (; i < k; i += 16) {
    const __mmask16 m = k - i >= 16 ? 0xFFFF : (__mmask16)((1u << (k - i)) - 1);
    acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

inline float dot_bf16(const at::BFloat16* a, const at::BFloat16* b, int64_t k) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= k; i += 64) {
    acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(a + i), (__m512bh)_mm512_loadu_si512(b + i));
    acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)_mm512_loadu_si512(a + i + 32),
                            (__m512bh)_mm512_loadu_si512(b + i + 32));
  }
  for (; i < k; i += 32) {
    const __mmask32 m = k - i >= 32 ? 0xFFFFFFFFu : (__mmask32)((1ull << (k - i)) - 1);
    acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_maskz_loadu_epi16(m, a + i),
                            (__m512bh)_mm512_maskz_loadu_epi16(m, b + i));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

}  // namespace

at::Tensor gemv(const at::Tensor& x_in, const at::Tensor& w) {
  TORCH_CHECK(x_in.dim() == 2 && w.dim() == 2 && x_in.size(1) == w.size(1), "gemv: shapes");
  TORCH_CHECK(w.is_contiguous() && x_in.scalar_type() == w.scalar_type(), "gemv: layout");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = at::empty({M, N}, x.options());
  if (x.scalar_type() == at::kFloat) {
    const float *X = x.data_ptr<float>(), *W = w.data_ptr<float>();
    float* Y = y.data_ptr<float>();
    at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t m = 0; m < M; ++m) Y[m * N + n] = dot_f32(X + m * K, W + n * K, K);
    });
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "gemv: float32 or bfloat16 only");
    const at::BFloat16 *X = x.data_ptr<at::BFloat16>(), *W = w.data_ptr<at::BFloat16>();
    at::BFloat16* Y = y.data_ptr<at::BFloat16>();
    at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t m = 0; m < M; ++m) Y[m * N + n] = at::BFloat16(dot_bf16(X + m * K, W + n * K, K));
    });
  }
  return y;
}

// A native op (torch.ops.llama3_dist.gemv): called from Python without a Python wrapper, and
// from torch.compile's generated code like any aten op.
TORCH_LIBRARY(llama3_dist, m) { m.def("gemv(Tensor x, Tensor w) -> Tensor"); }
TORCH_LIBRARY_IMPL(llama3_dist, CPU, m) { m.impl("gemv", &gemv); }
