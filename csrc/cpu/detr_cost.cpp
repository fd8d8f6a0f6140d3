// CPU DETR matching cost: for each (image, query), the softmax normaliser once, then the
// image's own targets only; class + L1 + GIoU fused, written straight into the padded output.
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

#include "common/isa.h"
#include "common/vmath.h"
#include "pyeccv/hungarian.h"

#ifdef PYECCV_HAS_OPENMP
#include <omp.h>
#endif

PYECCV_ISA_BEGIN
namespace {

// Softmax normaliser of one query: (max, sum of exp(x - max)). Vectorised exp; the argument is
// clamped at -87 where exp underflows anyway (the float fast exp is valid down to there).
template <class T>
PYECCV_INLINE void normaliser(const T* x, int64_t n, int64_t stride, T& mx, T& sum) {
  T m = x[0];
  T s = 0;
  if (stride == 1) {  // the usual layout: contiguous classes, vectorised
#pragma omp simd reduction(max : m)
    for (int64_t k = 1; k < n; ++k) m = x[k] > m ? x[k] : m;  // not std::max: GCC won't vectorise it here
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < n; ++k) s += vmath::exp(std::max(x[k] - m, T(-87)));
  } else {
    for (int64_t k = 1; k < n; ++k) m = std::max(m, x[k * stride]);
    for (int64_t k = 0; k < n; ++k) s += vmath::exp(std::max(x[k * stride] - m, T(-87)));
  }
  mx = m;
  sum = s;
}

enum ClassCost { kSoftmax, kFocal2, kFocal };

// One (image, query) row of the padded cost. The target loop is branch-free (the class-cost kind
// is a template argument) so it vectorises: gathered logits, fast exp / log.
template <class T, int kKind>
PYECCV_INLINE void row(const DetrCostProblem& p, int64_t bq, T* out) {
  const int64_t b = bq / p.queries, q = bq % p.queries;
  const T* lq = static_cast<const T*>(p.logits) + b * p.sl_b + q * p.sl_q;
  T mx = 0, sum = 1;
  if (kKind == kSoftmax) normaliser(lq, p.classes, p.sl_k, mx, sum);
  const T* bx = static_cast<const T*>(p.boxes) + b * p.sb_b + q * p.sb_q;
  const T cx = bx[0], cy = bx[p.sb_c], w = bx[2 * p.sb_c], h = bx[3 * p.sb_c];
  const T x0 = cx - T(0.5) * w, y0 = cy - T(0.5) * h, x1 = cx + T(0.5) * w, y1 = cy + T(0.5) * h;
  const T area = (x1 - x0) * (y1 - y0);
  const T wc = static_cast<T>(p.w_class), wb = static_cast<T>(p.w_bbox), wg = static_cast<T>(p.w_giou);
  const T alpha = static_cast<T>(p.alpha), gamma = static_cast<T>(p.gamma), eps = static_cast<T>(1e-8);
  const T inv_sum = T(1) / sum;
  const int64_t n = p.counts[b], off = p.offsets[b];
  const int64_t* lab = p.labels + off * p.s_lab;
  const T* tbox = static_cast<const T*>(p.tboxes) + off * p.st_t;
  (void)gamma;
  const int64_t slab = p.s_lab, sk = p.sl_k, st = p.st_t, sc = p.st_c;
  T* o = out + bq * p.tmax;
  // Targets in tiles: gather the logits and boxes into contiguous arrays, then one vectorised pass.
  constexpr int64_t kTile = 64;
  T xs[kTile], bcx[kTile], bcy[kTile], bw[kTile], bh[kTile];
  for (int64_t t0 = 0; t0 < n; t0 += kTile) {
    const int64_t m = std::min(kTile, n - t0);
    for (int64_t i = 0; i < m; ++i) {
      const int64_t t = t0 + i;
      xs[i] = lq[lab[t * slab] * sk];
      const T* tb = tbox + t * st;
      bcx[i] = tb[0];
      bcy[i] = tb[sc];
      bw[i] = tb[2 * sc];
      bh[i] = tb[3 * sc];
    }
    T* ot = o + t0;
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) {
      const T x = xs[i];
      T c_class;
      if (kKind == kSoftmax) {
        c_class = -(vmath::exp(std::max(x - mx, T(-87))) * inv_sum);
      } else {
        const T pr = T(1) / (T(1) + vmath::exp(std::min(std::max(-x, T(-87)), T(87))));
        // gamma = 2 (everyone's default) is a square: exact and vectorisable
        const T pg = kKind == kFocal2 ? pr * pr : std::pow(pr, gamma);
        const T qg = kKind == kFocal2 ? (T(1) - pr) * (T(1) - pr) : std::pow(T(1) - pr, gamma);
        const T neg = (T(1) - alpha) * pg * (-vmath::log(T(1) - pr + eps));
        const T pos = alpha * qg * (-vmath::log(pr + eps));
        c_class = pos - neg;
      }
      const T tcx = bcx[i], tcy = bcy[i], tw = bw[i], th = bh[i];
      const T l1 = std::abs(cx - tcx) + std::abs(cy - tcy) + std::abs(w - tw) + std::abs(h - th);
      const T tx0 = tcx - T(0.5) * tw, ty0 = tcy - T(0.5) * th, tx1 = tcx + T(0.5) * tw, ty1 = tcy + T(0.5) * th;
      const T tarea = (tx1 - tx0) * (ty1 - ty0);
      const T iw = std::max(std::min(x1, tx1) - std::max(x0, tx0), T(0));
      const T ih = std::max(std::min(y1, ty1) - std::max(y0, ty0), T(0));
      const T inter = iw * ih;
      const T uni = area + tarea - inter;
      const T hw = std::max(std::max(x1, tx1) - std::min(x0, tx0), T(0));
      const T hh = std::max(std::max(y1, ty1) - std::min(y0, ty0), T(0));
      const T hull = hw * hh;
      const T giou = inter / uni - (hull - uni) / hull;
      ot[i] = wb * l1 + wc * c_class - wg * giou;
    }
  }
  const T inf = std::numeric_limits<T>::infinity();
  for (int64_t t = n; t < p.tmax; ++t) o[t] = inf;
}

template <class T, int kKind>
PYECCV_INLINE void rows(const DetrCostProblem& p, int64_t begin, int64_t end) {
  T* out = static_cast<T*>(p.out);
  for (int64_t bq = begin; bq < end; ++bq) row<T, kKind>(p, bq, out);
}

void rows_f32(const DetrCostProblem& p, int64_t begin, int64_t end) {
  if (!p.focal) rows<float, kSoftmax>(p, begin, end);
  else if (p.gamma == 2.0) rows<float, kFocal2>(p, begin, end);
  else rows<float, kFocal>(p, begin, end);
}
void rows_f64(const DetrCostProblem& p, int64_t begin, int64_t end) {
  if (!p.focal) rows<double, kSoftmax>(p, begin, end);
  else if (p.gamma == 2.0) rows<double, kFocal2>(p, begin, end);
  else rows<double, kFocal>(p, begin, end);
}

void run(const DetrCostProblem& p, int num_threads) {
  const int64_t BQ = p.batch * p.queries;
  const bool f64 = p.dtype == DType::kFloat64;
  constexpr int64_t kChunk = 64;  // rows per task
#ifdef PYECCV_HAS_OPENMP
  if (num_threads <= 0) num_threads = omp_get_max_threads();
#pragma omp parallel for schedule(static) num_threads(num_threads) if (BQ * (p.tmax + p.classes) > 32768)
#else
  (void)num_threads;
#endif
  for (int64_t c = 0; c < (BQ + kChunk - 1) / kChunk; ++c) {
    const int64_t begin = c * kChunk, end = std::min(BQ, begin + kChunk);
    if (f64) rows_f64(p, begin, end);
    else rows_f32(p, begin, end);
  }
}

}  // namespace

void detr_cost_cpu(const DetrCostProblem& p, int num_threads) {
  if (p.batch < 0 || p.queries < 0 || p.classes < 0 || p.tmax < 0)
    throw std::invalid_argument("detr_cost_cpu: sizes must be >= 0");
  if (p.batch * p.queries * p.tmax == 0) return;
  if (p.classes == 0) throw std::invalid_argument("detr_cost_cpu: classes must be > 0");
  for (int64_t b = 0; b < p.batch; ++b)
    if (p.counts[b] < 0 || p.counts[b] > p.tmax) throw std::invalid_argument("detr_cost_cpu: counts[b] outside [0, tmax]");
  run(p, num_threads);
}

PYECCV_ISA_END
