// Per-ISA compilation of the vectorised CPU kernels (see csrc/cpu/isa.cpp for the dispatch).
//
// Each kernel source (the files in PYECCV_VECTOR_SOURCES of CMakeLists.txt) is compiled once per
// variant with -DPYECCV_ISA_VARIANT=<n>: 2 = avx512 (x86-64-v4), 1 = avx2 (x86-64-v3: AVX2 + FMA),
// 0 = baseline (x86-64 SSE2; NEON on aarch64; whatever the compiler targets elsewhere). The source
// wraps its code in PYECCV_ISA_BEGIN / PYECCV_ISA_END: the code lands in namespace
// pyeccv::isa_<name>, and on x86-64 GCC a `#pragma GCC target` gives every function defined inside
// (OpenMP-outlined bodies included) that variant's instruction set. Standard-library templates are
// defined before the pragma, so their instantiations keep the baseline target: the weak copies the
// linker may pick from any variant's object are safe on every CPU (no ODR hazard across variants).
#pragma once

#ifndef PYECCV_ISA_VARIANT
#define PYECCV_ISA_VARIANT 0
#endif

// Register budget of the variant (GEMM micro-kernels size their tiles by it).
#if PYECCV_ISA_VARIANT == 2
#define PYECCV_ISA_NS isa_avx512
#define PYECCV_VEC_BYTES 64
#define PYECCV_VEC_REGS 32
#elif PYECCV_ISA_VARIANT == 1
#define PYECCV_ISA_NS isa_avx2
#define PYECCV_VEC_BYTES 32
#define PYECCV_VEC_REGS 16
#else
#define PYECCV_ISA_NS isa_baseline
#define PYECCV_VEC_BYTES 16
#if defined(__aarch64__)
#define PYECCV_VEC_REGS 32
#else
#define PYECCV_VEC_REGS 16
#endif
#endif

#if defined(PYECCV_ISA_MULTI) && PYECCV_ISA_VARIANT == 2
#define PYECCV_ISA_PRAGMA _Pragma("GCC push_options") _Pragma("GCC target(\"arch=x86-64-v4\")")
#define PYECCV_ISA_POP _Pragma("GCC pop_options")
#elif defined(PYECCV_ISA_MULTI) && PYECCV_ISA_VARIANT == 1
#define PYECCV_ISA_PRAGMA _Pragma("GCC push_options") _Pragma("GCC target(\"arch=x86-64-v3\")")
#define PYECCV_ISA_POP _Pragma("GCC pop_options")
#else
#define PYECCV_ISA_PRAGMA
#define PYECCV_ISA_POP
#endif

#define PYECCV_ISA_BEGIN PYECCV_ISA_PRAGMA namespace pyeccv { namespace PYECCV_ISA_NS {
#define PYECCV_ISA_END } } PYECCV_ISA_POP

namespace pyeccv {
// Testing only: restrict the variants this process treats as supported by the CPU (bit v set =
// variant v allowed), so "asking for an ISA the CPU lacks" can be tested on any machine.
void restrict_cpu_isas_for_testing(unsigned mask);
}  // namespace pyeccv
