// Decode-time matrix-vector products for CPU: y = x @ W.T for a few rows of x (M <= 16).
//
// At batch 1 a decode step is bound by reading the weights once, so the kernel streams each row
// of W exactly once, splits the rows over the torch thread pool, and dots every row of W with
// all M rows of x while that row sits in L1.
//
// This one source is compiled once per instruction set (kernels/__init__.py picks the flags and
// one of the L3D_* macros below); each build registers its own op, torch.ops.llama3_dist.gemv_<isa>,
// so several builds can live in one process (the tests run them side by side):
//   L3D_AVX512BF16  AVX-512 FMAs; bf16 x bf16 by AVX512-BF16 dot products (vdpbf16ps)
//   L3D_AVX512      AVX-512 F/BW/VL FMAs; bf16 weights widened to fp32 by a 16-bit shift
//   L3D_AVX2        AVX2 + FMA, 8 fp32 lanes; bf16 widened the same way
//   (none)          portable C++: 16-lane loops the compiler vectorises for whatever it targets
// The bf16 paths other than AVX512-BF16 widen x to fp32 once and each weight in registers, so
// every product and sum is fp32; the result is rounded to bf16 once.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "isa.h"

namespace {

constexpr int64_t kGrain = 64;  // rows of W per task: enough work per thread, still balanced

inline float bf16_to_f32(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// ---- one vector of fp32 lanes: zero, load (fp32 or bf16 widened), fma, horizontal sum
#if defined(L3D_AVX512BF16) || defined(L3D_AVX512)
using Vec = __m512;
constexpr int kLanes = 16;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vload(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline float vsum(Vec a) { return _mm512_reduce_add_ps(a); }
inline Vec vset1(float a) { return _mm512_set1_ps(a); }
inline void vstore(float* p, Vec a) { _mm512_storeu_ps(p, a); }
#elif defined(L3D_AVX2)
using Vec = __m256;
constexpr int kLanes = 8;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vload(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline float vsum(Vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline Vec vset1(float a) { return _mm256_set1_ps(a); }
inline void vstore(float* p, Vec a) { _mm256_storeu_ps(p, a); }
#else
constexpr int kLanes = 16;
struct Vec {
  float v[kLanes];
};
inline Vec vzero() { return Vec{}; }
inline Vec vload(const float* p) {
  Vec r;
  for (int j = 0; j < kLanes; ++j) r.v[j] = p[j];
  return r;
}
inline Vec vload(const uint16_t* p) {
  Vec r;
  for (int j = 0; j < kLanes; ++j) r.v[j] = bf16_to_f32(p[j]);
  return r;
}
inline Vec vfma(Vec a, Vec b, Vec c) {
  for (int j = 0; j < kLanes; ++j) c.v[j] += a.v[j] * b.v[j];
  return c;
}
inline Vec vadd(Vec a, Vec b) {
  for (int j = 0; j < kLanes; ++j) a.v[j] += b.v[j];
  return a;
}
inline float vsum(Vec a) {
  float s = 0.f;
  for (int j = 0; j < kLanes; ++j) s += a.v[j];
  return s;
}
inline Vec vset1(float a) {
  Vec r;
  for (int j = 0; j < kLanes; ++j) r.v[j] = a;
  return r;
}
inline void vstore(float* p, Vec a) {
  for (int j = 0; j < kLanes; ++j) p[j] = a.v[j];
}
#endif

inline float to_f32(float f) { return f; }
inline float to_f32(uint16_t b) { return bf16_to_f32(b); }

// out[r] = dot(x[r], w) for R rows of fp32 x (row stride ldx) and one row of w (fp32 or bf16 bits).
// Each weight vector is loaded (and widened) once for all R rows; U independent accumulators per
// row hide the FMA latency.
template <int R, typename WT>
inline void dot_rows(const float* x, int64_t ldx, const WT* w, int64_t k, float* out) {
  constexpr int U = R == 1 ? 4 : 2;
  Vec acc[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = vzero();
  int64_t i = 0;
  for (; i + U * kLanes <= k; i += U * kLanes) {
#if defined(L3D_X86_AVX512)
    prefetch_ahead<U * kLanes * sizeof(WT)>(w + i);
#endif
    for (int u = 0; u < U; ++u) {
      const Vec wv = vload(w + i + u * kLanes);
      for (int r = 0; r < R; ++r) acc[r][u] = vfma(vload(x + r * ldx + i + u * kLanes), wv, acc[r][u]);
    }
  }
  for (; i + kLanes <= k; i += kLanes) {
    const Vec wv = vload(w + i);
    for (int r = 0; r < R; ++r) acc[r][0] = vfma(vload(x + r * ldx + i), wv, acc[r][0]);
  }
  for (int r = 0; r < R; ++r) {
    Vec s = acc[r][0];
    for (int u = 1; u < U; ++u) s = vadd(s, acc[r][u]);
    out[r] = vsum(s);
  }
  for (; i < k; ++i) {  // K tail, shorter than one vector
    const float wf = to_f32(w[i]);
    for (int r = 0; r < R; ++r) out[r] += x[r * ldx + i] * wf;
  }
}

#if defined(L3D_AVX512BF16) || defined(L3D_AVX512) || defined(L3D_AVX2)
#define L3D_PAIRS 1
// bf16 weights read in pairs: each 32-bit lane of one load holds w[2j] (low half) and w[2j+1]
// (high half); a shift gives w[2j] as fp32 and a mask gives w[2j+1], two instructions for two
// vectors of weights. x is rearranged to match once per call (pair_layout).
inline void vload_pairs(const uint16_t* p, Vec& even, Vec& odd) {
#if defined(L3D_AVX2)
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
#else
  const __m512i v = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
#endif
}

// Per block of 2 * kLanes elements of x: its even elements, then its odd ones; the tail as it is.
void pair_layout(const float* x, int64_t k, float* xp) {
  int64_t i = 0;
  for (; i + 2 * kLanes <= k; i += 2 * kLanes)
    for (int j = 0; j < kLanes; ++j) {
      xp[i + j] = x[i + 2 * j];
      xp[i + kLanes + j] = x[i + 2 * j + 1];
    }
  for (; i < k; ++i) xp[i] = x[i];
}

// dot_rows for bf16 weights and x in pair_layout.
template <int R>
inline void dot_rows_pairs(const float* xp, int64_t ldx, const uint16_t* w, int64_t k, float* out) {
  constexpr int U = R == 1 ? 2 : 1;
  Vec acc[R][2 * U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < 2 * U; ++u) acc[r][u] = vzero();
  int64_t i = 0;
  for (; i + 2 * U * kLanes <= k; i += 2 * U * kLanes) {
    prefetch_ahead<2 * U * kLanes * sizeof(uint16_t)>(w + i);
    for (int u = 0; u < U; ++u) {
      Vec e, o;
      const int64_t at = i + 2 * u * kLanes;
      vload_pairs(w + at, e, o);
      for (int r = 0; r < R; ++r) {
        acc[r][2 * u] = vfma(vload(xp + r * ldx + at), e, acc[r][2 * u]);
        acc[r][2 * u + 1] = vfma(vload(xp + r * ldx + at + kLanes), o, acc[r][2 * u + 1]);
      }
    }
  }
  for (; i + 2 * kLanes <= k; i += 2 * kLanes) {
    Vec e, o;
    vload_pairs(w + i, e, o);
    for (int r = 0; r < R; ++r) {
      acc[r][0] = vfma(vload(xp + r * ldx + i), e, acc[r][0]);
      acc[r][1] = vfma(vload(xp + r * ldx + i + kLanes), o, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    Vec t = acc[r][0];
    for (int u = 1; u < 2 * U; ++u) t = vadd(t, acc[r][u]);
    out[r] = vsum(t);
  }
  for (; i < k; ++i) {
    const float wf = bf16_to_f32(w[i]);
    for (int r = 0; r < R; ++r) out[r] += xp[r * ldx + i] * wf;
  }
}
#endif

struct PlainDot {
  template <int R, typename WT>
  static void run(const float* x, int64_t ldx, const WT* w, int64_t k, float* out) { dot_rows<R>(x, ldx, w, k, out); }
};
#if defined(L3D_PAIRS)
struct PairDot {
  template <int R>
  static void run(const float* x, int64_t ldx, const uint16_t* w, int64_t k, float* out) {
    dot_rows_pairs<R>(x, ldx, w, k, out);
  }
};
#endif

// Y[m, n] = x[m] . W[n] for the rows n0..n1 of W, M rows of x in blocks of up to 4.
template <typename Dot, typename WT, typename Store>
void gemv_rows(const float* X, int64_t M, int64_t K, const WT* W, int64_t n0, int64_t n1, Store store) {
  float out[4];
  for (int64_t n = n0; n < n1; ++n) {
    const WT* w = W + n * K;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      Dot::template run<4>(X + m * K, K, w, K, out);
      for (int r = 0; r < 4; ++r) store(m + r, n, out[r]);
    }
    switch (M - m) {
      case 3: Dot::template run<3>(X + m * K, K, w, K, out); break;
      case 2: Dot::template run<2>(X + m * K, K, w, K, out); break;
      case 1: Dot::template run<1>(X + m * K, K, w, K, out); break;
      default: break;
    }
    for (int64_t r = 0; m + r < M; ++r) store(m + r, n, out[r]);
  }
}

#if defined(L3D_AVX512BF16)
// bf16 x bf16 with vdpbf16ps: pairs of bf16 multiplied and summed into fp32 lanes.
inline float dot_bf16(const at::BFloat16* a, const at::BFloat16* b, int64_t k) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= k; i += 64) {
    prefetch_ahead<64 * sizeof(uint16_t)>(b + i);
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
#endif

at::Tensor gemv(const at::Tensor& x_in, const at::Tensor& w) {
  TORCH_CHECK(x_in.dim() == 2 && w.dim() == 2 && x_in.size(1) == w.size(1), "gemv: x (M, K), w (N, K)");
  TORCH_CHECK(w.is_contiguous() && x_in.scalar_type() == w.scalar_type(), "gemv: w contiguous, same dtype as x");
  TORCH_CHECK(x_in.device().is_cpu() && w.device().is_cpu(), "gemv: CPU tensors only");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (x.scalar_type() == at::kFloat) {
    const float *X = x.data_ptr<float>(), *W = w.data_ptr<float>();
    float* Y = y.data_ptr<float>();
    at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
      gemv_rows<PlainDot>(X, M, K, W, n0, n1, [&](int64_t m, int64_t n, float v) { Y[m * N + n] = v; });
    });
    return y;
  }
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "gemv: float32 or bfloat16 only");
  const at::BFloat16* Xb = x.data_ptr<at::BFloat16>();
  at::BFloat16* Y = y.data_ptr<at::BFloat16>();
#if defined(L3D_AVX512BF16)
  const at::BFloat16* W = w.data_ptr<at::BFloat16>();
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < M; ++m) Y[m * N + n] = at::BFloat16(dot_bf16(Xb + m * K, W + n * K, K));
  });
#else
  std::vector<float> xf(M * K);  // x widened once; the weights are widened in registers
  for (int64_t i = 0; i < M * K; ++i) xf[i] = static_cast<float>(Xb[i]);
  const uint16_t* W = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  auto store = [&](int64_t m, int64_t n, float v) { Y[m * N + n] = at::BFloat16(v); };
#if defined(L3D_PAIRS)
  std::vector<float> xp(M * K);
  for (int64_t m = 0; m < M; ++m) pair_layout(xf.data() + m * K, K, xp.data() + m * K);
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) { gemv_rows<PairDot>(xp.data(), M, K, W, n0, n1, store); });
#else
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) { gemv_rows<PlainDot>(xf.data(), M, K, W, n0, n1, store); });
#endif
#endif
  return y;
}

// ---- fused elementwise steps of a decode layer: each replaces 2-12 eager ops. They compute in
// fp32 and round to the model's dtype exactly where model.py's eager code rounds (built with
// -ffp-contract=off, so x*c - y*s is two products and a difference, as in eager mode).

inline float ld(float v) { return v; }
inline float ld(at::BFloat16 v) { return static_cast<float>(v); }
inline const float* as_bits(const float* p) { return p; }  // the element types dot_rows reads
inline const uint16_t* as_bits(const at::BFloat16* p) { return reinterpret_cast<const uint16_t*>(p); }

template <typename F>
void by_dtype(const at::Tensor& t, const char* op, F f) {
  if (t.scalar_type() == at::kFloat) {
    f(float{});
  } else {
    TORCH_CHECK(t.scalar_type() == at::kBFloat16, op, ": float32 or bfloat16 only");
    f(at::BFloat16{});
  }
}

// (x / rms(x)).type_as(x) * w over the last dim; x (..., D) with a contiguous last dim.
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
  TORCH_CHECK(x_in.size(-1) == w_in.numel() && x_in.scalar_type() == w_in.scalar_type(), "rms_norm: shapes/dtypes");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t D = x.size(-1), R = D ? x.numel() / D : 0;
  auto y = at::empty_like(x);
  by_dtype(x, "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    const T *X = x.data_ptr<T>(), *W = w.data_ptr<T>();
    T* Y = y.data_ptr<T>();
    at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = X + r * D;
        float acc[16] = {};
        int64_t i = 0;
        for (; i + 16 <= D; i += 16)
          for (int j = 0; j < 16; ++j) acc[j] += ld(xr[i + j]) * ld(xr[i + j]);
        float ss = 0.f;
        for (int j = 0; j < 16; ++j) ss += acc[j];
        for (; i < D; ++i) ss += ld(xr[i]) * ld(xr[i]);
        const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
        for (int64_t d = 0; d < D; ++d) Y[r * D + d] = T(ld(T(ld(xr[d]) * inv)) * ld(W[d]));
      }
    });
  });
  return y;
}

// Rotary embedding: each (even, odd) pair of x (B, T, H, hd) times e^(i pos freq), freqs (B, T, hd/2, 2).
at::Tensor rope(const at::Tensor& x_in, const at::Tensor& f_in) {
  TORCH_CHECK(x_in.dim() == 4 && f_in.dim() == 4 && f_in.scalar_type() == at::kFloat, "rope: x (B,T,H,hd), fp32 freqs");
  const at::Tensor x = x_in.contiguous(), f = f_in.contiguous();
  const int64_t BT = x.size(0) * x.size(1), H = x.size(2), hd = x.size(3);
  TORCH_CHECK(f.size(0) * f.size(1) == BT && f.size(2) * 2 == hd && f.size(3) == 2, "rope: freqs shape");
  auto y = at::empty_like(x);
  by_dtype(x, "rope", [&](auto tag) {
    using T = decltype(tag);
    const T* X = x.data_ptr<T>();
    const float* Fr = f.data_ptr<float>();
    T* Y = y.data_ptr<T>();
    at::parallel_for(0, BT * H, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const float* cs = Fr + (i / H) * hd;  // (hd/2, 2): cos, sin of this token's position
        const T* xi = X + i * hd;
        T* yi = Y + i * hd;
        for (int64_t j = 0; j < hd / 2; ++j) {
          const float x0 = ld(xi[2 * j]), x1 = ld(xi[2 * j + 1]), c = cs[2 * j], s = cs[2 * j + 1];
          yi[2 * j] = T(x0 * c - x1 * s);
          yi[2 * j + 1] = T(x0 * s + x1 * c);
        }
      }
    });
  });
  return y;
}

// e^x for x <= 0 (a softmax's scores minus their max), within a few ulp of expf: x = n ln2 + r with
// |r| <= ln2 / 2, e^r by Cephes' expf polynomial, times 2^n built in the exponent bits; 0 below
// -87 (masked keys are -inf). x86 builds take 8 at a time (exp_rows), with the same operations.
constexpr float kExpFloor = -87.0f;  // e^-87 ~ 1.6e-38, still a normal float
constexpr float kLog2e = 1.44269504f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                              4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

inline float exp_nonpos(float x_in) {
  const float x = std::max(x_in, kExpFloor);
  const float n = std::nearbyint(x * kLog2e);
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float e = kExpPoly[0];
  for (int j = 1; j < 6; ++j) e = e * r + kExpPoly[j];
  e = e * (r * r) + (r + 1.0f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x_in < kExpFloor ? 0.0f : e * scale;
}

#ifdef L3D_X86_SIMD
inline __m256 exp_nonpos8(__m256 x_in) {
  const __m256 lo = _mm256_set1_ps(kExpFloor);
  const __m256 x = _mm256_max_ps(x_in, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_sub_ps(_mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(kLn2Hi))),
                                 _mm256_mul_ps(n, _mm256_set1_ps(kLn2Lo)));
  __m256 e = _mm256_set1_ps(kExpPoly[0]);
  for (int j = 1; j < 6; ++j) e = _mm256_add_ps(_mm256_mul_ps(e, r), _mm256_set1_ps(kExpPoly[j]));
  e = _mm256_add_ps(_mm256_mul_ps(e, _mm256_mul_ps(r, r)), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(e, _mm256_castsi256_ps(bits)), _mm256_cmp_ps(x_in, lo, _CMP_GE_OQ));
}
#endif

// p[s] = e^(p[s] - mx) for s < S.
inline void exp_rows(float* p, int64_t S, float mx) {
  int64_t s = 0;
#ifdef L3D_X86_SIMD
  const __m256 m = _mm256_set1_ps(mx);
  for (; s + 8 <= S; s += 8) _mm256_storeu_ps(p + s, exp_nonpos8(_mm256_sub_ps(_mm256_loadu_ps(p + s), m)));
#endif
  for (; s < S; ++s) p[s] = exp_nonpos(p[s] - mx);
}

// p[s] = scale * dot(q, K[s]) for the keys the mask shows, -inf for the others; returns max p. q (NV
// vectors of hd = NV * kLanes floats) stays in registers across the whole cache.
template <int NV, typename KT>
float key_scores(const float* q, const KT* K, int64_t ks, const bool* M, int64_t S, float scale, float* p) {
  Vec qv[NV];
  for (int j = 0; j < NV; ++j) qv[j] = vload(q + j * kLanes);
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < S; ++s) {
    if (!M[s]) {
      p[s] = -std::numeric_limits<float>::infinity();
      continue;
    }
    Vec a = vzero(), b = vzero();  // two chains
    for (int j = 0; j + 1 < NV; j += 2) {
      a = vfma(qv[j], vload(K + s * ks + j * kLanes), a);
      b = vfma(qv[j + 1], vload(K + s * ks + (j + 1) * kLanes), b);
    }
    p[s] = vsum(vadd(a, b)) * scale;
    mx = std::max(mx, p[s]);
  }
  return mx;
}

// acc (NV vectors of hd = NV * kLanes floats) = sum over s of p[s] * V[s]: the accumulators stay in
// registers across the whole cache.
template <int NV, typename VT>
void weighted_rows(const float* p, const VT* V, int64_t vs, int64_t S, float* acc) {
  Vec a[NV];
  for (int j = 0; j < NV; ++j) a[j] = vzero();
  for (int64_t s = 0; s < S; ++s) {
    if (p[s] == 0.f) continue;
    const Vec ps = vset1(p[s]);
    for (int j = 0; j < NV; ++j) a[j] = vfma(ps, vload(V + s * vs + j * kLanes), a[j]);
  }
  for (int j = 0; j < NV; ++j) vstore(acc + j * kLanes, a[j]);
}

// f(std::integral_constant<int, NV>) when hd is NV = 2, 4, 8 or 16 vectors (the head sizes of Llama 3
// (128), SmolLM2 / Llama 3.2 1B (64) and small tests), whose loops hold a head in registers; false for
// other sizes, which take the generic loops.
template <typename F>
bool in_registers(int64_t hd, F f) {
  switch (hd) {
    case 2 * kLanes: f(std::integral_constant<int, 2>{}); return true;
    case 4 * kLanes: f(std::integral_constant<int, 4>{}); return true;
    case 8 * kLanes: f(std::integral_constant<int, 8>{}); return true;
    case 16 * kLanes: f(std::integral_constant<int, 16>{}); return true;
  }
  return false;
}

template <typename KT>
float key_scores_any(const float* q, const KT* K, int64_t ks, const bool* M, int64_t S, int64_t hd, float scale,
                     float* p) {
  float mx;
  if (in_registers(hd, [&](auto nv) { mx = key_scores<decltype(nv)::value>(q, K, ks, M, S, scale, p); })) return mx;
  mx = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < S; ++s) {
    p[s] = -std::numeric_limits<float>::infinity();
    if (!M[s]) continue;
    float dot;
    dot_rows<1>(q, hd, K + s * ks, hd, &dot);
    p[s] = dot * scale;
    mx = std::max(mx, p[s]);
  }
  return mx;
}

template <typename VT>
void weighted_rows_any(const float* p, const VT* V, int64_t vs, int64_t S, int64_t hd, float* acc) {
  if (in_registers(hd, [&](auto nv) { weighted_rows<decltype(nv)::value>(p, V, vs, S, acc); })) return;
  std::fill(acc, acc + hd, 0.f);
  for (int64_t s = 0; s < S; ++s) {
    if (p[s] == 0.f) continue;
    for (int64_t d = 0; d < hd; ++d) acc[d] += p[s] * to_f32(V[s * vs + d]);
  }
}

// One decode step of grouped-query attention, in fp32: q (B, Hq, 1, hd); k, v (B, Hkv, S, hd)
// (strided views of the cache); mask (B, 1, 1, S), True where a key is seen. Each KV head is
// read once per query head of its group, straight from the cache (no fp32 copy of it).
at::Tensor attend_decode(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask_in) {
  TORCH_CHECK(q_in.dim() == 4 && q_in.size(2) == 1 && k.dim() == 4 && v.sizes() == k.sizes(), "attend_decode: shapes");
  TORCH_CHECK(k.scalar_type() == q_in.scalar_type() && v.scalar_type() == q_in.scalar_type(), "attend_decode: dtypes");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "attend_decode: head_dim must be contiguous");
  const int64_t B = q_in.size(0), Hq = q_in.size(1), hd = q_in.size(3), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == hd && Hq % Hkv == 0, "attend_decode: shapes");
  const at::Tensor q = q_in.contiguous();
  const at::Tensor mask = mask_in.expand({B, 1, 1, S}).to(at::kBool).contiguous();
  auto y = at::empty({B, Hq, 1, hd}, q.options());
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  const int64_t group = Hq / Hkv;
  by_dtype(q, "attend_decode", [&](auto tag) {
    using T = decltype(tag);
    const T *Q = q.data_ptr<T>(), *K = k.data_ptr<T>(), *V = v.data_ptr<T>();
    const bool* M = mask.data_ptr<bool>();
    T* Y = y.data_ptr<T>();
    const int64_t kb = k.stride(0), kh = k.stride(1), ks = k.stride(2);
    const int64_t vb = v.stride(0), vh = v.stride(1), vs = v.stride(2);
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, S * hd));
    at::parallel_for(0, B * Hq, grain, [&](int64_t i0, int64_t i1) {
      std::vector<float> p(S), qf(hd), acc(hd);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / Hq, h = i % Hq, g = h / group;
        const T* Kh = K + b * kb + g * kh;
        const T* Vh = V + b * vb + g * vh;
        const bool* Mb = M + b * S;
        for (int64_t d = 0; d < hd; ++d) qf[d] = ld(Q[i * hd + d]);
        const float mx = key_scores_any(qf.data(), as_bits(Kh), ks, Mb, S, hd, scale, p.data());
        exp_rows(p.data(), S, mx);
        float sum = 0.f;
        for (int64_t s = 0; s < S; ++s) sum += p[s];
        weighted_rows_any(p.data(), as_bits(Vh), vs, S, hd, acc.data());
        const float inv = 1.0f / sum;
        for (int64_t d = 0; d < hd; ++d) Y[i * hd + d] = T(acc[d] * inv);
      }
    });
  });
  return y;
}

// The eager decode step's KV-cache write (model.py, write_cache): k, v (B, H, T, hd) into layer i of
// the caches (B, n_layers, H, S, hd) at positions pos (B, T), in place, a head's hd elements at a
// time (eager advanced indexing took ~13 us a layer for these few bytes).
void cache_write(const at::Tensor& k, const at::Tensor& v, const at::Tensor& all_k, const at::Tensor& all_v, int64_t i,
                 const at::Tensor& pos) {
  TORCH_CHECK(k.dim() == 4 && all_k.dim() == 5 && k.sizes() == v.sizes() && all_k.sizes() == all_v.sizes() &&
                  k.size(0) == all_k.size(0) && k.size(1) == all_k.size(2) && k.size(3) == all_k.size(4),
              "cache_write: k, v (B, H, T, hd) and caches (B, n_layers, H, S, hd) expected");
  TORCH_CHECK(k.scalar_type() == all_k.scalar_type() && v.scalar_type() == all_v.scalar_type(), "cache_write: dtypes");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && all_k.stride(4) == 1 && all_v.stride(4) == 1,
              "cache_write: the last dim must be contiguous");
  const int64_t B = k.size(0), H = k.size(1), T = k.size(2), S = all_k.size(3), hd = k.size(3);
  TORCH_CHECK(0 <= i && i < all_k.size(1) && pos.dim() == 2 && pos.size(0) == B && pos.size(1) == T,
              "cache_write: pos (B, T) and a layer of the caches expected");
  const at::Tensor p = pos.to(at::kLong).contiguous();
  const int64_t* P = p.data_ptr<int64_t>();
  for (const auto& [src, dst] : {std::pair{&k, &all_k}, std::pair{&v, &all_v}}) {
    const char* from = static_cast<const char*>(src->data_ptr());
    char* to = static_cast<char*>(dst->data_ptr());
    const int64_t es = src->element_size(), bytes = hd * es;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t s = P[b * T + t];
        TORCH_CHECK(0 <= s && s < S, "cache_write: position ", s, " is outside the cache's ", S);
        for (int64_t h = 0; h < H; ++h)
          std::memcpy(to + (b * dst->stride(0) + i * dst->stride(1) + h * dst->stride(2) + s * dst->stride(3)) * es,
                      from + (b * src->stride(0) + h * src->stride(1) + t * src->stride(2)) * es, bytes);
      }
  }
}

}  // namespace

// Native ops per build (torch.ops.llama3_dist.gemv_<isa> & co.): called from Python without a
// Python wrapper, and from torch.compile's generated code like any aten op.
TORCH_LIBRARY_FRAGMENT(llama3_dist, m) {
  m.def(L3D_OP(gemv) "(Tensor x, Tensor w) -> Tensor");
  m.def(L3D_OP(rms_norm) "(Tensor x, Tensor w, float eps) -> Tensor");
  m.def(L3D_OP(rope) "(Tensor x, Tensor freqs) -> Tensor");
  m.def(L3D_OP(attend_decode) "(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
  m.def(L3D_OP(cache_write) "(Tensor k, Tensor v, Tensor(a!) all_k, Tensor(b!) all_v, int i, Tensor pos) -> ()");
}
TORCH_LIBRARY_IMPL(llama3_dist, CPU, m) {
  m.impl(L3D_OP(gemv), &gemv);
  m.impl(L3D_OP(rms_norm), &rms_norm);
  m.impl(L3D_OP(rope), &rope);
  m.impl(L3D_OP(attend_decode), &attend_decode);
  m.impl(L3D_OP(cache_write), &cache_write);
}
