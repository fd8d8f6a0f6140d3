// NeRF volume rendering (Mildenhall et al., ECCV 2020) on packed rays: alpha compositing in one
// pass per ray, and its exact gradient without stored per-sample transmittance.
//
// Ray r owns samples [start_r, start_r + count_r) of the flat arrays. Per sample i of a ray:
//   density input:  tau_i = sigma_i (t_end_i - t_start_i), T_i = exp(-sum_{j<i} tau_j),
//                   alpha_i = 1 - exp(-tau_i)                 (nerfacc's render_weight_from_density)
//   alpha input:    T_i = prod_{j<i} (1 - alpha_j)             (render_weight_from_alpha)
//   w_i = T_i alpha_i; with early_stop_eps > 0, samples with T_i < eps get w_i = 0 (the ray stops).
// Compositing: rgb = sum w_i c_i + (1 - opacity) bg, opacity = sum w_i, depth = sum w_i t_mid_i.
// Backward: one reverse pass (V_{k-1} = b_k + (1 - alpha_k) V_k, the weighted suffix sums
// relative to T_{k+1}) and one forward pass; exact where alpha = 1 or sigma = 0 (no division).
#pragma once
#include "pyeccv/common.h"

namespace pyeccv {

struct VolumeRenderProblem {
  DType dtype = DType::kFloat32;  // of every float array (inputs, outputs, gradients)
  int64_t rays = 0, samples = 0;
  const int64_t* packed_info = nullptr;  // (rays, 2): start, count
  const void* values = nullptr;          // sigmas, or alphas when is_alpha
  const void* t_starts = nullptr;        // (samples,) (may be null for alpha input without depth)
  const void* t_ends = nullptr;
  bool is_alpha = false;
  double early_stop_eps = 0.0;
};

// Compositing. rgbs (samples, 3); background: null, (3,) or (rays, 3) (bg_per_ray).
// Outputs: rgb (rays, 3), opacity (rays,), depth (rays,), and weights (samples,) when not null.
// Every sample of every ray is written (weights 0 past an early stop); samples of no ray are not.
// Returns false if some ray has a negative interval (t_end < t_start), checked in passing.
bool vr_forward_cpu(const VolumeRenderProblem& p, const void* rgbs, const void* background, bool bg_per_ray,
                    void* rgb, void* opacity, void* depth, void* weights, int num_threads);
// Gradients of sum(g_rgb . rgb + g_opacity opacity + g_depth depth + g_weights . weights) with
// respect to values (samples,), rgbs (samples, 3) and background (same shape as given; may be
// null). g_rgb and g_opacity are required, g_depth too when intervals are given; g_weights may be
// null. Nothing of the forward is stored: it is recomputed per ray. Every sample of every ray is
// written (zeros past an early stop); samples of no ray are not.
void vr_backward_cpu(const VolumeRenderProblem& p, const void* rgbs, const void* background, bool bg_per_ray,
                     const void* g_rgb, const void* g_opacity, const void* g_depth, const void* g_weights,
                     void* d_values, void* d_rgbs, void* d_background, int num_threads);

// O(rays) check of packed_info against `samples`: returns the first ray whose (start, count) is out
// of range (-1 if none); in_order: every ray starts at or after the previous one's end (then rays
// cannot overlap); covered: the counts add up to `samples` (with in_order: every sample is in a ray).
int64_t vr_check_packed(const int64_t* packed_info, int64_t rays, int64_t samples, bool* in_order, bool* covered);

// Weights only: weights, transmittance (exclusive), alphas (samples,) each; false on a negative
// interval. Gradients below: every g_* required (pass zeros).
bool render_weights_cpu(const VolumeRenderProblem& p, void* weights, void* transmittance, void* alphas,
                        int num_threads);
// Gradient of sum(gw . weights + gt . transmittance + ga . alphas) w.r.t. values.
void render_weights_backward_cpu(const VolumeRenderProblem& p, const void* g_weights, const void* g_trans,
                                 const void* g_alphas, void* d_values, int num_threads);

}  // namespace pyeccv
