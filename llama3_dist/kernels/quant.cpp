// Matmuls with quantized weights for CPU, over llama.cpp's block formats (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K).
//
// A weight is a uint8 tensor (N, K / block * block_bytes): each row of W is its blocks, byte for
// byte as in a GGUF file. `qlinear` computes y = x @ W.T for a few rows of x (a decode step): each
// row of W is read once, its blocks are dequantized in registers (AVX2 + FMA for the 32-element
// formats) or into a 256-float buffer in L1 (the K-quant super-blocks), and dotted with every row
// of x in float32. With int8_x (runtime.activations=int8, Q8_0 / Q4_x) each row of x is first rounded to
// int8 per 32 elements and the blocks are dotted in integers (maddubs or vpdpbusd), as llama.cpp's CPU backend
// does. `dequant` expands rows of W to float32 (prefill, embedding lookups).
// Part of the kernel family (kernels/__init__.py): compiled with decode.cpp once per instruction
// set, registering torch.ops.llama3_dist.qlinear_<isa> / dequant_<isa>. The x86 builds run AVX2 +
// FMA + F16C loops; the AVX-512 ones take the 32-element formats 16 lanes at a time, and the
// avx512bf16 build (which has AVX512-VNNI) dots int8 activations with vpdpbusd and bf16 x with Q4
// codes by vdpbf16ps (tile_bf16x). The portable build
// runs a scalar dequantizer that the compiler vectorises.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "isa.h"

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

// Portable row kernel: y[m * ldy] = sum over blocks of dot(dequant(block), x[m]) for M rows of x.
template <int Q>
void row_portable(const uint8_t* w, const float* x, const float* /*xmin*/, int64_t M, int64_t K, float* y, int64_t ldy) {
  constexpr int64_t B = kBlock[Q];
  float buf[B], acc[kMaxRows] = {};
  for (int64_t k = 0; k < K; k += B, w += kBytes[Q]) {
    dequant_block<Q>(w, buf);
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K + k;
      float s = 0.0f;
      for (int64_t j = 0; j < B; ++j) s += buf[j] * xm[j];
      acc[m] += s;
    }
  }
  for (int64_t m = 0; m < M; ++m) y[m * ldy] = acc[m];
}

// --- int8 activations (runtime.activations=int8), as llama.cpp's CPU backend multiplies ---
// Each row of x is rounded per 32 elements like a Q8_0 block (dx = max|x| / 127, qx = round(x / dx),
// x^ = dx * qx); one block of a Q8_0 / Q4_0 / Q4_1 weight against it is an integer dot product scaled
// once: dot(dw * c + m, x^) = dw * dx * sum(c * qx) + m * dx * sum(qx) (Q4_0's codes are unsigned with
// the minimum -8 dw, as above). The result is x^ @ W.T, as quant.py's round_activations defines it.
struct Int8X {
  const int8_t* q;   // (M, K)
  const float* ds;   // (M, K / 32, 2): each block's dx and dx * sum(qx) (the minimums' term)
};

// --- float activations as three int8 digits (batch-1 steps against Q4_0 / Q4_1, avx2 build) ---
// Converting every 4-bit code to float costs more than reading it (tile_avx2 is bound by that
// conversion, not by memory), so a batch-1 step keeps the codes in integers and splits x instead:
// per 32 elements v = round(x / dx) with dx = max|x| / kDigitsMax, written as three signed digits
// v = q0 * 2^14 + q1 * 2^7 + q2 (q0 in [-127, 127], q1 and q2 in [-64, 63]). Each digit is dotted
// with the codes by the int8 kernel's integer products, the three sums joined exactly in int32
// (a block's sum of 32 products of 15 * 2^21 fits), so a block's dot product is exact for x^ = dx * v
// and its error against x is at most dx / 2 = max|x| * 2^-22 per element: the size of float32's own
// rounding when it adds the products of that block (2^-24 of a sum that large). Blocks are then
// summed in float32 as before.
constexpr int kDigits = 3;
constexpr float kDigitsMax = 127 * 16384 + 63 * 128 + 63;  // the largest v three digits hold

inline int block_code(const uint8_t* b, int64_t qtype, int j) {
  if (qtype == Q8_0) return reinterpret_cast<const int8_t*>(b + 2)[j];
  const uint8_t* q = b + (qtype == Q4_1 ? 4 : 2);
  return j < 16 ? q[j] & 0xF : q[j - 16] >> 4;
}

template <int Q>
void row_int8x_portable(const uint8_t* w, const Int8X& x, int64_t M, int64_t K, float* y, int64_t ldy) {
  const int64_t nb = K / 32;
  for (int64_t m = 0; m < M; ++m) {
    const uint8_t* b = w;
    float acc = 0.0f;
    for (int64_t i = 0; i < nb; ++i, b += kBytes[Q]) {
      int32_t s = 0;
      for (int j = 0; j < 32; ++j) s += block_code(b, Q, j) * x.q[m * K + i * 32 + j];
      const float* ds = x.ds + (m * nb + i) * 2;
      acc += f16(b) * ds[0] * static_cast<float>(s);
      if constexpr (Q != Q8_0) acc += (Q == Q4_1 ? f16(b + 2) : -8.0f * f16(b)) * ds[1];
    }
    y[m * ldy] = acc;
  }
}

#ifdef L3D_X86_SIMD
L3D_ALWAYS_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float f16_hw(const uint8_t* p) { return _cvtsh_ss(*reinterpret_cast<const uint16_t*>(p)); }  // F16C
L3D_ALWAYS_INLINE __m256 i8x8(const uint8_t* p) {  // 8 int8 -> 8 floats (one vpmovsxbd from memory)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// The integer codes of one 32-element block as floats (scale not applied): c[j] holds elements
// 8j..8j+7, widened straight from memory.
template <int Q>
L3D_ALWAYS_INLINE void block_codes(const uint8_t* b, __m256* c) {
  if constexpr (Q == Q8_0) {
    for (int j = 0; j < 4; ++j) c[j] = i8x8(b + 2 + 8 * j);
  } else {
    // Byte j holds element j (low nibble) and element j + 16 (high nibble): 8 bytes widened to
    // 32-bit lanes give 8 elements with a mask and 8 more with a shift. (Q4_0's offset of -8 is
    // its minimum, -8d, applied with Q4_1's.)
    const uint8_t* q = b + (Q == Q4_1 ? 4 : 2);
    const __m256i mask = _mm256_set1_epi32(0x0F);
    const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
    const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8)));
    c[0] = _mm256_cvtepi32_ps(_mm256_and_si256(v0, mask));
    c[1] = _mm256_cvtepi32_ps(_mm256_and_si256(v1, mask));
    c[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4));
    c[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4));
  }
}

// dot(codes, x) over one block of x (32 floats), summed in a short tree so that the only chain
// carried from block to block is the one FMA that applies the scale.
L3D_ALWAYS_INLINE __m256 block_dot(const __m256* c, const float* x) {
  __m256 xv[4];
  for (int j = 0; j < 4; ++j) xv[j] = _mm256_loadu_ps(x + 8 * j);
  const __m256 p0 = _mm256_fmadd_ps(c[2], xv[2], _mm256_mul_ps(c[0], xv[0]));
  const __m256 p1 = _mm256_fmadd_ps(c[3], xv[3], _mm256_mul_ps(c[1], xv[1]));
  return _mm256_add_ps(p0, p1);
}

// A block's scales as floats in one register: [d, m, 0, 0] for Q4_1 (its two f16 side by side),
// [d, 0, 0, 0] for Q8_0 and Q4_0 (Q4_0's minimum, -8 d, is folded into x's side: xmin below).
template <int Q>
L3D_ALWAYS_INLINE __m128 block_scales(const uint8_t* b) {
  int32_t h = 0;
  std::memcpy(&h, b, Q == Q4_1 ? 4 : 2);
  return _mm_cvtph_ps(_mm_cvtsi32_si128(h));
}

// x's pair for one block (xmin below) in the low two lanes, and the minimum's term it accumulated:
// lane 0 + lane 1 of [d, m] . pair.
L3D_ALWAYS_INLINE __m128 xmin_pair(const float* p) { return _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p))); }
L3D_ALWAYS_INLINE float min_term(__m128 macc) { return _mm_cvtss_f32(_mm_add_ss(macc, _mm_movehdup_ps(macc))); }

// MT rows of x against one row of W, accumulators in registers. For the 32-element formats
// dot(d * q + m, x) = d * dot(q, x) + m * sum(x). xmin holds, per row of x and block, the pair that
// [d, m] multiplies into the minimum's term: [0, sum(x)] for Q4_1, [-8 sum(x), 0] for Q4_0; that
// product accumulates as a vector beside the codes' (no scalar work per block).
template <int Q, int MT>
void tile_avx2(const uint8_t* w, const float* x, const float* xmin, int64_t K, float* out, int64_t ldy) {
  if constexpr (kBlock[Q] == 32) {
    const int64_t nb = K / 32;
    __m256 acc[MT][2];
    __m128 macc[MT];
    for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps(), macc[m] = _mm_setzero_ps();
    auto mins = [&](int m, int64_t i) { return xmin_pair(xmin + (m * nb + i) * 2); };  // block i of row m
    int64_t i = 0;
    __m256 c[4];  // one block's codes, converted once for all MT rows of x
    for (; i + 2 <= nb; i += 2, w += 2 * kBytes[Q]) {  // two blocks per step: two independent chains
      prefetch_ahead<2 * kBytes[Q]>(w);
      block_codes<Q>(w, c);
      const __m128 s0 = block_scales<Q>(w);
      const __m256 d0 = _mm256_broadcastss_ps(s0);
      for (int m = 0; m < MT; ++m) acc[m][0] = _mm256_fmadd_ps(block_dot(c, x + m * K + i * 32), d0, acc[m][0]);
      block_codes<Q>(w + kBytes[Q], c);
      const __m128 s1 = block_scales<Q>(w + kBytes[Q]);
      const __m256 d1 = _mm256_broadcastss_ps(s1);
      for (int m = 0; m < MT; ++m) {
        acc[m][1] = _mm256_fmadd_ps(block_dot(c, x + m * K + i * 32 + 32), d1, acc[m][1]);
        if constexpr (Q != Q8_0)
          macc[m] = _mm_fmadd_ps(s1, mins(m, i + 1), _mm_fmadd_ps(s0, mins(m, i), macc[m]));
      }
    }
    for (; i < nb; ++i, w += kBytes[Q]) {
      block_codes<Q>(w, c);
      const __m128 s0 = block_scales<Q>(w);
      const __m256 d0 = _mm256_broadcastss_ps(s0);
      for (int m = 0; m < MT; ++m) {
        acc[m][0] = _mm256_fmadd_ps(block_dot(c, x + m * K + i * 32), d0, acc[m][0]);
        if constexpr (Q != Q8_0) macc[m] = _mm_fmadd_ps(s0, mins(m, i), macc[m]);
      }
    }
    for (int m = 0; m < MT; ++m) out[m * ldy] = hsum(_mm256_add_ps(acc[m][0], acc[m][1])) + min_term(macc[m]);
  } else {  // super-blocks: expand into L1, then FMAs
    __m256 acc[MT][2];
    for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    alignas(32) float buf[256];
    for (int64_t k = 0; k < K; k += 256, w += kBytes[Q]) {
      prefetch_ahead<kBytes[Q]>(w);
      dequant_block<Q>(w, buf);
      for (int m = 0; m < MT; ++m) {
        const float* xm = x + m * K + k;
        for (int j = 0; j < 256; j += 16) {
          acc[m][0] = _mm256_fmadd_ps(_mm256_load_ps(buf + j), _mm256_loadu_ps(xm + j), acc[m][0]);
          acc[m][1] = _mm256_fmadd_ps(_mm256_load_ps(buf + j + 8), _mm256_loadu_ps(xm + j + 8), acc[m][1]);
        }
      }
    }
    for (int m = 0; m < MT; ++m) out[m * ldy] = hsum(_mm256_add_ps(acc[m][0], acc[m][1]));
  }
}

#ifdef L3D_X86_AVX512
// The same two loops on 16 lanes: a 32-element block is two vectors. A Q4 block's 16 code bytes
// widen to one vector whose mask gives elements 0-15 and whose shift gives 16-31; a Q8_0 block is
// two sign-extending loads. Half the instructions per block of the 8-lane loops.
template <int Q>
L3D_ALWAYS_INLINE void block_codes16(const uint8_t* b, __m512* c) {
  if constexpr (Q == Q8_0) {
    c[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2))));
    c[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18))));
  } else {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (Q == Q4_1 ? 4 : 2))));
    c[0] = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0F)));
    c[1] = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
  }
}

L3D_ALWAYS_INLINE __m512 block_dot16(const __m512* c, const float* x) {
  return _mm512_fmadd_ps(c[1], _mm512_loadu_ps(x + 16), _mm512_mul_ps(c[0], _mm512_loadu_ps(x)));
}

// tile_avx2 for the 32-element formats (the K-quants keep the 8-lane loop).
template <int Q, int MT>
void tile_avx512(const uint8_t* w, const float* x, const float* xmin, int64_t K, float* out, int64_t ldy) {
  const int64_t nb = K / 32;
  __m512 acc[MT][2];
  __m128 macc[MT];
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps(), macc[m] = _mm_setzero_ps();
  auto mins = [&](int m, int64_t i) { return xmin_pair(xmin + (m * nb + i) * 2); };
  __m512 c[2];
  int64_t i = 0;
  for (; i + 2 <= nb; i += 2, w += 2 * kBytes[Q]) {
    prefetch_ahead<2 * kBytes[Q]>(w);
    block_codes16<Q>(w, c);
    const __m128 s0 = block_scales<Q>(w);
    const __m512 d0 = _mm512_broadcastss_ps(s0);
    for (int m = 0; m < MT; ++m) acc[m][0] = _mm512_fmadd_ps(block_dot16(c, x + m * K + i * 32), d0, acc[m][0]);
    block_codes16<Q>(w + kBytes[Q], c);
    const __m128 s1 = block_scales<Q>(w + kBytes[Q]);
    const __m512 d1 = _mm512_broadcastss_ps(s1);
    for (int m = 0; m < MT; ++m) {
      acc[m][1] = _mm512_fmadd_ps(block_dot16(c, x + m * K + i * 32 + 32), d1, acc[m][1]);
      if constexpr (Q != Q8_0) macc[m] = _mm_fmadd_ps(s1, mins(m, i + 1), _mm_fmadd_ps(s0, mins(m, i), macc[m]));
    }
  }
  if (i < nb) {
    block_codes16<Q>(w, c);
    const __m128 s0 = block_scales<Q>(w);
    const __m512 d0 = _mm512_broadcastss_ps(s0);
    for (int m = 0; m < MT; ++m) {
      acc[m][0] = _mm512_fmadd_ps(block_dot16(c, x + m * K + i * 32), d0, acc[m][0]);
      if constexpr (Q != Q8_0) macc[m] = _mm_fmadd_ps(s0, mins(m, i), macc[m]);
    }
  }
  for (int m = 0; m < MT; ++m) out[m * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) + min_term(macc[m]);
}

// One row of x (a batch-1 decode step) against two rows of W: a 576-wide row is only 18 blocks, so
// the loop's set-up and the final sums are a large share of a row; two rows share them and x's loads.
template <int Q>
void pair_avx512(const uint8_t* w0, int64_t row_bytes, const float* x, const float* xmin, int64_t K, float* y) {
  const uint8_t* w1 = w0 + row_bytes;
  const int64_t nb = K / 32;
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), c[2];
  __m128 macc0 = _mm_setzero_ps(), macc1 = _mm_setzero_ps();
  for (int64_t i = 0; i < nb; ++i, w0 += kBytes[Q], w1 += kBytes[Q], x += 32) {
    prefetch_ahead<kBytes[Q]>(w0);
    prefetch_ahead<kBytes[Q]>(w1);
    const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);  // once for both rows
    block_codes16<Q>(w0, c);
    const __m128 s0 = block_scales<Q>(w0);
    acc0 = _mm512_fmadd_ps(_mm512_fmadd_ps(c[1], x1, _mm512_mul_ps(c[0], x0)), _mm512_broadcastss_ps(s0), acc0);
    block_codes16<Q>(w1, c);
    const __m128 s1 = block_scales<Q>(w1);
    acc1 = _mm512_fmadd_ps(_mm512_fmadd_ps(c[1], x1, _mm512_mul_ps(c[0], x0)), _mm512_broadcastss_ps(s1), acc1);
    if constexpr (Q != Q8_0) {
      const __m128 xm = xmin_pair(xmin + i * 2);
      macc0 = _mm_fmadd_ps(s0, xm, macc0);
      macc1 = _mm_fmadd_ps(s1, xm, macc1);
    }
  }
  y[0] = _mm512_reduce_add_ps(acc0) + min_term(macc0);
  y[1] = _mm512_reduce_add_ps(acc1) + min_term(macc1);
}
#endif

// MT rows of x against one row of W: 16 lanes for the 32-element formats where the build has
// AVX-512, else 8.
template <int Q, int MT>
L3D_ALWAYS_INLINE void tile_x86(const uint8_t* w, const float* x, const float* xmin, int64_t K, float* out, int64_t ldy) {
#ifdef L3D_X86_AVX512
  if constexpr (kBlock[Q] == 32) return tile_avx512<Q, MT>(w, x, xmin, K, out, ldy);
#endif
  tile_avx2<Q, MT>(w, x, xmin, K, out, ldy);
}

// Rows of x in tiles of up to 4 (the row of W stays in L1 between tiles).
template <int Q>
void row_x86(const uint8_t* w, const float* x, const float* xmin, int64_t M, int64_t K, float* y, int64_t ldy) {
  const int64_t nb = K / kBlock[Q];
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile_x86<Q, 4>(w, x + m * K, xmin + m * nb * 2, K, y + m * ldy, ldy);
  switch (M - m) {
    case 3: tile_x86<Q, 3>(w, x + m * K, xmin + m * nb * 2, K, y + m * ldy, ldy); break;
    case 2: tile_x86<Q, 2>(w, x + m * K, xmin + m * nb * 2, K, y + m * ldy, ldy); break;
    case 1: tile_x86<Q, 1>(w, x + m * K, xmin + m * nb * 2, K, y + m * ldy, ldy); break;
  }
}

// Sums of four products of unsigned by signed bytes in each int32 lane: one vpdpbusd where the
// build has AVX512-VNNI, else maddubs (pairs to int16; no overflow for |s| <= 127 and u <= 127) and
// madd (to int32). dot2_u8s8 sums two such products (the Q4 blocks' low and high nibbles).
L3D_ALWAYS_INLINE __m256i dot_u8s8(__m256i u, __m256i s) {
#ifdef __AVX512VNNI__
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

L3D_ALWAYS_INLINE __m256i dot2_u8s8(__m256i u0, __m256i s0, __m256i u1, __m256i s1) {
#ifdef __AVX512VNNI__
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u0, s0), u1, s1);
#else  // |s| <= 127, u <= 15: the two int16 sums cannot overflow
  return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(u0, s0), _mm256_maddubs_epi16(u1, s1)),
                           _mm256_set1_epi16(1));
#endif
}

// The integer sums of a block against x's D digits (dot(d) for digit d), joined into one:
// dot(0) * 2^14 + dot(1) * 2^7 + dot(2) for three digits, dot(0) for one.
template <int D, class Dot>
L3D_ALWAYS_INLINE __m256i join_digits(Dot dot) {
  if constexpr (D == 1) {
    return dot(0);
  } else {
    static_assert(D == kDigits);
    return _mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32(dot(0), 14), _mm256_slli_epi32(dot(1), 7)), dot(2));
  }
}

// One block's 32 codes as bytes in one register (element j in byte j) and its scales [dw, m, 0, 0]
// (Q4_0: m = -8 dw; Q8_0: m unused).
template <int Q>
L3D_ALWAYS_INLINE void int_block(const uint8_t* b, __m256i& c, __m128& dm) {
  if constexpr (Q == Q8_0) {
    dm = _mm_cvtph_ps(_mm_cvtsi32_si128(*reinterpret_cast<const uint16_t*>(b)));
    c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2));
  } else {  // byte j: element j (low nibble, j < 16) or element j (high nibble of byte j - 16)
    if constexpr (Q == Q4_1) {
      int32_t h;
      std::memcpy(&h, b, 4);
      dm = _mm_cvtph_ps(_mm_cvtsi32_si128(h));
    } else {
      dm = _mm_mul_ps(_mm_set1_ps(f16_hw(b)), _mm_setr_ps(1.0f, -8.0f, 0.0f, 0.0f));
    }
    const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (Q == Q4_1 ? 4 : 2)));
    c = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0F));
  }
}

// Q4_0 / Q4_1 blocks A and B (B right after A) at once: their 16 code bytes share one register (A in
// the low 128 bits, B in the high), so one mask and one shift give both blocks' low nibbles (lo) and
// high nibbles (hi), to be dotted with x in pair order (pair_order: A[0:16] B[0:16] A[16:32]
// B[16:32]); the products' lanes stay apart (A low, B high). dm = [dA, mA, dB, mB].
template <int Q>
L3D_ALWAYS_INLINE void int_block_pair(const uint8_t* b, __m256i& lo, __m256i& hi, __m128& dm) {
  constexpr int off = Q == Q4_1 ? 4 : 2;
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i t = _mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + off))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + kBytes[Q] + off)), 1);
  lo = _mm256_and_si256(t, low), hi = _mm256_and_si256(_mm256_srli_epi16(t, 4), low);
  if constexpr (Q == Q4_1) {
    int32_t ha, hb;
    std::memcpy(&ha, b, 4);
    std::memcpy(&hb, b + kBytes[Q], 4);
    dm = _mm_cvtph_ps(_mm_insert_epi32(_mm_cvtsi32_si128(ha), hb, 1));
  } else {
    uint16_t ha, hb;
    std::memcpy(&ha, b, 2);
    std::memcpy(&hb, b + kBytes[Q], 2);
    dm = _mm_mul_ps(_mm_cvtph_ps(_mm_setr_epi16(ha, ha, hb, hb, 0, 0, 0, 0)), _mm_setr_ps(1.0f, -8.0f, 1.0f, -8.0f));
  }
}

// [sA x 4 | sB x 4] from [sA, ., sB, .]: a pair's scales against its products' lanes.
L3D_ALWAYS_INLINE __m256 pair_scales(__m128 sm) {
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(sm), _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2));
}

// MT rows of x (int8) against one row of W: per block the 32 codes are bytes in one register and
// dot_u8s8 (unsigned x signed bytes, four products per int32 lane) gives 8 partial sums, turned
// to float and scaled by dw * dx. The block's two scales [dw, m] times x's [dx, dx * sum(qx)] are one
// 128-bit product: lane 0 scales the codes' sum, lane 1 is the minimum's term, accumulated as a
// vector. A independent chains (blocks i mod A) hide the FMA and add latencies. D = kDigits: each row
// of x is three rows of digits (x.q is (M, D, K)), their sums joined before the conversion to float.
template <int Q, int MT, int D = 1>
void tile_int8x_avx2(const uint8_t* w, const Int8X& x, int64_t m0, int64_t K, float* out, int64_t ldy) {
  constexpr int A = MT == 1 ? 4 : 2;
  const int64_t nb = K / 32;
  const int8_t* xq = x.q + m0 * D * K;
  const float* xds = x.ds + m0 * nb * 2;
  __m256 acc[MT][A];
  __m128 macc[MT][A];
  for (int m = 0; m < MT; ++m)
    for (int a = 0; a < A; ++a) acc[m][a] = _mm256_setzero_ps(), macc[m][a] = _mm_setzero_ps();
  auto block = [&](const uint8_t* b, int64_t i, int a) {
    __m128 dm;
    __m256i c;
    int_block<Q>(b, c, dm);
    const __m256i cu = Q == Q8_0 ? _mm256_sign_epi8(c, c) : c;  // |c|: maddubs wants its first operand unsigned
    for (int m = 0; m < MT; ++m) {
      const int8_t* xp = xq + m * D * K + i * 32;
      const __m256 s = _mm256_cvtepi32_ps(join_digits<D>([&](int d) {
        __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + d * K));
        if constexpr (Q == Q8_0) q = _mm256_sign_epi8(q, c);  // the sign of c moved onto x
        return dot_u8s8(cu, q);
      }));
      const __m128 sm = _mm_mul_ps(dm, _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(xds + (m * nb + i) * 2))));
      acc[m][a] = _mm256_fmadd_ps(_mm256_broadcastss_ps(sm), s, acc[m][a]);
      if constexpr (Q != Q8_0) macc[m][a] = _mm_add_ps(macc[m][a], sm);
    }
  };
  // Q4_0 / Q4_1: two blocks at a time (int_block_pair)
  auto pair = [&](const uint8_t* b, int64_t i, int a) {
    __m256i lo, hi;
    __m128 dm;
    int_block_pair<Q>(b, lo, hi, dm);
    for (int m = 0; m < MT; ++m) {
      const int8_t* xp = xq + m * D * K + i * 32;
      const __m256 s = _mm256_cvtepi32_ps(join_digits<D>([&](int d) {
        return dot2_u8s8(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + d * K)), hi,
                         _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + d * K + 32)));
      }));
      const __m128 sm = _mm_mul_ps(dm, _mm_loadu_ps(xds + (m * nb + i) * 2));
      acc[m][a] = _mm256_fmadd_ps(pair_scales(sm), s, acc[m][a]);
      macc[m][a] = _mm_add_ps(macc[m][a], sm);
    }
  };
  int64_t i = 0;
  if constexpr (Q == Q8_0) {
    for (; i + A <= nb; i += A, w += A * kBytes[Q]) {
      prefetch_ahead<A * kBytes[Q]>(w);
      for (int a = 0; a < A; ++a) block(w + a * kBytes[Q], i + a, a);
    }
    for (int a = 0; i < nb; ++i, ++a, w += kBytes[Q]) block(w, i, a);
  } else {
    for (; i + 2 * A <= nb; i += 2 * A, w += 2 * A * kBytes[Q]) {
      prefetch_ahead<2 * A * kBytes[Q]>(w);
      for (int a = 0; a < A; ++a) pair(w + 2 * a * kBytes[Q], i + 2 * a, a);
    }
    for (int a = 0; i + 2 <= nb; i += 2, ++a, w += 2 * kBytes[Q]) pair(w, i, a);
    if (i < nb) block(w, i, 0);  // an odd last block, in natural order
  }
  for (int m = 0; m < MT; ++m) {
    __m256 t = acc[m][0];
    __m128 u = macc[m][0];
    for (int a = 1; a < A; ++a) t = _mm256_add_ps(t, acc[m][a]), u = _mm_add_ps(u, macc[m][a]);
    float mins[4];  // the minimums' terms: lane 1 (block A, or a single block) and lane 3 (block B)
    _mm_storeu_ps(mins, u);
    out[m * ldy] = hsum(t) + (Q == Q8_0 ? 0.0f : mins[1] + mins[3]);
  }
}

// Rows of int8 x (M, K) from natural to pair order for the Q4 kernels: in each pair of blocks A, B
// the middle 16-byte chunks swap, giving A[0:16] B[0:16] A[16:32] B[16:32]; an odd last block stays.
void pair_order(int8_t* q, int64_t M, int64_t K) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j + 64 <= K; j += 64) {
      int8_t* p = q + m * K + j;
      int8_t t[16];
      std::memcpy(t, p + 16, 16);
      std::memcpy(p + 16, p + 32, 16);
      std::memcpy(p + 32, t, 16);
    }
}

template <int Q>
void row_int8x_avx2(const uint8_t* w, const Int8X& x, int64_t M, int64_t K, float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile_int8x_avx2<Q, 4>(w, x, m, K, y + m * ldy, ldy);
  switch (M - m) {
    case 3: tile_int8x_avx2<Q, 3>(w, x, m, K, y + m * ldy, ldy); break;
    case 2: tile_int8x_avx2<Q, 2>(w, x, m, K, y + m * ldy, ldy); break;
    case 1: tile_int8x_avx2<Q, 1>(w, x, m, K, y + m * ldy, ldy); break;
  }
}

// One row of float x, as three digits, against one row of W (an odd last row; pick_digits).
template <int Q>
void row_digits_avx2(const uint8_t* w, const Int8X& x, int64_t /*M = 1*/, int64_t K, float* y, int64_t /*ldy*/) {
  tile_int8x_avx2<Q, 1, kDigits>(w, x, 0, K, y, 1);
}

// One row of float x, as three digits (x.q: (1, kDigits, K), pair order), against two rows of W,
// the second row_bytes after the first (pick_digits): a batch-1 step's rows are short (a 576-wide
// one is 18 blocks), so the two rows share the loop, the final sums and x's scales (x's digits are
// read from L1 by each row). Its per-block arithmetic is tile_int8x_avx2's pair / block, spelled out
// on purpose: two shared helpers (acc_block, acc_block_pair) made GCC hold x's six digit vectors in
// registers across the two rows and spill the accumulators (SmolLM2's Q4_1 step matmuls 1-3% slower,
// faster in 1/30 and 8/30 alternating rounds), and grew the int8 tiles for 2-4 rows of x by 15-20%.
template <int Q>
void pair_digits_avx2(const uint8_t* w0, int64_t row_bytes, const Int8X& x, int64_t K, float* y) {
  const int64_t nb = K / 32;
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  __m128 macc[2] = {_mm_setzero_ps(), _mm_setzero_ps()};
  int64_t i = 0;
  for (; i + 2 <= nb; i += 2) {
    const int8_t* xp = x.q + i * 32;
    const __m128 xds = _mm_loadu_ps(x.ds + i * 2);
    for (int r = 0; r < 2; ++r) {
      const uint8_t* b = w0 + r * row_bytes + i * kBytes[Q];
      prefetch_ahead<2 * kBytes[Q], 2 * kPrefetchBytes>(b);  // 2 KB: this loop outruns 1 KB's
      __m256i lo, hi;
      __m128 dm;
      int_block_pair<Q>(b, lo, hi, dm);
      const __m256 s = _mm256_cvtepi32_ps(join_digits<kDigits>([&](int d) {
        return dot2_u8s8(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + d * K)), hi,
                         _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + d * K + 32)));
      }));
      const __m128 sm = _mm_mul_ps(dm, xds);
      acc[r] = _mm256_fmadd_ps(pair_scales(sm), s, acc[r]);
      macc[r] = _mm_add_ps(macc[r], sm);
    }
  }
  if (i < nb) {  // an odd last block, in natural order
    const __m128 xds = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(x.ds + i * 2)));
    for (int r = 0; r < 2; ++r) {
      __m256i c;
      __m128 dm;
      int_block<Q>(w0 + r * row_bytes + i * kBytes[Q], c, dm);
      const __m256 s = _mm256_cvtepi32_ps(join_digits<kDigits>(
          [&](int d) { return dot_u8s8(c, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + d * K + i * 32))); }));
      const __m128 sm = _mm_mul_ps(dm, xds);
      acc[r] = _mm256_fmadd_ps(_mm256_broadcastss_ps(sm), s, acc[r]);
      macc[r] = _mm_add_ps(macc[r], sm);
    }
  }
  for (int r = 0; r < 2; ++r) {
    float mins[4];  // the minimums' terms: lanes 1 and 3 (as in tile_int8x_avx2)
    _mm_storeu_ps(mins, macc[r]);
    y[r] = hsum(acc[r]) + mins[1] + mins[3];
  }
}
#endif

#ifdef L3D_AVX512BF16
// --- bfloat16 x (runtime.dtype=bfloat16) against Q4_0 / Q4_1, avx512bf16 build ---
// A 4-bit code times a bf16 element is exact in float32, so the codes become bf16 too and vdpbf16ps
// takes 32 products per instruction, summed in float32 as the float loops sum them (its one
// difference: it reads denormal inputs, x under 2^-126, as zero). Two blocks A, B per step: their
// code bytes widen to 32 words (A's, then B's); vpermw looks each word's low 5 bits up in a table of
// bf16(0..15) written twice (the low nibble, whatever bit 4 holds), and after a 4-bit shift the high
// nibble. x is laid out to match once per call (bf16_pairs), and each step's sums of A (lanes 0-7)
// and B (lanes 8-15) take their block's scale from one permute of [dA, mA, dB, mB]. Against the
// float loop on a Zen 5 (2 threads, Llama-3.2-1B-shaped matrices read from memory, batch 1): Q4_1
// 20-32% less time, Q4_0 16-26%; with 4 rows of x 29-38%; the 1B's int4 decode step 17% less.
alignas(64) constexpr uint16_t kBf16Codes[32] = {
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0, 0x4100, 0x4110, 0x4120,
    0x4130, 0x4140, 0x4150, 0x4160, 0x4170, 0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0,
    0x40C0, 0x40E0, 0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};  // bf16(i % 16)

// At batch 1 rows shorter than this keep pair_avx512 (two rows of W per pass share its set-up and
// sums): measured against it, 576-wide rows took 5-14% longer in tile_bf16x, 768 the same, 1024
// 12% less; with 2 or 4 rows of x tile_bf16x took 11-66% less at every width.
constexpr int64_t kBf16xMinK = 1024;

// Rows of bf16 x (M, K) -> (M, Kp) in the order the pairs of blocks are dotted: per 64 elements
// A[0:16] B[0:16] A[16:32] B[16:32]; an odd last block A[0:16] 0 A[16:32] 0 (Kp: K rounded up to 64).
void bf16_pairs(const uint16_t* x, int64_t M, int64_t K, uint16_t* out) {
  const int64_t Kp = (K + 63) / 64 * 64;
  for (int64_t m = 0; m < M; ++m, x += K, out += Kp) {
    std::memset(out, 0, Kp * sizeof(uint16_t));
    for (int64_t j = 0; j < K; j += 64) {
      const int64_t b = std::min<int64_t>(K - j, 64) / 32;  // blocks here: 2, or 1 at an odd end
      for (int64_t k = 0; k < b; ++k) {
        std::memcpy(out + j + 16 * k, x + j + 32 * k, 32);
        std::memcpy(out + j + 32 + 16 * k, x + j + 32 * k + 16, 32);
      }
    }
  }
}

// [sA, mA, sB, mB] of blocks A (at a) and B (at b, or null: zeros) as floats; Q4_0's m is 0 (its
// minimum, -8 d, is in x's pair, xmin, as in tile_avx2).
template <int Q>
L3D_ALWAYS_INLINE __m128 pair_dm(const uint8_t* a, const uint8_t* b) {
  if constexpr (Q == Q4_1) {
    int32_t ha, hb = 0;
    std::memcpy(&ha, a, 4);
    if (b) std::memcpy(&hb, b, 4);
    return _mm_cvtph_ps(_mm_insert_epi32(_mm_cvtsi32_si128(ha), hb, 1));
  } else {
    uint16_t ha, hb = 0;
    std::memcpy(&ha, a, 2);
    if (b) std::memcpy(&hb, b, 2);
    return _mm_cvtph_ps(_mm_setr_epi16(ha, 0, hb, 0, 0, 0, 0, 0));
  }
}

// MT rows of bf16 x (xp: bf16_pairs order, row stride Kp) against one row of W.
template <int Q, int MT>
void tile_bf16x(const uint8_t* w, const uint16_t* xp, int64_t Kp, const float* xmin, int64_t K, float* out, int64_t ldy) {
  constexpr int off = Q == Q4_1 ? 4 : 2;
  const int64_t nb = K / 32;
  const __m512i table = _mm512_load_si512(kBf16Codes);
  const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
  __m512 acc[MT][2];
  __m128 macc[MT];
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps(), macc[m] = _mm_setzero_ps();
  // a (which accumulator) and pair (B present) are constants: indexed at run time, acc went to the stack
  auto step = [&](__m256i codes, __m128 dm, int64_t i, auto a, auto pair) {
    const __m512i wd = _mm512_cvtepu8_epi16(codes);
    const __m512i lo = _mm512_permutexvar_epi16(wd, table), hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(wd, 4), table);
    const __m512 d = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(dm));
    for (int m = 0; m < MT; ++m) {
      const uint16_t* x = xp + m * Kp + i * 32;
      __m512 t = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)lo, (__m512bh)_mm512_loadu_si512(x));
      t = _mm512_dpbf16_ps(t, (__m512bh)hi, (__m512bh)_mm512_loadu_si512(x + 32));
      acc[m][a] = _mm512_fmadd_ps(t, d, acc[m][a]);
      const float* xm = xmin + (m * nb + i) * 2;
      macc[m] = _mm_fmadd_ps(dm, pair ? _mm_loadu_ps(xm) : xmin_pair(xm), macc[m]);  // xmin: [A's, B's]
    }
  };
  using Zero = std::integral_constant<int, 0>;
  using One = std::integral_constant<int, 1>;
  auto pair = [&](const uint8_t* b, int64_t i, auto a) {
    const __m128i ca = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + off));
    const __m128i cb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + kBytes[Q] + off));
    step(_mm256_inserti128_si256(_mm256_castsi128_si256(ca), cb, 1), pair_dm<Q>(b, b + kBytes[Q]), i, a, std::true_type{});
  };
  int64_t i = 0;
  for (; i + 4 <= nb; i += 4, w += 4 * kBytes[Q]) {  // two pairs per step: two chains of acc
    prefetch_ahead<4 * kBytes[Q]>(w);
    pair(w, i, Zero{});
    pair(w + 2 * kBytes[Q], i + 2, One{});
  }
  if (i + 2 <= nb) pair(w, i, Zero{}), i += 2, w += 2 * kBytes[Q];
  if (i < nb)  // an odd last block: B's codes, scales and x are zeros
    step(_mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + off))), pair_dm<Q>(w, nullptr), i,
         Zero{}, std::false_type{});
  for (int m = 0; m < MT; ++m) {
    const __m128 u = _mm_add_ps(macc[m], _mm_movehl_ps(macc[m], macc[m]));  // the minimums' terms: all 4 lanes
    out[m * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) + _mm_cvtss_f32(_mm_add_ss(u, _mm_movehdup_ps(u)));
  }
}

template <int Q>
void row_bf16x(const uint8_t* w, const uint16_t* xp, int64_t Kp, const float* xmin, int64_t M, int64_t K, float* y, int64_t ldy) {
  const int64_t nb = K / 32;
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile_bf16x<Q, 4>(w, xp + m * Kp, Kp, xmin + m * nb * 2, K, y + m * ldy, ldy);
  switch (M - m) {
    case 3: tile_bf16x<Q, 3>(w, xp + m * Kp, Kp, xmin + m * nb * 2, K, y + m * ldy, ldy); break;
    case 2: tile_bf16x<Q, 2>(w, xp + m * Kp, Kp, xmin + m * nb * 2, K, y + m * ldy, ldy); break;
    case 1: tile_bf16x<Q, 1>(w, xp + m * Kp, Kp, xmin + m * nb * 2, K, y + m * ldy, ldy); break;
  }
}
#endif

// One row n of W against M rows of x: y[m * ldy] for m < M (y points at column n of the (M, N) output).
using RowFn = void (*)(const uint8_t*, const float*, const float*, int64_t, int64_t, float*, int64_t);
// Two rows of W (the second row_bytes after the first) against one row of x: y[0], y[1].
using PairFn = void (*)(const uint8_t*, int64_t, const float*, const float*, int64_t, float*);

#ifdef L3D_X86_SIMD
// Whether a batch-1 step takes rows of W two at a time (pick_pair, pick_digits): only where a row is
// at most kPrefetchBytes. Longer, the second row's first kPrefetchBytes are never prefetched (each
// row's loop asks only for bytes ahead of itself) and its misses cost more than the pair saves:
// 4096-wide Q4_1 rows ran 2x slower in pairs on a Zen 3 (digits), an 8192-wide Q4_1 matrix (5 KB
// rows) 544-572 us against 307 one row at a time on a Zen 5 (AVX-512 float loop). One row at a time,
// a row's prefetches run on into the next.
constexpr bool two_rows_fit(int64_t row_bytes) { return row_bytes <= kPrefetchBytes; }
#endif

// The two-row kernel for batch-1 steps where there is one (Q4_0 / Q4_1 on the AVX-512 builds; the
// avx2 build's batch-1 Q4 steps run the digits, pick_digits) and two_rows_fit, else null.
PairFn pick_pair(int64_t qtype, int64_t row_bytes) {
#ifdef L3D_X86_AVX512
  if (!two_rows_fit(row_bytes)) return nullptr;
  switch (qtype) {  // not Q8_0: closer to its memory bound, two rows' streams were no faster
    case Q4_0: return &pair_avx512<Q4_0>;
    case Q4_1: return &pair_avx512<Q4_1>;
  }
#endif
  return nullptr;
}

template <int Q>
constexpr RowFn row_fn() {
#ifdef L3D_X86_SIMD
  return &row_x86<Q>;
#else
  return &row_portable<Q>;
#endif
}

// Rows of x (M, K) in blocks of 32 -> D rows of int8 digits per row of x (q: (M, D, K)) and
// [dx, dx * sum(v)] per block (ds: (M, K / 32, 2)). One digit (runtime.activations=int8): dx =
// max|x| / 127, v = round-half-even(x / dx) (x * (1 / dx), as quant.py's round_activations). Three
// (kDigits): dx = max|x| / kDigitsMax and v's digits q0, q1, q2, low ones first: q2 = ((v + 64) mod
// 128) - 64, then q1 the same of (v - q2) / 128, and q0 what is left.
template <int D>
void quantize_x(const float* x, int64_t M, int64_t K, int8_t* q, float* ds) {
  constexpr float vmax = D == 1 ? 127.0f : kDigitsMax;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; k += 32, x += 32, ds += 2) {
      int8_t* qk = q + m * D * K + k;  // digit d of this block at qk + d * K
#ifdef L3D_X86_SIMD
      const __m256 sign = _mm256_set1_ps(-0.0f);
      __m256 v[4], amax = _mm256_setzero_ps();
      for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(x + 8 * j), amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      const float d = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4))) / vmax;
      const __m256 inv = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f), hi = _mm256_set1_ps(vmax);
      __m256i i[4];
      for (int j = 0; j < 4; ++j) {  // clamped: x * (1 / dx) may round a hair past vmax
        const __m256 r = _mm256_round_ps(_mm256_mul_ps(v[j], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        i[j] = _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(r, hi), _mm256_sub_ps(_mm256_setzero_ps(), hi)));
      }
      const __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      const int32_t sum = _mm_cvtsi128_si32(s4);
      // int32 -> int8 with the packs' lane interleave undone by one permute (every digit fits in int8)
      auto store = [](int8_t* dst, const __m256i* t) {
        const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(t[0], t[1]), _mm256_packs_epi32(t[2], t[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
      };
      if constexpr (D == 1) {
        store(qk, i);
      } else {
        const __m256i half = _mm256_set1_epi32(64), low7 = _mm256_set1_epi32(127);
        for (int digit = D - 1; digit > 0; --digit) {  // peel the low digit off i
          __m256i t[4];
          for (int j = 0; j < 4; ++j) {
            t[j] = _mm256_sub_epi32(_mm256_and_si256(_mm256_add_epi32(i[j], half), low7), half);
            i[j] = _mm256_srai_epi32(_mm256_sub_epi32(i[j], t[j]), 7);
          }
          store(qk + digit * K, t);
        }
        store(qk, i);
      }
#else
      float amax = 0.0f;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
      const float d = amax / vmax, inv = d > 0.0f ? 1.0f / d : 0.0f;
      int32_t sum = 0;
      for (int j = 0; j < 32; ++j) {
        int32_t v = static_cast<int32_t>(std::clamp(std::nearbyint(x[j] * inv), -vmax, vmax));
        sum += v;
        for (int digit = D - 1; digit > 0; --digit) {
          const int32_t t = ((v + 64) & 127) - 64;
          qk[digit * K + j] = static_cast<int8_t>(t);
          v = (v - t) / 128;
        }
        qk[j] = static_cast<int8_t>(v);
      }
#endif
      ds[0] = d;
      ds[1] = d * static_cast<float>(sum);
    }
}

using Int8RowFn = void (*)(const uint8_t*, const Int8X&, int64_t, int64_t, float*, int64_t);

template <int Q>
constexpr Int8RowFn int8x_fn() {
#ifdef L3D_X86_SIMD
  return &row_int8x_avx2<Q>;
#else
  return &row_int8x_portable<Q>;
#endif
}

// The digits kernels for float x, where this build runs them: batch 1 against Q4_0 / Q4_1 in the
// avx2 build. (The AVX-512 builds convert codes 16 at a time, where the float loop stays ahead; with
// more rows of x the float loop converts a block's codes once for them all, and Q8_0's codes convert
// cheaply: there three digits cost more than the conversion they save, measured: SmolLM2's 120 Q8_0
// step matmuls, 2 threads, 10.7 -> 11.9 ms, faster in 1 of 20 rounds.) Rows of W go two at a time
// where two_rows_fit.
struct DigitsFns {
  void (*pair)(const uint8_t*, int64_t, const Int8X&, int64_t, float*) = nullptr;
  Int8RowFn row = nullptr;
};

DigitsFns pick_digits(int64_t qtype, int64_t M, int64_t row_bytes) {
#if defined(L3D_X86_SIMD) && !defined(L3D_X86_AVX512)
  const bool pairs = two_rows_fit(row_bytes);
  if (M == 1 && qtype == Q4_0) return {pairs ? &pair_digits_avx2<Q4_0> : nullptr, &row_digits_avx2<Q4_0>};
  if (M == 1 && qtype == Q4_1) return {pairs ? &pair_digits_avx2<Q4_1> : nullptr, &row_digits_avx2<Q4_1>};
#endif
  return {};
}

Int8RowFn pick_int8x(int64_t qtype) {
  switch (qtype) {
    case Q8_0: return int8x_fn<Q8_0>();
    case Q4_0: return int8x_fn<Q4_0>();
    case Q4_1: return int8x_fn<Q4_1>();
  }
  TORCH_CHECK(false, "qlinear: int8 activations run against Q8_0, Q4_0 and Q4_1 weights only, not qtype ", qtype);
}

RowFn pick(int64_t qtype) {
  switch (qtype) {
    case Q8_0: return row_fn<Q8_0>();
    case Q4_0: return row_fn<Q4_0>();
    case Q4_1: return row_fn<Q4_1>();
    case Q4_K: return row_fn<Q4_K>();
    case Q6_K: return row_fn<Q6_K>();
  }
  TORCH_CHECK(false, "quant: unknown qtype ", qtype);
}

int64_t in_features(const at::Tensor& w, int64_t qtype) {
  TORCH_CHECK(qtype >= 0 && qtype <= Q6_K, "quant: unknown qtype ", qtype);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(), "quant: w must be contiguous uint8 (N, bytes)");
  TORCH_CHECK(w.size(1) % kBytes[qtype] == 0, "quant: row bytes not a whole number of blocks");
  return w.size(1) / kBytes[qtype] * kBlock[qtype];
}

at::Tensor qlinear(const at::Tensor& x_in, const at::Tensor& w, int64_t qtype, bool int8_x) {
  const int64_t K = in_features(w, qtype);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == K, "qlinear: x must be (M, ", K, ")");
  const int64_t M = x_in.size(0), N = w.size(0), row_bytes = w.size(1), nb = K / 32;
  TORCH_CHECK(M <= kMaxRows, "qlinear: at most ", kMaxRows, " rows of x");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  const float* X = x.data_ptr<float>();
  const uint8_t* W = w.data_ptr<uint8_t>();
  float* Y = y.data_ptr<float>();
  const bool sums = qtype == Q4_0 || qtype == Q4_1;
  const DigitsFns digits = int8_x ? DigitsFns{} : pick_digits(qtype, M, row_bytes);
  const RowFn row = int8_x || digits.row ? nullptr : pick(qtype);
  const Int8RowFn row8 = int8_x ? pick_int8x(qtype) : digits.row;
  // Per row of x and 32-element block, the pair that a Q4_1 / Q4_0 block's scales multiply into its
  // minimum's term (tile_avx2), once per call; with int8 activations x's Q8_0-style codes and scales,
  // or for the digits kernel x's three digits and their scales.
  std::vector<float> xmin(sums && !row8 ? M * nb * 2 : 0), xds(row8 ? M * nb * 2 : 0);
  std::vector<int8_t> xq(int8_x ? M * K : digits.row ? M * kDigits * K : 0);
  if (int8_x) quantize_x<1>(X, M, K, xq.data(), xds.data());
#ifdef L3D_X86_SIMD
  if (digits.row) quantize_x<kDigits>(X, M, K, xq.data(), xds.data());
  if (row8 && sums) pair_order(xq.data(), xq.size() / K, K);
#endif
  for (size_t b = 0; b < xmin.size() / 2; ++b) {
    float s = 0.0f;
    for (int j = 0; j < 32; ++j) s += X[b * 32 + j];
    xmin[2 * b] = qtype == Q4_1 ? 0.0f : -8.0f * s;  // [d, m] . [0, s] or [d, 0] . [-8 s, 0]
    xmin[2 * b + 1] = qtype == Q4_1 ? s : 0.0f;
  }
#ifdef L3D_AVX512BF16
  if (!int8_x && x_in.scalar_type() == at::kBFloat16 && sums && (M > 1 || K >= kBf16xMinK)) {  // tile_bf16x
    const int64_t Kp = (K + 63) / 64 * 64;
    std::vector<uint16_t> xp(M * Kp);
    bf16_pairs(reinterpret_cast<const uint16_t*>(x_in.contiguous().data_ptr()), M, K, xp.data());
    const auto row = qtype == Q4_1 ? &row_bf16x<Q4_1> : &row_bf16x<Q4_0>;
    at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) row(W + n * row_bytes, xp.data(), Kp, xmin.data(), M, K, Y + n, N);
    });
    return y.to(at::kBFloat16);
  }
#endif
  if (row8) {
    const Int8X xi{xq.data(), xds.data()};
    at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
      int64_t n = n0;
      if (digits.pair != nullptr)
        for (; n + 2 <= n1; n += 2) digits.pair(W + n * row_bytes, row_bytes, xi, K, Y + n);
      for (; n < n1; ++n) row8(W + n * row_bytes, xi, M, K, Y + n, N);
    });
  } else {
    const PairFn pair = M == 1 ? pick_pair(qtype, row_bytes) : nullptr;
    at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
      int64_t n = n0;
      if (pair != nullptr)
        for (; n + 2 <= n1; n += 2) pair(W + n * row_bytes, row_bytes, X, xmin.data(), K, Y + n);
      for (; n < n1; ++n) row(W + n * row_bytes, X, xmin.data(), M, K, Y + n, N);
    });
  }
  return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
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

}  // namespace

// Native ops of this build (torch.ops.llama3_dist.qlinear_<isa>, dequant_<isa>): callable from
// torch.compile's generated code like aten ops.
TORCH_LIBRARY_FRAGMENT(llama3_dist, m) {
  m.def(L3D_OP(qlinear) "(Tensor x, Tensor w, int qtype, bool int8_x=False) -> Tensor");
  m.def(L3D_OP(dequant) "(Tensor w, int qtype) -> Tensor");
}
TORCH_LIBRARY_IMPL(llama3_dist, CPU, m) {
  m.impl(L3D_OP(qlinear), &qlinear);
  m.impl(L3D_OP(dequant), &dequant);
}
