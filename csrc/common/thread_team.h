// ThreadTeam: a team of std::threads that runs a team-written solver the way a CUDA thread
// block does (strided ownership, barriers, all-reduce through shared slots). Test-only: it
// lets the CPU test suite exercise the GPU algorithm's synchronisation without a GPU.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>

namespace pyeccv {

struct ThreadTeamShared {
  explicit ThreadTeamShared(int n) : size(n) {}
  int size;
  std::mutex mu;
  std::condition_variable cv;
  int waiting = 0;
  uint64_t generation = 0;
  alignas(16) unsigned char slots[64][64];

  void wait() {
    std::unique_lock<std::mutex> lock(mu);
    const uint64_t gen = generation;
    if (++waiting == size) {
      waiting = 0;
      ++generation;
      cv.notify_all();
    } else {
      cv.wait(lock, [&] { return generation != gen; });
    }
  }
};

struct ThreadTeam {
  static constexpr bool kSerial = false;
  ThreadTeam(ThreadTeamShared* s, int t) : sh(s), tid(t) {}
  ThreadTeamShared* sh;
  int tid;

  bool leader() const { return tid == 0; }
  bool owns(int64_t j) const { return j % sh->size == tid; }
  template <class I, class F>
  void for_range(I n, F&& f) const {
    for (I j = tid; j < n; j += sh->size) f(j);
  }
  void sync() const { sh->wait(); }
  template <class R, class Op>
  R reduce(const R& local, Op&& op) const {
    static_assert(std::is_trivially_copyable<R>::value && sizeof(R) <= 64, "reduce: small POD only");
    std::memcpy(sh->slots[tid], &local, sizeof(R));
    sh->wait();
    R acc;
    std::memcpy(&acc, sh->slots[0], sizeof(R));
    for (int k = 1; k < sh->size; ++k) {
      R x;
      std::memcpy(&x, sh->slots[k], sizeof(R));
      acc = op(acc, x);
    }
    sh->wait();  // nobody overwrites a slot before everyone has read them all
    return acc;
  }
};

}  // namespace pyeccv
