// Batched exact linear sum assignment (DETR's Hungarian matching core).
//
// Semantics follow scipy.optimize.linear_sum_assignment per problem: minimise (or maximise)
// the total cost of a matching that covers the smaller side; +inf (-inf when maximising) marks
// a forbidden pair; NaN, and -inf when minimising, are invalid.
#pragma once
#include "pyeccv/common.h"

namespace pyeccv {

// Per-problem status written by the solvers (never a device assert).
enum LsapStatus : int32_t {
  kLsapOk = 0,
  kLsapInvalidEntry = 1,   // NaN, or -inf when minimising (+inf when maximising is fine)
  kLsapInfeasible = 2,     // no matching covers the smaller side
  kLsapBadNumRows = 3,     // num_rows[b] outside [0, rows]
  kLsapBadNumCols = 4,     // num_cols[b] outside [0, cols]
};

struct LsapProblem {
  const void* cost = nullptr;  // (batch, rows, cols), any strides, float32 or float64
  DType dtype = DType::kFloat32;
  int64_t batch = 0, rows = 0, cols = 0;
  int64_t stride_batch = 0, stride_row = 0, stride_col = 0;  // in elements
  const int64_t* num_rows = nullptr;  // (batch,) valid rows per problem, or null = rows
  const int64_t* num_cols = nullptr;  // (batch,) valid cols per problem, or null = cols
  bool maximize = false;
  int64_t* col_for_row = nullptr;  // out (batch, rows) contiguous; -1 = row not assigned
  int32_t* status = nullptr;       // out (batch,) LsapStatus
};

// CPU: Jonker-Volgenant initialisation + shortest augmenting paths (Crouse), float64 duals,
// OpenMP across the batch. Throws std::invalid_argument for inconsistent sizes/pointers.
void lsap_cpu(const LsapProblem& p, int num_threads);

// CUDA: one thread block per problem, cooperating on every column scan and reduction.
// All pointers are device pointers on `device`. `workspace` must hold
// lsap_cuda_workspace_bytes(p) bytes. `stream` is a cudaStream_t of `device`. Nothing is
// synchronised: statuses are written on the stream. Throws std::runtime_error when CUDA is
// not compiled in or a launch fails.
size_t lsap_cuda_workspace_bytes(const LsapProblem& p);
void lsap_cuda(const LsapProblem& p, void* workspace, size_t workspace_bytes, int device, void* stream);

// Test hook: the CUDA solver's block-cooperative algorithm run on the CPU by `team_size`
// std::threads sharing one problem (strided ownership, barriers), so its synchronisation
// discipline is exercised without a GPU.
void lsap_cpu_threaded_team(const LsapProblem& p, int team_size);

}  // namespace pyeccv

namespace pyeccv {

// DETR's matching cost per image, padded (DETR / Deformable-DETR / DINO):
//   out[b, q, t] = w_bbox * L1(box_q, tbox_t) + w_class * class_cost(q, label_t)
//                  - w_giou * GIoU(box_q, tbox_t)       for t < counts[b], +inf beyond.
// class_cost = -softmax(logits[b, q])[label] or, with focal, the focal cost
//   alpha (1-p)^gamma (-log(p+1e-8)) - (1-alpha) p^gamma (-log(1-p+1e-8)), p = sigmoid(logit).
// Boxes are (cx, cy, w, h). Target t of image b is row offsets[b] + t of labels / tboxes.
// All float arrays share `dtype`; strides in elements; out is contiguous (batch, queries, tmax).
struct DetrCostProblem {
  DType dtype = DType::kFloat32;
  int64_t batch = 0, queries = 0, classes = 0, tmax = 0;
  const void* logits = nullptr;
  int64_t sl_b = 0, sl_q = 0, sl_k = 0;
  const void* boxes = nullptr;
  int64_t sb_b = 0, sb_q = 0, sb_c = 0;
  const int64_t* labels = nullptr;
  int64_t s_lab = 0;
  const void* tboxes = nullptr;
  int64_t st_t = 0, st_c = 0;
  const int64_t* counts = nullptr;   // (batch,)
  const int64_t* offsets = nullptr;  // (batch,)
  double w_class = 1, w_bbox = 5, w_giou = 2;
  bool focal = false;
  double alpha = 0.25, gamma = 2.0;
  void* out = nullptr;
};

// CPU: one pass per (image, query), OpenMP over them. Labels must lie in [0, classes).
void detr_cost_cpu(const DetrCostProblem& p, int num_threads);

}  // namespace pyeccv
