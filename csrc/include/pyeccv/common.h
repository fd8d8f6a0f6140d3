// pyeccv: torch-free C++ core. Shared types for every core's header.
// Plain pointers, sizes in elements, and an opaque stream (cudaStream_t passed as void*),
// so any framework can call the kernels.
#pragma once
#include <cstddef>
#include <cstdint>

namespace pyeccv {

enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// True when this build of the core contains CUDA kernels.
bool cuda_compiled();
// Human-readable build facts (compiler, OpenMP, CUDA architectures).
const char* build_info();

// ---- CPU instruction-set variants ----
// The vectorised CPU kernels are compiled once per variant: "avx512" (x86-64-v4), "avx2"
// (x86-64-v3: AVX2 + FMA), "baseline" (x86-64 SSE2; NEON on aarch64). One variant serves every
// kernel call of the process: the best one the CPU supports, unless the environment variable
// PYECCV_CPU_ISA (auto | avx512 | avx2 | baseline, read at the first kernel call) or
// set_cpu_isa() says otherwise. Kernels without vector code (the LSAP solver) have one variant.
#define PYECCV_HAS_CPU_ISA_API 1
// The variant in use ("avx512", "avx2" or "baseline"); resolves PYECCV_CPU_ISA on first use and
// throws std::invalid_argument when it names an unknown variant or one this CPU / build lacks.
const char* cpu_isa_name();
// Select the variant: "auto" (the best supported) or a name; throws std::invalid_argument (naming
// the variant, the CPU's support and the choices) when unknown, not compiled in or not supported.
void set_cpu_isa(const char* name);
// The variants compiled into this build that this CPU runs, best first, comma-separated.
const char* cpu_isas_available();
// The variants compiled into this build, best first, comma-separated.
const char* cpu_isas_compiled();
// The CPU's model name (cpuid brand string on x86, /proc/cpuinfo elsewhere; "unknown" if neither).
const char* cpu_model();

}  // namespace pyeccv
