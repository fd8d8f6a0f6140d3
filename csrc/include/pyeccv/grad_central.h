// Gradient Centralization (Yong et al., ECCV 2020) fused into SGD / Adam / AdamW steps over many
// tensors at once (multi-tensor style): one pass per tensor row computes the row mean of the
// gradient (or of the Adam update direction), the next applies the whole optimizer step.
//
// GC of a tensor with rows x row_len elements (row = everything but dim 0):
//   g[r, :] -= mean(g[r, :])
// SGD (torch.optim.SGD semantics, GC after weight decay, before momentum):
//   d = +-grad + wd p; d -= rowmean(d); buf = init ? d : mu buf + (1 - damp) d;
//   d = nesterov ? d + mu buf : buf; p -= lr d
// Adam / AdamW (torch semantics): d = +-grad (+ wd p for Adam); gc_update=false: d -= rowmean(d);
//   m = b1 m + (1 - b1) d; v = b2 v + (1 - b2) d^2; vmax = max(vmax, v) (amsgrad);
//   u = m / (sqrt(v or vmax) / bc2_sqrt + eps); gc_update=true: u -= rowmean(u);
//   p = p (1 - lr wd if AdamW) - step_size u          (step_size = lr / bc1)
#pragma once
#include "pyeccv/common.h"

namespace pyeccv {

struct GcTensorRef {
  void* param = nullptr;
  const void* grad = nullptr;  // contiguous, the param's dtype
  void* buf0 = nullptr;        // Adam: exp_avg; SGD: momentum_buffer (may be null: momentum 0)
  void* buf1 = nullptr;        // Adam: exp_avg_sq
  void* buf2 = nullptr;        // Adam: max_exp_avg_sq (amsgrad)
  int64_t rows = 0, row_len = 0;
  int32_t gc = 0;              // centralise each row
  int32_t init_buf = 0;        // SGD: the momentum buffer is created by this step
  double step_size = 0, bc2_sqrt = 1;  // Adam: lr / (1 - b1^t), sqrt(1 - b2^t)
};

struct GcSgdHyper {
  double lr = 0, momentum = 0, dampening = 0, weight_decay = 0;
  bool nesterov = false, maximize = false;
};

struct GcAdamHyper {
  double lr = 0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
  bool amsgrad = false, maximize = false, decoupled = false, gc_update = false;
};

// param_dtype: float32 / float64 / bfloat16 / float16. State buffers are float32 for bfloat16 and
// float16 parameters, the parameter dtype otherwise. OpenMP over row blocks of all tensors.
void gc_sgd_cpu(const GcTensorRef* tensors, int64_t n, DType param_dtype, const GcSgdHyper& h, int num_threads);
void gc_adam_cpu(const GcTensorRef* tensors, int64_t n, DType param_dtype, const GcAdamHyper& h, int num_threads);

}  // namespace pyeccv
