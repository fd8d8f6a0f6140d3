// CPU instruction-set dispatch: every public entry point of a vectorised kernel source forwards to
// the variant chosen once per process (PYECCV_CPU_ISA / set_cpu_isa / the best the CPU supports).
// Compiled at the baseline target itself (it must run on every CPU to decide).
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/isa.h"
#include "pyeccv/common.h"
#include "pyeccv/cond_mask_head.h"
#include "pyeccv/dyn_group_conv.h"
#include "pyeccv/grad_central.h"
#include "pyeccv/hungarian.h"
#include "pyeccv/smooth_ap.h"
#include "pyeccv/volume_render.h"

#if defined(PYECCV_ISA_MULTI) && (defined(__x86_64__) || defined(_M_X64))
#include <cpuid.h>
#define PYECCV_X86_DISPATCH 1
#endif

// X(return type, name, parameters, arguments): the entry points defined in the vector sources.
#define PYECCV_ISA_ENTRY_POINTS(X)                                                                          \
  X(void, detr_cost_cpu, (const DetrCostProblem& p, int nt), (p, nt))                                      \
  X(void, smooth_ap_forward_cpu, (const SmoothApProblem& p, void* ap, int nt), (p, ap, nt))                \
  X(void, smooth_ap_backward_cpu, (const SmoothApProblem& p, const void* g, void* dsim, int nt),            \
    (p, g, dsim, nt))                                                                                        \
  X(void, gc_sgd_cpu, (const GcTensorRef* t, int64_t n, DType dt, const GcSgdHyper& h, int nt),            \
    (t, n, dt, h, nt))                                                                                       \
  X(void, gc_adam_cpu, (const GcTensorRef* t, int64_t n, DType dt, const GcAdamHyper& h, int nt),          \
    (t, n, dt, h, nt))                                                                                       \
  X(bool, vr_forward_cpu,                                                                                    \
    (const VolumeRenderProblem& p, const void* rgbs, const void* bg, bool bpr, void* rgb, void* op,        \
     void* depth, void* w, int nt),                                                                          \
    (p, rgbs, bg, bpr, rgb, op, depth, w, nt))                                                               \
  X(void, vr_backward_cpu,                                                                                   \
    (const VolumeRenderProblem& p, const void* rgbs, const void* bg, bool bpr, const void* g_rgb,          \
     const void* g_op, const void* g_depth, const void* g_w, void* d_values, void* d_rgbs, void* d_bg,      \
     int nt),                                                                                                \
    (p, rgbs, bg, bpr, g_rgb, g_op, g_depth, g_w, d_values, d_rgbs, d_bg, nt))                               \
  X(int64_t, vr_check_packed, (const int64_t* pi, int64_t rays, int64_t samples, bool* in_order, bool* cov), \
    (pi, rays, samples, in_order, cov))                                                                      \
  X(bool, render_weights_cpu, (const VolumeRenderProblem& p, void* w, void* tr, void* al, int nt),          \
    (p, w, tr, al, nt))                                                                                      \
  X(void, render_weights_backward_cpu,                                                                       \
    (const VolumeRenderProblem& p, const void* gw, const void* gt, const void* ga, void* dv, int nt),       \
    (p, gw, gt, ga, dv, nt))                                                                                 \
  X(int64_t, cmh_num_params, (int64_t c, int ch, int layers, bool rel), (c, ch, layers, rel))               \
  X(void, cmh_forward_cpu, (const CondMaskHeadProblem& p, void* out, int nt), (p, out, nt))                 \
  X(void, cmh_backward_cpu,                                                                                  \
    (const CondMaskHeadProblem& p, const void* g, void* d_feats, void* d_params, int nt),                   \
    (p, g, d_feats, d_params, nt))                                                                           \
  X(int64_t, dgc_out_size, (int64_t s, int64_t k, int64_t st, int64_t pad, int64_t dil), (s, k, st, pad, dil)) \
  X(void, dgc_forward_cpu, (const DynGroupConvProblem& p, void* out, int nt), (p, out, nt))                 \
  X(void, dgc_backward_cpu,                                                                                  \
    (const DynGroupConvProblem& p, const void* g, void* dx, void* dw, void* ds, int nt), (p, g, dx, dw, ds, nt))

namespace pyeccv {

#define PYECCV_DECLARE(R, NAME, PARAMS, ARGS) R NAME PARAMS;
namespace isa_baseline {
PYECCV_ISA_ENTRY_POINTS(PYECCV_DECLARE)
}
#ifdef PYECCV_X86_DISPATCH
namespace isa_avx2 {
PYECCV_ISA_ENTRY_POINTS(PYECCV_DECLARE)
}
namespace isa_avx512 {
PYECCV_ISA_ENTRY_POINTS(PYECCV_DECLARE)
}
#endif
#undef PYECCV_DECLARE

namespace {

constexpr const char* kNames[3] = {"baseline", "avx2", "avx512"};
#ifdef PYECCV_X86_DISPATCH
constexpr unsigned kCompiled = 0b111;
#else
constexpr unsigned kCompiled = 0b001;
#endif

std::atomic<unsigned> g_test_mask{0b111};
std::atomic<int> g_isa{-1};  // -1: not resolved yet
std::mutex g_mutex;

unsigned cpu_mask() {
  unsigned m = 0b001;
#ifdef PYECCV_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v3")) m |= 0b010;  // checks OS support of the AVX state too
  if (__builtin_cpu_supports("x86-64-v4")) m |= 0b100;
#endif
  return m & kCompiled & g_test_mask.load();
}

std::string list(unsigned m) {
  std::string s;
  for (int v = 2; v >= 0; --v)
    if (m & (1u << v)) s += (s.empty() ? "" : ", ") + std::string(kNames[v]);
  return s;
}

int best(unsigned m) { return m & 0b100 ? 2 : m & 0b010 ? 1 : 0; }

// The variant a name asks for, or throws.
int parse(const char* name, const char* origin) {
  const std::string n = name ? name : "auto";
  const unsigned avail = cpu_mask();
  if (n.empty() || n == "auto") return best(avail);
  for (int v = 0; v < 3; ++v) {
    if (n != kNames[v]) continue;
    if (!(kCompiled & (1u << v)))
      throw std::invalid_argument(std::string(origin) + "=" + n + ": this build of pyeccv has no " + n +
                                  " variant (compiled: " + list(kCompiled) + ")");
    if (!(avail & (1u << v)))
      throw std::invalid_argument(std::string(origin) + "=" + n + ": this CPU (" + cpu_model() +
                                  ") does not support " + n + "; it supports: " + list(avail));
    return v;
  }
  throw std::invalid_argument(std::string(origin) + "=" + n +
                              ": expected one of auto, avx512, avx2, baseline");
}

inline int active() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v >= 0) return v;
  std::lock_guard<std::mutex> lock(g_mutex);
  v = g_isa.load();
  if (v < 0) {
    v = parse(std::getenv("PYECCV_CPU_ISA"), "PYECCV_CPU_ISA");
    g_isa.store(v);
  }
  return v;
}

}  // namespace

void restrict_cpu_isas_for_testing(unsigned mask) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_test_mask.store((mask & 0b111) | 0b001);
  const int v = g_isa.load();
  if (v >= 0 && !(cpu_mask() & (1u << v))) g_isa.store(best(cpu_mask()));
}

const char* cpu_isa_name() { return kNames[active()]; }

void set_cpu_isa(const char* name) {
  const int v = parse(name, "cpu isa");
  std::lock_guard<std::mutex> lock(g_mutex);
  g_isa.store(v);
}

const char* cpu_isas_available() {
  thread_local std::string s;
  s = list(cpu_mask());
  return s.c_str();
}

const char* cpu_isas_compiled() {
  static const std::string s = list(kCompiled);
  return s.c_str();
}

const char* cpu_model() {
  static const std::string model = [] {
    std::string m;
#ifdef PYECCV_X86_DISPATCH
    unsigned r[12] = {0};
    if (__get_cpuid_max(0x80000000u, nullptr) >= 0x80000004u) {
      for (unsigned i = 0; i < 3; ++i) __get_cpuid(0x80000002u + i, &r[4 * i], &r[4 * i + 1], &r[4 * i + 2], &r[4 * i + 3]);
      m.assign(reinterpret_cast<const char*>(r), 48);
      m = m.c_str();  // up to the first NUL
    }
#else
    if (FILE* f = std::fopen("/proc/cpuinfo", "r")) {
      char line[512];
      while (std::fgets(line, sizeof line, f)) {
        const char* keys[] = {"model name", "Model", "CPU part", "Hardware"};
        for (const char* k : keys)
          if (std::strncmp(line, k, std::strlen(k)) == 0 && std::strchr(line, ':') && m.empty()) {
            m = std::strchr(line, ':') + 1;
          }
      }
      std::fclose(f);
    }
#endif
    const auto a = m.find_first_not_of(" \t\n"), b = m.find_last_not_of(" \t\n");
    m = a == std::string::npos ? std::string("unknown") : m.substr(a, b - a + 1);
    return m;
  }();
  return model.c_str();
}

#ifdef PYECCV_X86_DISPATCH
#define PYECCV_DEFINE(R, NAME, PARAMS, ARGS)   \
  R NAME PARAMS {                              \
    switch (active()) {                        \
      case 2: return isa_avx512::NAME ARGS;    \
      case 1: return isa_avx2::NAME ARGS;      \
      default: return isa_baseline::NAME ARGS; \
    }                                          \
  }
#else
#define PYECCV_DEFINE(R, NAME, PARAMS, ARGS) \
  R NAME PARAMS {                            \
    (void)active();                          \
    return isa_baseline::NAME ARGS;          \
  }
#endif
PYECCV_ISA_ENTRY_POINTS(PYECCV_DEFINE)
#undef PYECCV_DEFINE

// Each forwarder must have the header's exact signature (else it would be a silent new overload
// and the header's function an undefined symbol at import).
#define PYECCV_CHECK(R, NAME, PARAMS, ARGS) \
  static_assert(std::is_same<decltype(&::pyeccv::NAME), R(*) PARAMS>::value, #NAME ": signature differs from its header");
PYECCV_ISA_ENTRY_POINTS(PYECCV_CHECK)
#undef PYECCV_CHECK

}  // namespace pyeccv
