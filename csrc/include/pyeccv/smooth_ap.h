// Smooth-AP (Brown et al., ECCV 2020): per-query smoothed average precision and its gradient
// with respect to the similarity rows, in O(B) memory per query (never the B^3 tensor).
//
// For query q (item query_item[q] of the batch, label L) with positives P (items of label L)
// and retrieval set Omega, sigma(d) = 1 / (1 + exp(clamp(-d / tau, -50, 50))), s = sim[q, :]:
//   R_all(j) = 1 + sum_{k in Omega, k != j} sigma(s_k - s_j),  R_pos(j) = same over k in P,
//   ap[q] = 1/|P| sum_{j in P} R_pos(j) / R_all(j)            (0 when P is empty)
// official: Omega = every item, P includes the query itself; paper: both exclude the query.
// The positives of q are perm[pos_start[q] .. pos_start[q] + pos_count[q]) (items sorted by
// label; the query's own item is among them).
#pragma once
#include "pyeccv/common.h"

namespace pyeccv {

struct SmoothApProblem {
  DType dtype = DType::kFloat32;  // of sim, ap, grad_ap and dsim
  int64_t queries = 0, items = 0;
  const void* sim = nullptr;  // (queries, items), row stride ld
  int64_t ld = 0;
  const int64_t* labels = nullptr;      // (items,)
  const int64_t* query_item = nullptr;  // (queries,)
  const int64_t* perm = nullptr;        // (items,)
  const int64_t* pos_start = nullptr;   // (queries,)
  const int64_t* pos_count = nullptr;   // (queries,)
  double temperature = 0.01;
  bool paper = false;
};

// ap: (queries,) of dtype. OpenMP over queries.
void smooth_ap_forward_cpu(const SmoothApProblem& p, void* ap, int num_threads);
// dsim[q, k] = grad_ap[q] * d ap[q] / d sim[q, k]; dsim is (queries, items) contiguous.
void smooth_ap_backward_cpu(const SmoothApProblem& p, const void* grad_ap, void* dsim, int num_threads);

}  // namespace pyeccv
