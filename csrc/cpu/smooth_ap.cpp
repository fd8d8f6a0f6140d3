// CPU Smooth-AP: one query at a time (OpenMP over queries), one pass over the similarity row per
// positive. The per-query work is branch-free vectorised loops (vmath::exp), compiled for
// AVX-512 / AVX2 / baseline (common/isa.h) and picked at run time (cpu/isa.cpp, PYECCV_CPU_ISA).
#include <algorithm>
#include <stdexcept>
#include <vector>

#include "common/isa.h"
#include "common/vmath.h"
#include "pyeccv/smooth_ap.h"

#ifdef PYECCV_HAS_OPENMP
#include <omp.h>
#endif

PYECCV_ISA_BEGIN
namespace {

void check(const SmoothApProblem& p) {
  if (p.queries < 0 || p.items < 0) throw std::invalid_argument("smooth_ap: sizes must be >= 0");
  if (!(p.temperature > 0)) throw std::invalid_argument("smooth_ap: temperature must be > 0");
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat64)
    throw std::invalid_argument("smooth_ap: dtype must be float32 or float64");
}

template <class T>
struct Scratch {
  std::vector<int64_t> js;  // the positives that count
  std::vector<T> sj, alpha, beta, self_term, acc;
};

// The positives of query q that count (the query's own item dropped in the paper formulation).
template <class T>
int64_t positives(const SmoothApProblem& p, int64_t q, const T* s, Scratch<T>& w) {
  const int64_t self = p.query_item[q];
  w.js.clear();
  w.sj.clear();
  for (int64_t a = 0; a < p.pos_count[q]; ++a) {
    const int64_t j = p.perm[p.pos_start[q] + a];
    if (p.paper && j == self) continue;
    w.js.push_back(j);
    w.sj.push_back(s[j]);
  }
  return static_cast<int64_t>(w.js.size());
}

// sigma(d) and d sigma / d d, as the official autograd graph: zero slope where the exponent
// -d / tau is clamped. Branch-free values (no out-parameters: GCC then keeps the loops around
// these vectorisable).
template <class T>
struct SigSlope {
  T sg, slope;
};
template <class T>
PYECCV_INLINE SigSlope<T> sig(T d, T inv_tau) {
  const T e = -d * inv_tau;
  const T ec = std::min(std::max(e, T(-50)), T(50));
  const T sg = T(1) / (T(1) + vmath::exp(ec));
  // e == ec: not clamped. A multiply by the comparison, not a select: without AVX-512 masks GCC
  // made the select a branch and the gradient loop stayed scalar on avx2 / baseline
  return {sg, static_cast<T>(e == ec) * (sg * (T(1) - sg) * inv_tau)};
}

// 1 if item k is in Omega \ {j}, else 0. `excluded` is the query's own item in the paper
// formulation and -1 otherwise. Written as a product of two compares: GCC vectorises this form,
// not `(k != j) & (k != excluded)` nor a bool flag test (measured: 0.75 vs 6.5 ns an element).
template <class T>
PYECCV_INLINE T in_omega(int64_t k, int64_t j, int64_t excluded) {
  return static_cast<T>(k != j) * static_cast<T>(k != excluded);
}

struct Sums {
  double a, b, ga, gb;
};

// Sums over the row for positive j: sigma and slope, over Omega \ {j} and P \ {j}.
template <class T, bool kSlopes>
PYECCV_INLINE Sums row_sums(const SmoothApProblem& p, const T* s, T sj, int64_t j, int64_t self, int64_t label) {
  const T inv_tau = static_cast<T>(1.0 / p.temperature);
  const int64_t n = p.items;
  const int64_t* lab = p.labels;
  const int64_t excluded = p.paper ? self : -1;
  T a = 0, b = 0, ga = 0, gb = 0;
#pragma omp simd reduction(+ : a, b, ga, gb)
  for (int64_t k = 0; k < n; ++k) {
    const SigSlope<T> v = sig(s[k] - sj, inv_tau);
    const T in_all = in_omega<T>(k, j, excluded);
    const T in_pos = static_cast<T>(lab[k] == label) * in_all;
    b += in_all * v.sg;
    a += in_pos * v.sg;
    if (kSlopes) {
      gb += in_all * v.slope;
      ga += in_pos * v.slope;
    }
  }
  return Sums{a, b, ga, gb};
}

template <class T>
PYECCV_INLINE T query_ap(const SmoothApProblem& p, int64_t q, Scratch<T>& w) {
  const T* s = static_cast<const T*>(p.sim) + q * p.ld;
  const int64_t self = p.query_item[q], label = p.labels[self];
  const int64_t np = positives(p, q, s, w);
  double total = 0;
  for (int64_t a = 0; a < np; ++a) {
    const Sums r = row_sums<T, false>(p, s, w.sj[a], w.js[a], self, label);
    total += (1.0 + r.a) / (1.0 + r.b);
  }
  return np ? static_cast<T>(total / static_cast<double>(np)) : T(0);
}

template <class T>
PYECCV_INLINE void query_grad(const SmoothApProblem& p, int64_t q, T grad_ap, T* out, Scratch<T>& w) {
  const T* s = static_cast<const T*>(p.sim) + q * p.ld;
  const int64_t self = p.query_item[q], label = p.labels[self];
  const int64_t np = positives(p, q, s, w);
  const int64_t n = p.items;
  if (np == 0) {
    std::fill(out, out + n, T(0));
    return;
  }
  // pass 1: per positive j, the ranks and their slopes:
  //   d (R_pos / R_all) = dR_pos / R_all - R_pos dR_all / R_all^2 =: alpha dR_pos - beta dR_all
  w.alpha.resize(np);
  w.beta.resize(np);
  w.self_term.resize(np);
  for (int64_t a = 0; a < np; ++a) {
    const Sums r = row_sums<T, true>(p, s, w.sj[a], w.js[a], self, label);
    const double ra = 1.0 + r.a, rb = 1.0 + r.b;
    w.alpha[a] = static_cast<T>(1.0 / rb);
    w.beta[a] = static_cast<T>(ra / (rb * rb));
    // s_j enters every term of its own ranks with a minus sign
    w.self_term[a] = static_cast<T>(-(1.0 / rb) * r.ga + (ra / (rb * rb)) * r.gb);
  }
  // pass 2: d ap / d s_k = sum_j (alpha_j [k in P] - beta_j [k in Omega]) slope(s_k - s_j), k != j
  w.acc.assign(static_cast<size_t>(n), T(0));
  T* acc = w.acc.data();
  const T inv_tau = static_cast<T>(1.0 / p.temperature);
  const int64_t* lab = p.labels;
  const int64_t excluded = p.paper ? self : -1;
  for (int64_t a = 0; a < np; ++a) {
    const T al = w.alpha[a], be = w.beta[a], sja = w.sj[a];
    const int64_t j = w.js[a];
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      const SigSlope<T> v = sig(s[k] - sja, inv_tau);
      const T in_all = in_omega<T>(k, j, excluded);
      const T in_pos = static_cast<T>(lab[k] == label) * in_all;
      acc[k] += (al * in_pos - be * in_all) * v.slope;
    }
  }
  for (int64_t a = 0; a < np; ++a) acc[w.js[a]] += w.self_term[a];
  const T c = grad_ap / static_cast<T>(np);
  for (int64_t k = 0; k < n; ++k) out[k] = c * acc[k];
}

float query_ap_f32(const SmoothApProblem& p, int64_t q, Scratch<float>& w) {
  return query_ap<float>(p, q, w);
}
void query_grad_f32(const SmoothApProblem& p, int64_t q, float g, float* out, Scratch<float>& w) {
  query_grad<float>(p, q, g, out, w);
}
double query_ap_f64(const SmoothApProblem& p, int64_t q, Scratch<double>& w) { return query_ap<double>(p, q, w); }
void query_grad_f64(const SmoothApProblem& p, int64_t q, double g, double* out, Scratch<double>& w) {
  query_grad<double>(p, q, g, out, w);
}

int threads_for(const SmoothApProblem& p, int num_threads) {
#ifdef PYECCV_HAS_OPENMP
  if (num_threads <= 0) num_threads = omp_get_max_threads();
#endif
  return p.queries * p.items < 4096 ? 1 : std::max(1, num_threads);
}

template <class T, class F>
void forward(const SmoothApProblem& p, T* ap, int num_threads, F per_query) {
#pragma omp parallel num_threads(threads_for(p, num_threads))
  {
    Scratch<T> w;
#pragma omp for schedule(dynamic, 4)
    for (int64_t q = 0; q < p.queries; ++q) ap[q] = per_query(p, q, w);
  }
}

template <class T, class F>
void backward(const SmoothApProblem& p, const T* grad_ap, T* dsim, int num_threads, F per_query) {
#pragma omp parallel num_threads(threads_for(p, num_threads))
  {
    Scratch<T> w;
#pragma omp for schedule(dynamic, 4)
    for (int64_t q = 0; q < p.queries; ++q) per_query(p, q, grad_ap[q], dsim + q * p.items, w);
  }
}

}  // namespace

void smooth_ap_forward_cpu(const SmoothApProblem& p, void* ap, int num_threads) {
  check(p);
  if (p.queries == 0) return;
  if (p.dtype == DType::kFloat64) forward(p, static_cast<double*>(ap), num_threads, query_ap_f64);
  else forward(p, static_cast<float*>(ap), num_threads, query_ap_f32);
}

void smooth_ap_backward_cpu(const SmoothApProblem& p, const void* grad_ap, void* dsim, int num_threads) {
  check(p);
  if (p.queries == 0 || p.items == 0) return;
  if (p.dtype == DType::kFloat64)
    backward(p, static_cast<const double*>(grad_ap), static_cast<double*>(dsim), num_threads, query_grad_f64);
  else
    backward(p, static_cast<const float*>(grad_ap), static_cast<float*>(dsim), num_threads, query_grad_f32);
}

PYECCV_ISA_END
