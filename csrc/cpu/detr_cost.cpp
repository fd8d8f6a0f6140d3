// CPU DETR matching cost: for each (image, query), the softmax normaliser once, then the
// image's own targets only; class + L1 + GIoU fused, written straight into the padded output.
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

#include "pyeccv/hungarian.h"

#ifdef PYECCV_HAS_OPENMP
#include <omp.h>
#endif

namespace pyeccv {
namespace {

template <class T>
void run(const DetrCostProblem& p, int num_threads) {
  const T* logits = static_cast<const T*>(p.logits);
  const T* boxes = static_cast<const T*>(p.boxes);
  const T* tboxes = static_cast<const T*>(p.tboxes);
  T* out = static_cast<T*>(p.out);
  const int64_t BQ = p.batch * p.queries;
  const T wc = static_cast<T>(p.w_class), wb = static_cast<T>(p.w_bbox), wg = static_cast<T>(p.w_giou);
  const T alpha = static_cast<T>(p.alpha), gamma = static_cast<T>(p.gamma);
  const T inf = std::numeric_limits<T>::infinity();
  const T eps = static_cast<T>(1e-8);
  const bool gamma2 = p.gamma == 2.0;
#ifdef PYECCV_HAS_OPENMP
  if (num_threads <= 0) num_threads = omp_get_max_threads();
#pragma omp parallel for schedule(static) num_threads(num_threads) if (BQ * (p.tmax + p.classes) > 32768)
#else
  (void)num_threads;
#endif
  for (int64_t bq = 0; bq < BQ; ++bq) {
    const int64_t b = bq / p.queries, q = bq % p.queries;
    const T* lq = logits + b * p.sl_b + q * p.sl_q;
    T mx = 0, sum = 1;
    if (!p.focal) {  // softmax normaliser of this query
      mx = lq[0];
      for (int64_t k = 1; k < p.classes; ++k) mx = std::max(mx, lq[k * p.sl_k]);
      sum = 0;
      for (int64_t k = 0; k < p.classes; ++k) sum += std::exp(lq[k * p.sl_k] - mx);
    }
    const T* bx = boxes + b * p.sb_b + q * p.sb_q;
    const T cx = bx[0], cy = bx[p.sb_c], w = bx[2 * p.sb_c], h = bx[3 * p.sb_c];
    const T x0 = cx - T(0.5) * w, y0 = cy - T(0.5) * h, x1 = cx + T(0.5) * w, y1 = cy + T(0.5) * h;
    const T area = (x1 - x0) * (y1 - y0);
    const int64_t n = p.counts[b], off = p.offsets[b];
    T* o = out + bq * p.tmax;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t g = off + t;
      const T x = lq[p.labels[g * p.s_lab] * p.sl_k];
      T c_class;
      if (p.focal) {
        const T pr = T(1) / (T(1) + std::exp(-x));
        // gamma = 2 (everyone's default) is a square: exact, and no pow() in the inner loop
        const T pg = gamma2 ? pr * pr : std::pow(pr, gamma);
        const T qg = gamma2 ? (T(1) - pr) * (T(1) - pr) : std::pow(T(1) - pr, gamma);
        const T neg = (T(1) - alpha) * pg * (-std::log(T(1) - pr + eps));
        const T pos = alpha * qg * (-std::log(pr + eps));
        c_class = pos - neg;
      } else {
        c_class = -(std::exp(x - mx) / sum);
      }
      const T* tb = tboxes + g * p.st_t;
      const T tcx = tb[0], tcy = tb[p.st_c], tw = tb[2 * p.st_c], th = tb[3 * p.st_c];
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
      o[t] = wb * l1 + wc * c_class - wg * giou;
    }
    for (int64_t t = n; t < p.tmax; ++t) o[t] = inf;
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
  if (p.dtype == DType::kFloat64) run<double>(p, num_threads);
  else run<float>(p, num_threads);
}

}  // namespace pyeccv
