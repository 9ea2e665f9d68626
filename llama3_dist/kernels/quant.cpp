// Weight-only quantized matmuls for CPU over llama.cpp's block formats (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K).
//
// A weight is a uint8 tensor (N, K / block * block_bytes): each row of W is its blocks, byte for
// byte as in a GGUF file. `qlinear` computes y = x @ W.T for a few rows of x (a decode step): each
// row of W is read once, its blocks are dequantized in registers (AVX2 + FMA for the 32-element
// formats) or into a 256-float buffer in L1 (the K-quant super-blocks), and dotted with every row
// of x in float32. `dequant` expands rows of W to float32 (prefill, embedding lookups).
// Without AVX2 the same loops run on a portable scalar dequantizer, which the compiler vectorises.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstring>
#include <string>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define QUANT_AVX2 1
#endif

namespace {

// Codes shared with quant.py (FORMATS): index -> (elements per block, bytes per block).
enum QType : int64_t { Q8_0 = 0, Q4_0 = 1, Q4_1 = 2, Q4_K = 3, Q6_K = 4 };
constexpr int64_t kBlock[] = {32, 32, 32, 256, 256};
constexpr int64_t kBytes[] = {34, 18, 20, 144, 210};
constexpr int64_t kMaxRows = 16;
constexpr int64_t kGrain = 16;  // rows of W per task

inline float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

inline void scale_min_k4(int j, const uint8_t* q, uint8_t* d, uint8_t* m) {
  if (j < 4) {
    *d = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Portable: one block of `kBlock[Q]` elements to float32 (ggml's dequantize_row_* per block).
template <int Q>
void dequant_block(const uint8_t* b, float* y) {
  if constexpr (Q == Q8_0) {
    const float d = f16(b);
    const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
    for (int j = 0; j < 32; ++j) y[j] = d * q[j];
  } else if constexpr (Q == Q4_0 || Q == Q4_1) {
    const float d = f16(b);
    const float m = Q == Q4_1 ? f16(b + 2) : -8.0f * d;
    const uint8_t* q = b + (Q == Q4_1 ? 4 : 2);
    for (int j = 0; j < 16; ++j) {
      y[j] = d * (q[j] & 0xF) + m;
      y[j + 16] = d * (q[j] >> 4) + m;
    }
  } else if constexpr (Q == Q4_K) {
    const float d = f16(b), dmin = f16(b + 2);
    const uint8_t* scales = b + 4;
    const uint8_t* q = b + 16;
    for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32) {
      uint8_t sc, m;
      scale_min_k4(is, scales, &sc, &m);
      const float d1 = d * sc, m1 = dmin * m;
      scale_min_k4(is + 1, scales, &sc, &m);
      const float d2 = d * sc, m2 = dmin * m;
      for (int l = 0; l < 32; ++l) y[j + l] = d1 * (q[l] & 0xF) - m1;
      for (int l = 0; l < 32; ++l) y[j + 32 + l] = d2 * (q[l] >> 4) - m2;
    }
  } else {  // Q6_K
    const uint8_t* ql = b;
    const uint8_t* qh = b + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = f16(b + 208);
    for (int n = 0; n < 256; n += 128, ql += 64, qh += 32, sc += 8) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        y[n + l] = d * sc[is] * q1;
        y[n + l + 32] = d * sc[is + 2] * q2;
        y[n + l + 64] = d * sc[is + 4] * q3;
        y[n + l + 96] = d * sc[is + 6] * q4;
      }
    }
  }
}

// Portable row kernel: y[m] = sum over blocks of dot(dequant(block), x[m]) for M rows of x.
template <int Q>
void row_portable(const uint8_t* w, const float* x, int64_t M, int64_t K, float* acc) {
  constexpr int64_t B = kBlock[Q];
  float buf[B];
  for (int64_t m = 0; m < M; ++m) acc[m] = 0.0f;
  for (int64_t k = 0; k < K; k += B, w += kBytes[Q]) {
    dequant_block<Q>(w, buf);
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K + k;
      float s = 0.0f;
      for (int64_t j = 0; j < B; ++j) s += buf[j] * xm[j];
      acc[m] += s;
    }
  }
}

#ifdef QUANT_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 u8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }

// One 32-element block dequantized into four registers w[0..3] (elements 0-7, 8-15, 16-23, 24-31).
template <int Q>
inline void load_block(const uint8_t* b, __m256* w) {
  const __m256 d = _mm256_set1_ps(_cvtsh_ss(*reinterpret_cast<const uint16_t*>(b)));
  if constexpr (Q == Q8_0) {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2));
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    w[0] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)));
    w[1] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))));
    w[2] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)));
    w[3] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))));
  } else {
    const __m256 m = Q == Q4_1 ? _mm256_set1_ps(_cvtsh_ss(*reinterpret_cast<const uint16_t*>(b + 2)))
                               : _mm256_mul_ps(d, _mm256_set1_ps(-8.0f));
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (Q == Q4_1 ? 4 : 2)));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    w[0] = _mm256_fmadd_ps(u8x8(lo), d, m);
    w[1] = _mm256_fmadd_ps(u8x8(_mm_srli_si128(lo, 8)), d, m);
    w[2] = _mm256_fmadd_ps(u8x8(hi), d, m);
    w[3] = _mm256_fmadd_ps(u8x8(_mm_srli_si128(hi, 8)), d, m);
  }
}

// MT rows of x against one row of W, accumulators in registers.
template <int Q, int MT>
void tile_avx2(const uint8_t* w, const float* x, int64_t K, float* out) {
  __m256 acc[MT][2];
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  if constexpr (kBlock[Q] == 32) {
    __m256 v[4];
    for (int64_t k = 0; k < K; k += 32, w += kBytes[Q]) {
      load_block<Q>(w, v);
      for (int m = 0; m < MT; ++m) {
        const float* xm = x + m * K + k;
        acc[m][0] = _mm256_fmadd_ps(v[0], _mm256_loadu_ps(xm), acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(xm + 8), acc[m][1]);
        acc[m][0] = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(xm + 16), acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(xm + 24), acc[m][1]);
      }
    }
  } else {  // super-blocks: expand into L1, then the same FMAs
    alignas(32) float buf[256];
    for (int64_t k = 0; k < K; k += 256, w += kBytes[Q]) {
      dequant_block<Q>(w, buf);
      for (int m = 0; m < MT; ++m) {
        const float* xm = x + m * K + k;
        for (int j = 0; j < 256; j += 16) {
          acc[m][0] = _mm256_fmadd_ps(_mm256_load_ps(buf + j), _mm256_loadu_ps(xm + j), acc[m][0]);
          acc[m][1] = _mm256_fmadd_ps(_mm256_load_ps(buf + j + 8), _mm256_loadu_ps(xm + j + 8), acc[m][1]);
        }
      }
    }
  }
  for (int m = 0; m < MT; ++m) out[m] = hsum(_mm256_add_ps(acc[m][0], acc[m][1]));
}

// Rows of x in tiles of up to 4 (the row of W stays in L1 between tiles).
template <int Q>
void row_avx2(const uint8_t* w, const float* x, int64_t M, int64_t K, float* out) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile_avx2<Q, 4>(w, x + m * K, K, out + m);
  switch (M - m) {
    case 3: tile_avx2<Q, 3>(w, x + m * K, K, out + m); break;
    case 2: tile_avx2<Q, 2>(w, x + m * K, K, out + m); break;
    case 1: tile_avx2<Q, 1>(w, x + m * K, K, out + m); break;
  }
}
#endif

using RowFn = void (*)(const uint8_t*, const float*, int64_t, int64_t, float*);

template <int Q>
RowFn row_fn(bool portable) {
#ifdef QUANT_AVX2
  if (!portable) return &row_avx2<Q>;
#endif
  (void)portable;
  return &row_portable<Q>;
}

RowFn pick(int64_t qtype, bool portable) {
  switch (qtype) {
    case Q8_0: return row_fn<Q8_0>(portable);
    case Q4_0: return row_fn<Q4_0>(portable);
    case Q4_1: return row_fn<Q4_1>(portable);
    case Q4_K: return row_fn<Q4_K>(portable);
    case Q6_K: return row_fn<Q6_K>(portable);
  }
  TORCH_CHECK(false, "quant: unknown qtype ", qtype);
}

int64_t in_features(const at::Tensor& w, int64_t qtype) {
  TORCH_CHECK(qtype >= 0 && qtype <= Q6_K, "quant: unknown qtype ", qtype);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(), "quant: w must be contiguous uint8 (N, bytes)");
  TORCH_CHECK(w.size(1) % kBytes[qtype] == 0, "quant: row bytes not a whole number of blocks");
  return w.size(1) / kBytes[qtype] * kBlock[qtype];
}

at::Tensor qlinear_impl(const at::Tensor& x_in, const at::Tensor& w, int64_t qtype, bool portable) {
  const int64_t K = in_features(w, qtype);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == K, "qlinear: x must be (M, ", K, ")");
  const int64_t M = x_in.size(0), N = w.size(0), row_bytes = w.size(1);
  TORCH_CHECK(M <= kMaxRows, "qlinear: at most ", kMaxRows, " rows of x");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({N, M}, x.options());  // transposed: each task writes whole rows
  const float* X = x.data_ptr<float>();
  const uint8_t* W = w.data_ptr<uint8_t>();
  float* Y = y.data_ptr<float>();
  const RowFn row = pick(qtype, portable);
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) row(W + n * row_bytes, X, M, K, Y + n * M);
  });
  return y.t().to(x_in.scalar_type()).contiguous();
}

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& w, int64_t qtype) { return qlinear_impl(x, w, qtype, false); }

at::Tensor qlinear_portable(const at::Tensor& x, const at::Tensor& w, int64_t qtype) {
  return qlinear_impl(x, w, qtype, true);
}

template <int Q>
void dequant_rows(const uint8_t* W, float* Y, int64_t N, int64_t K, int64_t row_bytes) {
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0, b = 0; k < K; k += kBlock[Q], b += kBytes[Q])
        dequant_block<Q>(W + n * row_bytes + b, Y + n * K + k);
  });
}

at::Tensor dequant(const at::Tensor& w, int64_t qtype) {
  const int64_t K = in_features(w, qtype);
  const int64_t N = w.size(0);
  at::Tensor y = at::empty({N, K}, w.options().dtype(at::kFloat));
  const uint8_t* W = w.data_ptr<uint8_t>();
  float* Y = y.data_ptr<float>();
  switch (qtype) {
    case Q8_0: dequant_rows<Q8_0>(W, Y, N, K, w.size(1)); break;
    case Q4_0: dequant_rows<Q4_0>(W, Y, N, K, w.size(1)); break;
    case Q4_1: dequant_rows<Q4_1>(W, Y, N, K, w.size(1)); break;
    case Q4_K: dequant_rows<Q4_K>(W, Y, N, K, w.size(1)); break;
    case Q6_K: dequant_rows<Q6_K>(W, Y, N, K, w.size(1)); break;
  }
  return y;
}

std::string isa() {
#ifdef QUANT_AVX2
  return "avx2";
#else
  return "portable";
#endif
}

}  // namespace

// Native ops (torch.ops.llama3_quant.*): callable from torch.compile's generated code like aten ops.
TORCH_LIBRARY(llama3_quant, m) {
  m.def("qlinear(Tensor x, Tensor w, int qtype) -> Tensor");
  m.def("qlinear_portable(Tensor x, Tensor w, int qtype) -> Tensor");
  m.def("dequant(Tensor w, int qtype) -> Tensor");
  m.def("isa() -> str", &isa);
}
TORCH_LIBRARY_IMPL(llama3_quant, CPU, m) {
  m.impl("qlinear", &qlinear);
  m.impl("qlinear_portable", &qlinear_portable);
  m.impl("dequant", &dequant);
}
