// CUDA batched linear sum assignment: the shared solver (common/lsap_solver.h) run by a team of
// GPU threads per problem, cooperating on every column scan and every arg-min:
//   WarpTeam  one warp per problem, several problems per block: reductions are shuffles only,
//             barriers are __syncwarp, so each step of a search costs little latency. Used for
//             DETR-sized problems (the smaller side a few hundred, the larger up to ~1000).
//   BlockTeam one block per problem (up to 512 threads): reductions are shuffles plus one slot per
//             warp. Used for large problems, where the column scans dominate.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "common/lsap_solver.h"
#include "pyeccv/hungarian.h"

namespace pyeccv {
namespace {

constexpr int kSlotBytes = 64;
constexpr int kMaxWarps = 32;
constexpr int kReduceBytes = kSlotBytes * kMaxWarps;

// Shuffles a small trivially-copyable struct word by word (down: tree reduction; xor: butterfly).
template <bool kXor, class R>
__device__ __forceinline__ R shfl(const R& v, int arg) {
  constexpr int kWords = (sizeof(R) + 3) / 4;
  int w[kWords];
  memcpy(w, &v, sizeof(R));
#pragma unroll
  for (int k = 0; k < kWords; ++k)
    w[k] = kXor ? __shfl_xor_sync(0xffffffffu, w[k], arg) : __shfl_down_sync(0xffffffffu, w[k], arg);
  R out;
  memcpy(&out, w, sizeof(R));
  return out;
}

struct WarpTeam {
  static constexpr bool kSerial = false;
  __device__ int lane() const { return threadIdx.x & 31; }
  __device__ bool leader() const { return lane() == 0; }
  __device__ bool owns(int64_t j) const { return (j & 31) == lane(); }
  template <class I, class F>
  __device__ void for_range(I n, F&& f) const {
    for (I j = lane(); j < n; j += 32) f(j);
  }
  __device__ void sync() const { __syncwarp(); }
  // Butterfly: every lane ends with the full result (op is commutative and associative).
  template <class R, class Op>
  __device__ R reduce(const R& local, Op&& op) const {
    R v = local;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = op(v, shfl<true>(v, off));
    __syncwarp();  // a reduction is also a barrier (the solver relies on it)
    return v;
  }
};

struct BlockTeam {
  static constexpr bool kSerial = false;
  unsigned char* red;  // kReduceBytes of shared memory

  __device__ bool leader() const { return threadIdx.x == 0; }
  __device__ bool owns(int64_t j) const { return j % blockDim.x == threadIdx.x; }
  template <class I, class F>
  __device__ void for_range(I n, F&& f) const {
    for (I j = threadIdx.x; j < n; j += blockDim.x) f(j);
  }
  __device__ void sync() const { __syncthreads(); }
  // blockDim.x is a multiple of 32, so every lane of every warp takes part.
  template <class R, class Op>
  __device__ R reduce(const R& local, Op&& op) const {
    static_assert(sizeof(R) <= kSlotBytes, "reduce: value too large");
    R v = local;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = op(v, shfl<false>(v, off));
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) memcpy(red + warp * kSlotBytes, &v, sizeof(R));
    __syncthreads();
    R acc;
    memcpy(&acc, red, sizeof(R));
    const int nw = blockDim.x >> 5;
    for (int w = 1; w < nw; ++w) {
      R x;
      memcpy(&x, red + w * kSlotBytes, sizeof(R));
      acc = op(acc, x);
    }
    __syncthreads();  // slots are reused by the next reduction
    return acc;
  }
};

int64_t round16(int64_t x) { return (x + 15) / 16 * 16; }

struct Layout {
  int64_t n_max, m_max, cost_bytes, state_bytes, per_problem;
};

Layout layout(const LsapProblem& p) {
  Layout l;
  l.n_max = std::min(p.rows, p.cols);
  l.m_max = std::max(p.rows, p.cols);
  const int64_t es = p.dtype == DType::kFloat64 ? 8 : 4;
  l.cost_bytes = round16(l.n_max * l.m_max * es);
  l.state_bytes = lsap::state_bytes(l.n_max, l.m_max);
  l.per_problem = l.cost_bytes + l.state_bytes;
  return l;
}

template <class T>
__global__ void lsap_kernel(LsapProblem p, unsigned char* ws, int64_t per_problem, int64_t cost_bytes,
                            int state_in_smem) {
  extern __shared__ __align__(16) unsigned char smem[];
  const BlockTeam team{smem};
  const int64_t b = blockIdx.x;
  unsigned char* mine = ws + b * per_problem;
  void* state = state_in_smem ? static_cast<void*>(smem + kReduceBytes) : static_cast<void*>(mine + cost_bytes);
  lsap::solve_problem(team, p, b, reinterpret_cast<T*>(mine), state);
}

// One warp per problem, `warps` problems per block; state in shared memory (one slice per warp)
// unless it does not fit.
template <class T>
__global__ void lsap_warp_kernel(LsapProblem p, unsigned char* ws, int64_t per_problem, int64_t cost_bytes,
                                 int64_t state_bytes, int state_in_smem) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int w = threadIdx.x >> 5;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + w;
  if (b >= p.batch) return;  // whole warps leave; warp teams never use block barriers
  const WarpTeam team;
  unsigned char* mine = ws + b * per_problem;
  void* state = state_in_smem ? static_cast<void*>(smem + w * state_bytes) : static_cast<void*>(mine + cost_bytes);
  lsap::solve_problem(team, p, b, reinterpret_cast<T*>(mine), state);
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("pyeccv lsap_cuda: ") + what + ": " + cudaGetErrorString(e));
}

// Our CUDA runtime is linked statically, so its current device is not the caller's: set the
// device that owns the stream for the duration of the call.
struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int dev) {
    check(cudaGetDevice(&prev), "cudaGetDevice");
    if (prev != dev) check(cudaSetDevice(dev), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev && prev >= 0) cudaSetDevice(prev);
  }
};

template <class T>
void launch(const LsapProblem& p, unsigned char* ws, int dev, cudaStream_t stream) {
  const Layout l = layout(p);
  int optin = 0;
  check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "cudaDeviceGetAttribute");
  // Test / tuning knobs: PYECCV_LSAP_GLOBAL_STATE=1 keeps the state in global memory (the path
  // of huge problems); PYECCV_LSAP_TEAM=warp|block overrides the team choice.
  const char* force_global = std::getenv("PYECCV_LSAP_GLOBAL_STATE");
  const bool global_state = force_global != nullptr && force_global[0] == '1';
  const char* team_env = std::getenv("PYECCV_LSAP_TEAM");
  bool warp = l.m_max <= 1024 && l.n_max * l.m_max <= 262144;
  if (team_env != nullptr && std::string(team_env) == "warp") warp = true;
  if (team_env != nullptr && std::string(team_env) == "block") warp = false;

  if (warp) {
    int warps = 4;
    int state_in_smem = 1;
    int64_t smem = warps * l.state_bytes;
    while (warps > 1 && smem > optin) smem = --warps * l.state_bytes;
    if (smem > optin || global_state) {
      warps = 4;
      smem = 0;
      state_in_smem = 0;
    }
    auto kernel = lsap_warp_kernel<T>;
    if (smem > 48 * 1024)
      check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
            "cudaFuncSetAttribute");
    const int64_t blocks = (p.batch + warps - 1) / warps;
    kernel<<<static_cast<unsigned>(blocks), 32 * warps, static_cast<size_t>(smem), stream>>>(
        p, ws, l.per_problem, l.cost_bytes, l.state_bytes, state_in_smem);
    check(cudaGetLastError(), "kernel launch");
    return;
  }

  // Block team: about four columns per thread.
  const int threads = static_cast<int>(std::min<int64_t>(512, std::max<int64_t>(32, (l.m_max / 4 + 31) / 32 * 32)));
  int64_t smem = kReduceBytes + l.state_bytes;
  int state_in_smem = 1;
  if (smem > optin || global_state) {  // very large problems keep their state in global memory (L2)
    smem = kReduceBytes;
    state_in_smem = 0;
  }
  auto kernel = lsap_kernel<T>;
  if (smem > 48 * 1024)
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
          "cudaFuncSetAttribute");
  kernel<<<static_cast<unsigned>(p.batch), threads, static_cast<size_t>(smem), stream>>>(p, ws, l.per_problem,
                                                                                        l.cost_bytes, state_in_smem);
  check(cudaGetLastError(), "kernel launch");
}

}  // namespace

bool cuda_compiled() { return true; }

size_t lsap_cuda_workspace_bytes(const LsapProblem& p) {
  if (p.batch <= 0 || p.rows <= 0 || p.cols <= 0) return 0;
  return static_cast<size_t>(layout(p).per_problem * p.batch);
}

void lsap_cuda(const LsapProblem& p, void* workspace, size_t workspace_bytes, int device, void* stream) {
  if (p.batch < 0 || p.rows < 0 || p.cols < 0) throw std::invalid_argument("lsap_cuda: negative size");
  if (p.rows > INT32_MAX / 4 || p.cols > INT32_MAX / 4)
    throw std::invalid_argument("lsap_cuda: rows and cols must be < 2^29");
  if (p.batch == 0) return;
  if (p.status == nullptr) throw std::invalid_argument("lsap_cuda: status must not be null");
  if (p.rows > 0 && p.col_for_row == nullptr) throw std::invalid_argument("lsap_cuda: col_for_row must not be null");
  if (p.batch > 65535LL * 32768LL) throw std::invalid_argument("lsap_cuda: batch too large");
  if (workspace_bytes < lsap_cuda_workspace_bytes(p)) throw std::invalid_argument("lsap_cuda: workspace too small");
  auto* ws = static_cast<unsigned char*>(workspace);
  auto s = static_cast<cudaStream_t>(stream);
  DeviceGuard guard(device);
  if (p.dtype == DType::kFloat64) launch<double>(p, ws, device, s);
  else if (p.dtype == DType::kFloat32) launch<float>(p, ws, device, s);
  else throw std::invalid_argument("lsap_cuda: dtype must be float32 or float64");
}

}  // namespace pyeccv
