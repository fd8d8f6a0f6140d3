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

}  // namespace pyeccv
