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
