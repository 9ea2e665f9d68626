// The instruction set of this build of the kernel family, from the one L3D_* macro that
// kernels/__init__.py passes with its -m flags (none: the portable build), and the name suffix
// of the ops it registers: torch.ops.llama3_dist.<op>_<isa>.
#pragma once

#if defined(L3D_AVX512BF16)
#define L3D_ISA avx512bf16
#elif defined(L3D_AVX512)
#define L3D_ISA avx512
#elif defined(L3D_AVX2)
#define L3D_ISA avx2
#else
#define L3D_ISA portable
#endif
#if defined(L3D_AVX512BF16) || defined(L3D_AVX512) || defined(L3D_AVX2)
#define L3D_X86_SIMD 1  // AVX2 + FMA + F16C at least
#include <immintrin.h>
#endif

#define L3D_STR2(x) #x
#define L3D_STR(x) L3D_STR2(x)
#define L3D_CAT2(a, b) a##b
#define L3D_CAT(a, b) L3D_CAT2(a, b)
#define L3D_OP(name) L3D_STR(L3D_CAT(name, L3D_CAT(_, L3D_ISA)))

// Software prefetch for the decode matmuls, which stream each weight row once: ask for the
// cache lines `kPrefetchBytes` ahead of the ones being read, one prefetch per 64-byte line as the
// loop advances (prefetches never fault, so running past the end of W is harmless). Measured on a
// Zen 3 with two threads: bf16 and quantized rows, whose loops do more work per byte than fp32,
// read 10-20% faster with it (the hardware prefetcher alone falls behind); fp32 gains nothing.
constexpr long kPrefetchBytes = 1024;

template <long Bytes>  // the bytes one loop iteration reads
inline void prefetch_ahead(const void* p) {
#if defined(L3D_X86_SIMD)
  for (long b = 0; b < Bytes; b += 64) _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes + b, _MM_HINT_T0);
#else
  for (long b = 0; b < Bytes; b += 64) __builtin_prefetch(static_cast<const char*>(p) + kPrefetchBytes + b);
#endif
}
