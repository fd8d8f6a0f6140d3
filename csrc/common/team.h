// Teams: the execution model the shared solvers are written against.
//
// A solver is written once, as straight-line code over a "team" of workers that all run it:
//   for_range(n, f)   every index in [0, n) is visited by exactly one worker, always the same
//                     one for the same index ("owner"), so per-index state needs no barrier
//                     when only its owner touches it;
//   reduce(x, op)     every worker contributes x; every worker gets op over all of them;
//   leader()          exactly one worker (used for single-element writes);
//   sync()            barrier + memory fence.
// SerialTeam is one worker (the CPU path). The CUDA path is a thread block (csrc/cuda/);
// ThreadTeam (csrc/cpu/) is several std::threads, used by tests to exercise the block
// algorithm's synchronisation on a machine without a GPU.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define PYECCV_HD __host__ __device__ __forceinline__
#else
#define PYECCV_HD inline
#endif

namespace pyeccv {

struct SerialTeam {
  static constexpr bool kSerial = true;
  PYECCV_HD bool leader() const { return true; }
  PYECCV_HD bool owns(int64_t) const { return true; }
  template <class I, class F>
  PYECCV_HD void for_range(I n, F&& f) const {
    for (I j = 0; j < n; ++j) f(j);
  }
  PYECCV_HD void sync() const {}
  template <class R, class Op>
  PYECCV_HD R reduce(const R& local, Op&&) const {
    return local;
  }
};

}  // namespace pyeccv
