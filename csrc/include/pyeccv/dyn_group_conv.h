// Dynamic Group Convolution (Su et al., ECCV 2020, arXiv 2007.04242; official code hellozhuo/dgc,
// layers.py DynamicMultiHeadConv): a convolution split into `heads` groups of output channels, each
// head convolving only the input channels its per-sample saliency keeps, scaled by that saliency.
//
// x (batch, in_channels, height, width); weight (out_channels, in_channels, kh, kw), head h owning
// rows [h * co, (h + 1) * co) with co = out_channels / heads; saliency (batch, heads, in_channels)
// >= 0. Per (b, h): with keep == in_channels every channel is kept; otherwise t = the
// (keep + 1)-th largest saliency of the row (= the largest of the in_channels - keep smallest) and
// the kept channels are those with saliency > t (the official rule: ties at t are all dropped, so
// at most `keep` survive). Head h convolves the kept channels, each times its saliency, with its
// filters (stride / padding / dilation as conv2d); output channel j * heads + h = head h's filter j
// (the official view(b, heads, co, ..).transpose(1, 2) interleaving). out (batch, out_channels,
// out_h, out_w).
//
// Only the kept channels are touched: an implicit GEMM per (sample, head) whose reduction
// dimension is kept * kh * kw, with an 8 x 32 (float; 8 x 16 double) register-tile micro-kernel.
// Stride-1 convolutions read the reduction rows straight from a zero-padded copy of each kept
// plane (padded-width output indexing, no im2col); strided ones gather a packed panel.
#pragma once
#include "pyeccv/common.h"

namespace pyeccv {

struct DynGroupConvProblem {
  DType dtype = DType::kFloat32;  // every tensor; CPU: float32 or float64
  int64_t batch = 0, in_channels = 0, height = 0, width = 0, out_channels = 0;
  int64_t heads = 1, kh = 1, kw = 1, keep = 1;
  int64_t stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dil_h = 1, dil_w = 1;
  const void* x = nullptr;         // (batch, in_channels, height, width), contiguous
  const void* weight = nullptr;    // (out_channels, in_channels, kh, kw), contiguous
  const void* saliency = nullptr;  // (batch, heads, in_channels), contiguous, >= 0, no NaN
};

// Output spatial size ((size + 2 pad - dil (k - 1) - 1) / stride + 1); < 1 means empty.
int64_t dgc_out_size(int64_t size, int64_t k, int64_t stride, int64_t pad, int64_t dil);

// out (batch, out_channels, out_h, out_w): every element written.
void dgc_forward_cpu(const DynGroupConvProblem& p, void* out, int num_threads);

// g_out (batch, out_channels, out_h, out_w) -> d_x (like x), d_weight (like weight), d_saliency
// (like saliency); every element written, exactly zero for channels a head does not keep.
// Deterministic for a given thread count.
void dgc_backward_cpu(const DynGroupConvProblem& p, const void* g_out, void* d_x, void* d_weight,
                      void* d_saliency, int num_threads);

}  // namespace pyeccv
