// CPU batched linear sum assignment: the shared solver (common/lsap_solver.h) on a SerialTeam,
// OpenMP across the problems of a batch.
#include <algorithm>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common/lsap_solver.h"
#include "common/thread_team.h"
#include "pyeccv/hungarian.h"

#ifdef PYECCV_HAS_OPENMP
#include <omp.h>
#endif

namespace pyeccv {
namespace {

void check_problem(const LsapProblem& p) {
  if (p.batch < 0 || p.rows < 0 || p.cols < 0)
    throw std::invalid_argument("lsap: batch, rows and cols must be >= 0");
  if (p.rows > INT32_MAX / 4 || p.cols > INT32_MAX / 4)
    throw std::invalid_argument("lsap: rows and cols must be < 2^29");
  const bool empty = p.batch == 0 || p.rows == 0;
  if (!empty && (p.col_for_row == nullptr))
    throw std::invalid_argument("lsap: col_for_row must not be null");
  if (p.batch > 0 && p.status == nullptr) throw std::invalid_argument("lsap: status must not be null");
  if (p.batch > 0 && p.rows > 0 && p.cols > 0 && p.cost == nullptr)
    throw std::invalid_argument("lsap: cost must not be null");
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat64)
    throw std::invalid_argument("lsap: dtype must be float32 or float64");
}

// Uninitialised, reusable buffers: the solver writes before it reads, so no zero-filling.
struct Buffer {
  std::unique_ptr<unsigned char[]> data;
  size_t cap = 0;
  unsigned char* get(size_t n) {
    if (n > cap) {
      data.reset(new unsigned char[n]);
      cap = n;
    }
    return data.get();
  }
  void trim(size_t keep) {
    if (cap > keep) {
      data.reset();
      cap = 0;
    }
  }
};

struct Scratch {
  Buffer cost;   // n x m copy of the problem
  Buffer state;  // lsap::State
  unsigned char* cost_ptr = nullptr;
  unsigned char* state_ptr = nullptr;
};

void reserve(const LsapProblem& p, Scratch& s) {
  const int64_t n = std::min(p.rows, p.cols), m = std::max(p.rows, p.cols);
  const int64_t esize = p.dtype == DType::kFloat64 ? 8 : 4;
  s.cost_ptr = s.cost.get(static_cast<size_t>(std::max<int64_t>(16, n * m * esize)));
  s.state_ptr = s.state.get(static_cast<size_t>(lsap::state_bytes(n, m)) + 16);
}

// Scratch kept per thread between calls (small problems pay no allocation); large buffers
// are released after the call.
Scratch& thread_scratch() {
  thread_local Scratch s;
  return s;
}
void trim(Scratch& s) {
  constexpr size_t kKeep = size_t(16) << 20;  // e.g. a 2000 x 2000 float32 problem
  s.cost.trim(kKeep);
  s.state.trim(kKeep);
}

template <class T>
void run_serial(const LsapProblem& p) {
  const SerialTeam team;
  Scratch& scratch = thread_scratch();
  reserve(p, scratch);
  for (int64_t b = 0; b < p.batch; ++b)
    lsap::solve_problem<SerialTeam, T>(team, p, b, reinterpret_cast<T*>(scratch.cost_ptr), scratch.state_ptr);
  trim(scratch);
}

template <class T>
void run_cpu(const LsapProblem& p, int num_threads) {
#ifdef PYECCV_HAS_OPENMP
  if (num_threads <= 0) num_threads = omp_get_max_threads();
  num_threads = static_cast<int>(std::min<int64_t>(num_threads, p.batch));
  if (num_threads <= 1) return run_serial<T>(p);
#pragma omp parallel num_threads(num_threads)
  {
    const SerialTeam team;
    Scratch& scratch = thread_scratch();
    reserve(p, scratch);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < p.batch; ++b)
      lsap::solve_problem<SerialTeam, T>(team, p, b, reinterpret_cast<T*>(scratch.cost_ptr), scratch.state_ptr);
    trim(scratch);
  }
#else
  (void)num_threads;
  run_serial<T>(p);
#endif
}

template <class T>
void run_threaded_team(const LsapProblem& p, int team_size) {
  Scratch scratch;
  reserve(p, scratch);
  ThreadTeamShared shared(team_size);
  std::vector<std::thread> workers;
  for (int tid = 0; tid < team_size; ++tid) {
    workers.emplace_back([&, tid] {
      const ThreadTeam team(&shared, tid);
      for (int64_t b = 0; b < p.batch; ++b) {
        lsap::solve_problem<ThreadTeam, T>(team, p, b, reinterpret_cast<T*>(scratch.cost_ptr), scratch.state_ptr);
        team.sync();
      }
    });
  }
  for (auto& w : workers) w.join();
}

}  // namespace

void lsap_cpu(const LsapProblem& p, int num_threads) {
  check_problem(p);
  if (p.batch == 0) return;
  if (p.dtype == DType::kFloat64) run_cpu<double>(p, num_threads);
  else run_cpu<float>(p, num_threads);
}

void lsap_cpu_threaded_team(const LsapProblem& p, int team_size) {
  check_problem(p);
  if (team_size < 1 || team_size > 64) throw std::invalid_argument("lsap: team_size must be in [1, 64]");
  if (p.batch == 0) return;
  if (p.dtype == DType::kFloat64) run_threaded_team<double>(p, team_size);
  else run_threaded_team<float>(p, team_size);
}

}  // namespace pyeccv

#ifndef PYECCV_HAS_CUDA
namespace pyeccv {
size_t lsap_cuda_workspace_bytes(const LsapProblem&) { return 0; }
void lsap_cuda(const LsapProblem&, void*, size_t, int, void*) {
  throw std::runtime_error("pyeccv was built without CUDA kernels (no nvcc at build time)");
}
}  // namespace pyeccv
#endif
