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
#if defined(L3D_AVX512BF16) || defined(L3D_AVX512)
#define L3D_X86_AVX512 1  // and AVX-512 F/BW/VL
#endif

#define L3D_STR2(x) #x
#define L3D_STR(x) L3D_STR2(x)
#define L3D_CAT2(a, b) a##b
#define L3D_CAT(a, b) L3D_CAT2(a, b)
#define L3D_OP(name) L3D_STR(L3D_CAT(name, L3D_CAT(_, L3D_ISA)))

// For the small helpers of the inner loops (a block's codes, its dot product): `inline` alone left
// one of them a call per block in every kernel that used it twice, spilling the block's codes to the
// stack between (Q8_0 matmuls ran a third slower).
#if defined(__GNUC__)  // GCC and Clang, the compilers the -m flags of kernels/__init__.py are for
#define L3D_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define L3D_ALWAYS_INLINE inline
#endif

#if defined(L3D_X86_SIMD)
// Software prefetch for the x86 decode loops, which stream each weight row once: each iteration
// asks for the cache lines kPrefetchBytes ahead of the bytes it reads (at least one prefetch per
// 64-byte line; a prefetch never faults, so running past the end of W is harmless). On a Zen 3 with
// two threads the hardware prefetcher alone fell behind the loops that do more work per byte than
// fp32's: bf16 rows read 15-30% faster with it, Q8_0 ~9%, Q4_1 ~3%; fp32 gained nothing and has none.
// 1 KB was the best distance of 512 B, 1, 2 and 4 KB there. The AVX-512 builds ask 4 KB ahead, fp32
// and AVX512-BF16 dot products included: on a Zen 5 a 576-wide bf16 row stream read 37-40 GB/s
// without, 47-48 with 4 KB (2 KB 44, 8 KB 44-46), fp32 40-43 -> 44-45; SmolLM2's step matmuls, two
// builds in one process: Q4_1 -18%, Q8_0 -8 to -15%, bf16 -5%, bf16 batch 4 -15 to -17%, fp32 -15 to +4%.
#if defined(L3D_X86_AVX512)
constexpr int64_t kPrefetchBytes = 4096;
#else
constexpr int64_t kPrefetchBytes = 1024;
#endif

template <int64_t Bytes, int64_t Distance = kPrefetchBytes>  // the bytes one loop iteration reads
inline void prefetch_ahead(const void* p) {
  for (int64_t b = 0; b < Bytes; b += 64) _mm_prefetch(static_cast<const char*>(p) + Distance + b, _MM_HINT_T0);
}
#endif
