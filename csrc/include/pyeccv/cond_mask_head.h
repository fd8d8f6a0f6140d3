// CondInst's dynamic mask head (Tian et al., ECCV 2020, arXiv 2003.05664; AdelaiDet's
// DynamicMaskHead): per instance a tiny MLP of 1x1 convolutions, whose weights the controller
// predicts, run over the shared mask features of its image plus two relative-coordinate channels.
//
// Instance i (image im_inds[i], location (lx, ly) in image pixels, size of interest soi[i]) at
// feature pixel (h, w): input = [ (lx - x_w) / soi, (ly - y_h) / soi, feats[im][0..C) (h, w) ]
// (x_w = stride w + stride / 2, likewise y_h; the coordinates computed in float32 as AdelaiDet
// does; without rel_coords the input is the C features only). Layers l = 0..L-1: in_l -> out_l,
// out_l = channels except out_{L-1} = 1; ReLU after every layer but the last. params (I, P): all
// weights first (layer by layer, each row-major [out][in]), then all biases (AdelaiDet's
// split_with_sizes(weight_nums + bias_nums)). Output: (I, H, W) logits.
//
// Nothing per instance is materialised: each (image, pixel tile) task evaluates the MLP of every
// instance of that image on the tile in registers. The backward recomputes the activations; the
// parameter gradients are reduced per instance (per-thread partials, added in thread order) and
// the feature gradients over the instances of each image (one task owns each (image, tile)):
// deterministic for a given thread count.
#pragma once
#include "pyeccv/common.h"

namespace pyeccv {

struct CondMaskHeadProblem {
  DType dtype = DType::kFloat32;  // feats, params, out and the gradients
  int64_t images = 0, in_channels = 0, height = 0, width = 0;  // feats (images, in_channels, height, width)
  int64_t instances = 0;
  int num_layers = 3, channels = 8;
  bool rel_coords = true;
  int stride = 8;
  const void* feats = nullptr;
  const void* params = nullptr;         // (instances, num_params)
  const int64_t* im_inds = nullptr;     // (instances,), each in [0, images)
  const float* locations = nullptr;     // (instances, 2): x, y
  const float* soi = nullptr;           // (instances,)
};

// The number of dynamic parameters per instance (AdelaiDet's num_gen_params).
int64_t cmh_num_params(int64_t in_channels, int channels, int num_layers, bool rel_coords);

// out (instances, height, width).
void cmh_forward_cpu(const CondMaskHeadProblem& p, void* out, int num_threads);
// g_out (instances, height, width) -> d_feats (images, in_channels, height, width) (every element
// written; zero for images without instances) and d_params (instances, num_params).
void cmh_backward_cpu(const CondMaskHeadProblem& p, const void* g_out, void* d_feats, void* d_params,
                      int num_threads);

}  // namespace pyeccv
