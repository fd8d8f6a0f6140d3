// CPU volume rendering on packed rays. OpenMP over chunks of rays (dynamic schedule, so rays of 0
// and of 1024 samples balance); per ray:
//   1. the running optical depth (the only serial dependence: four segments summed side by side),
//   2. one vector pass for the exponentials (T_i and alpha_i),
//   3. one vector pass for the compositing sums over the active samples.
// The backward recomputes 1-2, then runs one vector pass for dL/dw_i and d rgb, the suffix sums of
// g_j w_j from the ray's end (alpha input: the reverse recurrence of pyeccv/volume_render.h), and
// one vector pass for d sigma.
// Every sample of a ray is written (zeros past an early stop), so callers need not zero outputs.
// The file is compiled for AVX-512 / AVX2 / baseline (common/isa.h), picked at run time (cpu/isa.cpp).
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "common/isa.h"
#include "common/vmath.h"
#include "pyeccv/volume_render.h"

#ifdef PYECCV_HAS_OPENMP
#include <omp.h>
#endif

PYECCV_ISA_BEGIN
namespace {

// exp(-x); float: the polynomial on a clamped argument, 0 below -87 (where expf is denormal)
// (the zeroing is a multiply by the comparison, not a select: GCC turned the select into a branch
// without AVX-512 masks, and the loop then stayed scalar on avx2 and baseline)
PYECCV_INLINE float exp_neg(float x) {
  const float y = -x;
  const float e = vmath::exp(y > -87.0f ? y : -87.0f);
  return e * static_cast<float>(y > -87.0f);
}
PYECCV_INLINE double exp_neg(double x) { return vmath::exp(-x); }
// alpha = 1 - exp(-x) as -expm1(-x): full relative precision for small x (float: same clamp)
PYECCV_INLINE float alpha_of(float x) {
  const float y = -x;
  return -vmath::expm1(y > -87.0f ? y : -87.0f);
}
PYECCV_INLINE double alpha_of(double x) { return -vmath::expm1(-x); }

// Running sums along a ray are the only serial dependence. A plain loop waits one add latency
// (4 cycles) a sample; these split the ray into four segments summed side by side (four
// independent chains) and add each segment's offset afterwards in a vector pass.
// prefix: x[i] <- sum_{j<i} x_j; returns the total. suffix: x[i] <- sum_{j>i} x_j. In place.
template <class T>
PYECCV_INLINE T prefix_sum_excl(T* x, int64_t n) {
  if (n < 32) {
    T s = 0;
    for (int64_t i = 0; i < n; ++i) {
      const T v = x[i];
      x[i] = s;
      s += v;
    }
    return s;
  }
  const int64_t m = n / 4;
  T* x1 = x + m;
  T* x2 = x + 2 * m;
  T* x3 = x + 3 * m;
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (int64_t j = 0; j < m; ++j) {
    const T v0 = x[j], v1 = x1[j], v2 = x2[j], v3 = x3[j];
    x[j] = s0;
    x1[j] = s1;
    x2[j] = s2;
    x3[j] = s3;
    s0 += v0;
    s1 += v1;
    s2 += v2;
    s3 += v3;
  }
  for (int64_t i = 4 * m; i < n; ++i) {  // the rest of the last segment
    const T v = x[i];
    x[i] = s3;
    s3 += v;
  }
  const T c1 = s0, c2 = c1 + s1, c3 = c2 + s2;
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) {
    x1[j] += c1;
    x2[j] += c2;
  }
#pragma omp simd
  for (int64_t i = 3 * m; i < n; ++i) x[i] += c3;
  return c3 + s3;
}

template <class T>
PYECCV_INLINE void suffix_sum_excl(T* x, int64_t n) {
  if (n < 32) {
    T s = 0;
    for (int64_t i = n - 1; i >= 0; --i) {
      const T v = x[i];
      x[i] = s;
      s += v;
    }
    return;
  }
  // segment q (q < 3) is [n - (q + 1) m, n - q m); segment 3 is [0, n - 3 m)
  const int64_t m = n / 4;
  T* y0 = x + n - 1;
  T* y1 = y0 - m;
  T* y2 = y0 - 2 * m;
  T* y3 = y0 - 3 * m;
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (int64_t j = 0; j < m; ++j) {
    const T v0 = y0[-j], v1 = y1[-j], v2 = y2[-j], v3 = y3[-j];
    y0[-j] = s0;
    y1[-j] = s1;
    y2[-j] = s2;
    y3[-j] = s3;
    s0 += v0;
    s1 += v1;
    s2 += v2;
    s3 += v3;
  }
  for (int64_t i = n - 4 * m - 1; i >= 0; --i) {
    const T v = x[i];
    x[i] = s3;
    s3 += v;
  }
  const T c1 = s0, c2 = c1 + s1, c3 = c2 + s2;
  T* z1 = x + n - 2 * m;
  T* z2 = x + n - 3 * m;
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) {
    z1[j] += c1;
    z2[j] += c2;
  }
#pragma omp simd
  for (int64_t i = 0; i < n - 3 * m; ++i) x[i] += c3;
}

// Per-thread scratch, sized once for the longest ray.
template <class T>
struct Scratch {
  std::vector<T> a, tr, g;
  T min_dt = T(0);  // the smallest interval seen (forward passes check t_end >= t_start in passing)
  explicit Scratch(int64_t n) : a(static_cast<size_t>(n)), tr(static_cast<size_t>(n + 1)), g(static_cast<size_t>(n)) {}
};

// Everything one call needs, as typed pointers (null = absent).
template <class T>
struct Ctx {
  const VolumeRenderProblem* p;
  const T* val;
  const T* ts;
  const T* te;
  const T* rgbs;
  const T* bg;
  bool bg_per_ray;
  // forward outputs
  T* rgb;
  T* opacity;
  T* depth;
  T* weights;
  T* trans;   // render_weights only
  T* alphas;  // render_weights only
  // backward inputs / outputs
  const T* g_rgb;
  const T* g_opacity;
  const T* g_depth;
  const T* g_weights;
  const T* g_trans;
  const T* g_alphas;
  T* d_values;
  T* d_rgbs;
  T* d_bg;  // per ray; the shared (3,) case goes to bg_acc
  T* bg_acc;
};

// alpha_i (into a, or pointing at the input for alphas) and T_i (tr, n + 1 entries) of one ray;
// returns the number of active samples (T_i >= eps, up to the first one that is not).
template <class T>
PYECCV_INLINE int64_t load_ray(const Ctx<T>& c, int64_t s0, int64_t n, Scratch<T>& w, const T*& a_out) {
  T* tr = w.tr.data();
  if (c.p->is_alpha) {
    const T* a = c.val + s0;
    T t = T(1);
    for (int64_t i = 0; i < n; ++i) {
      tr[i] = t;
      t *= T(1) - a[i];
    }
    tr[n] = t;
    a_out = a;
  } else {
    T* a = w.a.data();
    const T* v = c.val + s0;
    const T* ts = c.ts + s0;
    const T* te = c.te + s0;
    T mn = w.min_dt;
#pragma omp simd reduction(min : mn)
    for (int64_t i = 0; i < n; ++i) {
      const T dt = te[i] - ts[i];
      a[i] = v[i] * dt;
      mn = dt < mn ? dt : mn;
    }
    w.min_dt = mn;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) tr[i] = a[i];
    tr[n] = prefix_sum_excl(tr, n);  // exclusive running sum of tau
#pragma omp simd
    for (int64_t i = 0; i <= n; ++i) tr[i] = exp_neg(tr[i]);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) a[i] = alpha_of(a[i]);
    a_out = a;
  }
  int64_t k = n;
  if (c.p->early_stop_eps > 0) {
    const T eps = static_cast<T>(c.p->early_stop_eps);
    for (k = 0; k < n && tr[k] >= eps; ++k) {
    }
  }
  return k;
}

template <class T, bool WRITE_W, bool HAS_T>
PYECCV_INLINE void forward_ray(const Ctx<T>& c, int64_t r, int64_t s0, int64_t n, Scratch<T>& w) {
  const T* a;
  const int64_t k = load_ray(c, s0, n, w, a);
  const T* tr = w.tr.data();
  const T* col = c.rgbs + 3 * s0;
  const T* ts = HAS_T ? c.ts + s0 : nullptr;
  const T* te = HAS_T ? c.te + s0 : nullptr;
  T* wo = WRITE_W ? c.weights + s0 : nullptr;
  T cr = 0, cg = 0, cb = 0, o = 0, d = 0;
#pragma omp simd reduction(+ : cr, cg, cb, o, d)
  for (int64_t i = 0; i < k; ++i) {
    const T wi = tr[i] * a[i];
    if (WRITE_W) wo[i] = wi;
    o += wi;
    cr += wi * col[3 * i];
    cg += wi * col[3 * i + 1];
    cb += wi * col[3 * i + 2];
    if (HAS_T) d += wi * (ts[i] + te[i]);
  }
  if (WRITE_W)
    for (int64_t i = k; i < n; ++i) wo[i] = T(0);
  T f0 = 0, f1 = 0, f2 = 0;
  if (c.bg) {  // the background's weight 1 - opacity is T after the last active sample (no cancellation)
    const T* bg = c.bg + (c.bg_per_ray ? 3 * r : 0);
    const T f = tr[k];
    f0 = f * bg[0];
    f1 = f * bg[1];
    f2 = f * bg[2];
  }
  c.rgb[3 * r] = cr + f0;
  c.rgb[3 * r + 1] = cg + f1;
  c.rgb[3 * r + 2] = cb + f2;
  c.opacity[r] = o;
  c.depth[r] = T(0.5) * d;
}

template <class T, bool HAS_T, bool HAS_GW>
PYECCV_INLINE void backward_ray(const Ctx<T>& c, int64_t r, int64_t s0, int64_t n, Scratch<T>& w) {
  const T* a;
  const int64_t k = load_ray(c, s0, n, w, a);
  const T* tr = w.tr.data();
  T* g = w.g.data();
  const T* col = c.rgbs + 3 * s0;
  const T* ts = HAS_T ? c.ts + s0 : nullptr;
  const T* te = HAS_T ? c.te + s0 : nullptr;
  const T* gwi = HAS_GW ? c.g_weights + s0 : nullptr;
  T* dc = c.d_rgbs + 3 * s0;
  T* dv = c.d_values + s0;
  const T gr = c.g_rgb[3 * r], gg = c.g_rgb[3 * r + 1], gb = c.g_rgb[3 * r + 2];
  const T hd = HAS_T ? T(0.5) * c.g_depth[r] : T(0);
  const T* bg = c.bg ? c.bg + (c.bg_per_ray ? 3 * r : 0) : nullptr;
  // dL/dw_i = g_rgb . (c_i - bg) + g_opacity + g_depth t_mid_i (+ g_weights_i)
  const T g0 = c.g_opacity[r] - (bg ? gr * bg[0] + gg * bg[1] + gb * bg[2] : T(0));
#pragma omp simd
  for (int64_t i = 0; i < k; ++i) {
    T gi = g0 + gr * col[3 * i] + gg * col[3 * i + 1] + gb * col[3 * i + 2];
    if (HAS_T) gi += hd * (ts[i] + te[i]);
    if (HAS_GW) gi += gwi[i];
    g[i] = gi;
    const T wi = tr[i] * a[i];
    dc[3 * i] = wi * gr;
    dc[3 * i + 1] = wi * gg;
    dc[3 * i + 2] = wi * gb;
  }
  if (c.p->is_alpha) {
    // d alpha_i = T_i (g_i - V_i), V_i = sum_{j>i} g_j alpha_j prod_{i<l<j} (1 - alpha_l): a reverse
    // recurrence relative to T_{i+1} (exact where alpha = 1, where T_{i+1} = 0 but V_i is not)
    T acc = 0;
    for (int64_t i = k - 1; i >= 0; --i) {
      const T gi = g[i], ai = a[i];
      g[i] = gi - acc;
      acc = gi * ai + (T(1) - ai) * acc;
    }
#pragma omp simd
    for (int64_t i = 0; i < k; ++i) dv[i] = tr[i] * g[i];
  } else {
    // d tau_i = T_{i+1} g_i - sum_{j>i} g_j w_j: both terms O(T_{i+1}), the suffix sum accumulated
    // from the ray's end (never total - prefix, which cancels), so exact where T_{i+1} = 0
    T* sfx = w.a.data();  // alpha is not needed any more: reuse it for g_j w_j
#pragma omp simd
    for (int64_t i = 0; i < k; ++i) sfx[i] = g[i] * (tr[i] * sfx[i]);
    suffix_sum_excl(sfx, k);
#pragma omp simd
    for (int64_t i = 0; i < k; ++i) dv[i] = (tr[i + 1] * g[i] - sfx[i]) * (te[i] - ts[i]);
  }
  for (int64_t i = k; i < n; ++i) {
    dv[i] = T(0);
    dc[3 * i] = dc[3 * i + 1] = dc[3 * i + 2] = T(0);
  }
  if (bg && c.d_bg) {
    const T f = tr[k];  // 1 - opacity
    T* out = c.bg_per_ray ? c.d_bg + 3 * r : c.bg_acc;
    if (c.bg_per_ray) out[0] = out[1] = out[2] = T(0);
    out[0] += f * gr;
    out[1] += f * gg;
    out[2] += f * gb;
  }
}

// render_weights: all three per-sample outputs.
template <class T>
PYECCV_INLINE void weights_ray(const Ctx<T>& c, int64_t, int64_t s0, int64_t n, Scratch<T>& w) {
  const T* a;
  const int64_t k = load_ray(c, s0, n, w, a);
  const T* tr = w.tr.data();
  T* wo = c.weights + s0;
  T* to = c.trans + s0;
  T* ao = c.alphas + s0;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    wo[i] = i < k ? tr[i] * a[i] : T(0);
    to[i] = tr[i];
    ao[i] = a[i];
  }
}

// Gradient of sum(gw . w + gt . T + ga . alpha) w.r.t. the values (every sample of the ray).
template <class T>
PYECCV_INLINE void weights_backward_ray(const Ctx<T>& c, int64_t, int64_t s0, int64_t n, Scratch<T>& w) {
  const T* a;
  const int64_t k = load_ray(c, s0, n, w, a);
  const T* tr = w.tr.data();
  T* g = w.g.data();
  const T* gw = c.g_weights + s0;
  const T* gt = c.g_trans + s0;
  const T* ga = c.g_alphas + s0;
  T* dv = c.d_values + s0;
  // with b_i = gw_i alpha_i [i < k] + gt_i: u_i = gw_i [i < k] - V_i, V_i = sum_{j>i} b_j prod.
  T acc = 0;
  for (int64_t i = n - 1; i >= 0; --i) {
    const T ai = a[i], gwi = i < k ? gw[i] : T(0);
    g[i] = gwi - acc;
    acc = gwi * ai + gt[i] + (T(1) - ai) * acc;
  }
  if (c.p->is_alpha) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dv[i] = tr[i] * g[i] + ga[i];
  } else {
    const T* ts = c.ts + s0;
    const T* te = c.te + s0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dv[i] = (tr[i + 1] * g[i] + ga[i] * (T(1) - a[i])) * (te[i] - ts[i]);
  }
}

enum class Kind { kForward, kBackward, kWeights, kWeightsBackward };

// One chunk of rays (compiled per ISA variant with the rest of this file: common/isa.h).
template <class T>
PYECCV_INLINE void run_chunk(const Ctx<T>& c, Kind kind, int64_t r0, int64_t r1, Scratch<T>& w) {
  const int64_t* pi = c.p->packed_info;
  const bool has_t = c.ts != nullptr;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t s0 = pi[2 * r], n = pi[2 * r + 1];
    switch (kind) {
      case Kind::kForward:
        if (c.weights) {
          if (has_t) forward_ray<T, true, true>(c, r, s0, n, w);
          else forward_ray<T, true, false>(c, r, s0, n, w);
        } else {
          if (has_t) forward_ray<T, false, true>(c, r, s0, n, w);
          else forward_ray<T, false, false>(c, r, s0, n, w);
        }
        break;
      case Kind::kBackward:
        if (c.g_weights) {
          if (has_t) backward_ray<T, true, true>(c, r, s0, n, w);
          else backward_ray<T, false, true>(c, r, s0, n, w);
        } else {
          if (has_t) backward_ray<T, true, false>(c, r, s0, n, w);
          else backward_ray<T, false, false>(c, r, s0, n, w);
        }
        break;
      case Kind::kWeights:
        weights_ray<T>(c, r, s0, n, w);
        break;
      case Kind::kWeightsBackward:
        weights_backward_ray<T>(c, r, s0, n, w);
        break;
    }
  }
}

void chunk_f32(const Ctx<float>& c, Kind kind, int64_t r0, int64_t r1, Scratch<float>& w) {
  run_chunk<float>(c, kind, r0, r1, w);
}
void chunk_f64(const Ctx<double>& c, Kind kind, int64_t r0, int64_t r1, Scratch<double>& w) {
  run_chunk<double>(c, kind, r0, r1, w);
}
PYECCV_INLINE void chunk(const Ctx<float>& c, Kind kind, int64_t r0, int64_t r1, Scratch<float>& w) {
  chunk_f32(c, kind, r0, r1, w);
}
PYECCV_INLINE void chunk(const Ctx<double>& c, Kind kind, int64_t r0, int64_t r1, Scratch<double>& w) {
  chunk_f64(c, kind, r0, r1, w);
}

// Runs kind over all rays; returns false if a ray has an interval with t_end < t_start.
template <class T>
bool run(Ctx<T> c, Kind kind, int num_threads) {
  const VolumeRenderProblem& p = *c.p;
  int64_t longest = 0;
  for (int64_t r = 0; r < p.rays; ++r) longest = std::max(longest, p.packed_info[2 * r + 1]);
  constexpr int64_t kChunk = 32;
  const int64_t chunks = (p.rays + kChunk - 1) / kChunk;
  int nt = 1;
#ifdef PYECCV_HAS_OPENMP
  nt = num_threads > 0 ? num_threads : omp_get_max_threads();
  if (p.samples < 32768 || chunks < 2) nt = 1;
#else
  (void)num_threads;
#endif
  // the shared background gradient: one partial sum per thread, added in order at the end
  const bool shared_bg = kind == Kind::kBackward && c.bg && !c.bg_per_ray && c.d_bg;
  std::vector<T> parts(shared_bg ? static_cast<size_t>(3 * nt) : 0, T(0));
  std::vector<T> min_dt(static_cast<size_t>(nt), T(0));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    Scratch<T> w(longest);
    Ctx<T> mine = c;
    int tid = 0;
#ifdef PYECCV_HAS_OPENMP
    tid = omp_get_thread_num();
#endif
    if (shared_bg) mine.bg_acc = parts.data() + 3 * tid;
#pragma omp for schedule(dynamic, 1)
    for (int64_t q = 0; q < chunks; ++q) chunk(mine, kind, q * kChunk, std::min(p.rays, (q + 1) * kChunk), w);
    min_dt[static_cast<size_t>(tid)] = w.min_dt;
  }
  if (shared_bg) {
    c.d_bg[0] = c.d_bg[1] = c.d_bg[2] = T(0);
    for (int t = 0; t < nt; ++t)
      for (int j = 0; j < 3; ++j) c.d_bg[j] += parts[static_cast<size_t>(3 * t + j)];
  }
  for (T m : min_dt)
    if (m < T(0)) return false;
  return true;
}

template <class T>
Ctx<T> make_ctx(const VolumeRenderProblem& p) {
  Ctx<T> c{};
  c.p = &p;
  c.val = static_cast<const T*>(p.values);
  c.ts = static_cast<const T*>(p.t_starts);
  c.te = static_cast<const T*>(p.t_ends);
  return c;
}

void check(const VolumeRenderProblem& p) {
  if (p.rays < 0 || p.samples < 0) throw std::invalid_argument("volume_render: sizes must be >= 0");
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat64)
    throw std::invalid_argument("volume_render: dtype must be float32 or float64 on CPU");
  if (!p.is_alpha && (p.t_starts == nullptr || p.t_ends == nullptr) && p.samples > 0)
    throw std::invalid_argument("volume_render: densities need t_starts and t_ends");
  if ((p.t_starts == nullptr) != (p.t_ends == nullptr))
    throw std::invalid_argument("volume_render: t_starts and t_ends go together");
}

// A required array (an empty one may be null: torch gives null pointers to empty tensors).
void need(const void* ptr, int64_t size, const char* what) {
  if (ptr == nullptr && size > 0) throw std::invalid_argument(std::string("volume_render: ") + what + " must not be null");
}

template <class T>
bool forward(const VolumeRenderProblem& p, const void* rgbs, const void* background, bool bg_per_ray, void* rgb,
             void* opacity, void* depth, void* weights, int num_threads) {
  Ctx<T> c = make_ctx<T>(p);
  c.rgbs = static_cast<const T*>(rgbs);
  c.bg = static_cast<const T*>(background);
  c.bg_per_ray = bg_per_ray;
  c.rgb = static_cast<T*>(rgb);
  c.opacity = static_cast<T*>(opacity);
  c.depth = static_cast<T*>(depth);
  c.weights = static_cast<T*>(weights);
  const bool ok = run(c, Kind::kForward, num_threads);
  if (!c.ts)
    for (int64_t r = 0; r < p.rays; ++r) c.depth[r] = T(0);
  return ok;
}

template <class T>
bool backward(const VolumeRenderProblem& p, const void* rgbs, const void* background, bool bg_per_ray,
              const void* g_rgb, const void* g_opacity, const void* g_depth, const void* g_weights, void* d_values,
              void* d_rgbs, void* d_background, int num_threads) {
  Ctx<T> c = make_ctx<T>(p);
  c.rgbs = static_cast<const T*>(rgbs);
  c.bg = static_cast<const T*>(background);
  c.bg_per_ray = bg_per_ray;
  c.g_rgb = static_cast<const T*>(g_rgb);
  c.g_opacity = static_cast<const T*>(g_opacity);
  c.g_depth = static_cast<const T*>(g_depth);
  c.g_weights = static_cast<const T*>(g_weights);
  c.d_values = static_cast<T*>(d_values);
  c.d_rgbs = static_cast<T*>(d_rgbs);
  c.d_bg = static_cast<T*>(d_background);
  if (c.ts) need(g_depth, p.rays, "g_depth");
  run(c, Kind::kBackward, num_threads);
  return true;
}

}  // namespace

#define PYECCV_VR_DISPATCH(FN, ...) \
  (p.dtype == DType::kFloat64 ? FN<double>(__VA_ARGS__) : FN<float>(__VA_ARGS__))

bool vr_forward_cpu(const VolumeRenderProblem& p, const void* rgbs, const void* background, bool bg_per_ray,
                    void* rgb, void* opacity, void* depth, void* weights, int num_threads) {
  check(p);
  need(rgbs, p.samples, "rgbs");
  need(rgb, p.rays, "rgb");
  need(opacity, p.rays, "opacity");
  need(depth, p.rays, "depth");
  return PYECCV_VR_DISPATCH(forward, p, rgbs, background, bg_per_ray, rgb, opacity, depth, weights, num_threads);
}

void vr_backward_cpu(const VolumeRenderProblem& p, const void* rgbs, const void* background, bool bg_per_ray,
                     const void* g_rgb, const void* g_opacity, const void* g_depth, const void* g_weights,
                     void* d_values, void* d_rgbs, void* d_background, int num_threads) {
  check(p);
  need(rgbs, p.samples, "rgbs");
  need(g_rgb, p.rays, "g_rgb");
  need(g_opacity, p.rays, "g_opacity");
  need(d_values, p.samples, "d_values");
  need(d_rgbs, p.samples, "d_rgbs");
  (void)PYECCV_VR_DISPATCH(backward, p, rgbs, background, bg_per_ray, g_rgb, g_opacity, g_depth, g_weights, d_values,
                     d_rgbs, d_background, num_threads);
}

namespace {
template <class T>
bool weights_fwd(const VolumeRenderProblem& p, void* weights, void* trans, void* alphas, int num_threads) {
  Ctx<T> c = make_ctx<T>(p);
  c.weights = static_cast<T*>(weights);
  c.trans = static_cast<T*>(trans);
  c.alphas = static_cast<T*>(alphas);
  return run(c, Kind::kWeights, num_threads);
}
template <class T>
bool weights_bwd(const VolumeRenderProblem& p, const void* gw, const void* gt, const void* ga, void* d_values,
                 int num_threads) {
  Ctx<T> c = make_ctx<T>(p);
  c.g_weights = static_cast<const T*>(gw);
  c.g_trans = static_cast<const T*>(gt);
  c.g_alphas = static_cast<const T*>(ga);
  c.d_values = static_cast<T*>(d_values);
  return run(c, Kind::kWeightsBackward, num_threads);
}
}  // namespace

bool render_weights_cpu(const VolumeRenderProblem& p, void* weights, void* transmittance, void* alphas,
                        int num_threads) {
  check(p);
  need(weights, p.samples, "weights");
  need(transmittance, p.samples, "transmittance");
  need(alphas, p.samples, "alphas");
  return PYECCV_VR_DISPATCH(weights_fwd, p, weights, transmittance, alphas, num_threads);
}

void render_weights_backward_cpu(const VolumeRenderProblem& p, const void* g_weights, const void* g_trans,
                                 const void* g_alphas, void* d_values, int num_threads) {
  check(p);
  need(g_weights, p.samples, "g_weights");
  need(g_trans, p.samples, "g_trans");
  need(g_alphas, p.samples, "g_alphas");
  need(d_values, p.samples, "d_values");
  (void)PYECCV_VR_DISPATCH(weights_bwd, p, g_weights, g_trans, g_alphas, d_values, num_threads);
}

#undef PYECCV_VR_DISPATCH

int64_t vr_check_packed(const int64_t* packed_info, int64_t rays, int64_t samples, bool* in_order, bool* covered) {
  int64_t bad = -1, total = 0, prev_end = 0;
  bool ordered = true;
  for (int64_t r = 0; r < rays; ++r) {
    const int64_t start = packed_info[2 * r], count = packed_info[2 * r + 1];
    if (start < 0 || count < 0 || start > samples || count > samples - start) {
      bad = r;
      break;
    }
    ordered = ordered && start >= prev_end;
    prev_end = start + count;
    total += count;
  }
  if (in_order) *in_order = bad < 0 && ordered;
  if (covered) *covered = bad < 0 && total == samples;
  return bad;
}

PYECCV_ISA_END
