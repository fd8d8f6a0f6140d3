// CPU CondInst dynamic mask head (see pyeccv/cond_mask_head.h). Tasks are (image, pixel tile);
// a task runs the MLP of every instance of its image over the tile, 16 pixels at a time, with
// the activations of those 16 pixels in a small stack buffer and four output channels of
// accumulators in registers. The backward recomputes the activations per chunk, accumulates the
// parameter gradients lane-wise over the tile (reduced once per (instance, tile)), and the
// feature gradients of the tile over the image's instances.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/isa.h"
#include "common/vmath.h"
#include "pyeccv/cond_mask_head.h"

#ifdef PYECCV_HAS_OPENMP
#include <omp.h>
#endif

PYECCV_ISA_BEGIN
namespace {

constexpr int V = 16;       // pixels per chunk (one AVX-512 vector of floats)
constexpr int kTile = 256;  // pixels per task
constexpr int kMaxLayers = 16;

struct Net {
  int L = 0;
  int in[kMaxLayers] = {}, out[kMaxLayers] = {};
  int64_t woff[kMaxLayers] = {}, boff[kMaxLayers] = {};
  int64_t P = 0;
  int widest = 0;  // the largest layer width (input or output)
};

Net make_net(const CondMaskHeadProblem& p) {
  Net n;
  n.L = p.num_layers;
  int64_t w = 0;
  for (int l = 0; l < n.L; ++l) {
    n.in[l] = l == 0 ? static_cast<int>(p.in_channels + (p.rel_coords ? 2 : 0)) : p.channels;
    n.out[l] = l == n.L - 1 ? 1 : p.channels;
    n.woff[l] = w;
    w += static_cast<int64_t>(n.in[l]) * n.out[l];
    n.widest = std::max({n.widest, n.in[l], n.out[l]});
  }
  for (int l = 0; l < n.L; ++l) {
    n.boff[l] = w;
    w += n.out[l];
  }
  n.P = w;
  return n;
}

// hout[o][v] = act(b[o] + sum_k W[o][k] hin[k][v]) for one chunk; four outputs at a time.
template <class T>
PYECCV_INLINE void layer_fwd(const T* W, const T* b, int nin, int nout, const T* hin, T* hout, bool relu) {
  int o = 0;
  for (; o + 4 <= nout; o += 4) {
    T a0[V], a1[V], a2[V], a3[V];
    for (int v = 0; v < V; ++v) {
      a0[v] = b[o];
      a1[v] = b[o + 1];
      a2[v] = b[o + 2];
      a3[v] = b[o + 3];
    }
    const T* w0 = W + static_cast<int64_t>(o) * nin;
    const T* w1 = w0 + nin;
    const T* w2 = w1 + nin;
    const T* w3 = w2 + nin;
    for (int k = 0; k < nin; ++k) {
      const T* x = hin + k * V;
      const T c0 = w0[k], c1 = w1[k], c2 = w2[k], c3 = w3[k];
#pragma omp simd
      for (int v = 0; v < V; ++v) {
        a0[v] += c0 * x[v];
        a1[v] += c1 * x[v];
        a2[v] += c2 * x[v];
        a3[v] += c3 * x[v];
      }
    }
    T* y = hout + o * V;
#pragma omp simd
    for (int v = 0; v < V; ++v) {
      y[v] = relu ? (a0[v] > T(0) ? a0[v] : T(0)) : a0[v];
      y[V + v] = relu ? (a1[v] > T(0) ? a1[v] : T(0)) : a1[v];
      y[2 * V + v] = relu ? (a2[v] > T(0) ? a2[v] : T(0)) : a2[v];
      y[3 * V + v] = relu ? (a3[v] > T(0) ? a3[v] : T(0)) : a3[v];
    }
  }
  for (; o < nout; ++o) {
    T a[V];
    for (int v = 0; v < V; ++v) a[v] = b[o];
    const T* w0 = W + static_cast<int64_t>(o) * nin;
    for (int k = 0; k < nin; ++k) {
      const T* x = hin + k * V;
      const T c = w0[k];
#pragma omp simd
      for (int v = 0; v < V; ++v) a[v] += c * x[v];
    }
    T* y = hout + o * V;
#pragma omp simd
    for (int v = 0; v < V; ++v) y[v] = relu ? (a[v] > T(0) ? a[v] : T(0)) : a[v];
  }
}

// Typed view of one call.
template <class T>
struct Ctx {
  const CondMaskHeadProblem* p;
  Net net;
  const T* feats;
  const T* params;
  const float* px;   // (H * W) pixel x, as float32
  const float* py;   // (H * W) pixel y
  const int64_t* order;   // instances grouped by image
  const int64_t* first;   // (images + 1): order[first[n] .. first[n + 1]) are image n's instances
  int64_t HW, tiles_per_image;
  T* out;
  const T* g;
  T* d_feats;
};

// Per-thread scratch.
template <class T>
struct Scratch {
  std::vector<T> acts;   // (L + 1) layers x widest x V: the activations of one chunk
  std::vector<T> grad;   // 2 x widest x V: the running gradient w.r.t. the activations
  std::vector<T> dparams_v;  // P x V: lane-wise parameter gradients over one tile
  std::vector<T> dfeat;  // C x kTile: the feature gradient of the task's tile
  std::vector<T> dparams;  // instances x P: this thread's partial parameter gradients
  Scratch(const Net& n, int64_t C, int64_t instances, bool backward)
      : acts(static_cast<size_t>((n.L + 1) * n.widest * V)),
        grad(backward ? static_cast<size_t>(2 * n.widest * V) : 0),
        dparams_v(backward ? static_cast<size_t>(n.P * V) : 0),
        dfeat(backward ? static_cast<size_t>(C * kTile) : 0),
        dparams(backward ? static_cast<size_t>(instances * n.P) : 0) {}
};

// The input activations of instance i on pixels [q, q + V) of image n (lanes past cnt are 0).
template <class T>
PYECCV_INLINE void load_input(const Ctx<T>& c, int64_t i, int64_t n, int64_t q, int cnt, T* h0) {
  const CondMaskHeadProblem& p = *c.p;
  const int64_t C = p.in_channels;
  T* f = h0;
  if (p.rel_coords) {
    const float lx = p.locations[2 * i], ly = p.locations[2 * i + 1], s = p.soi[i];
    for (int v = 0; v < V; ++v) {
      const bool in = v < cnt;
      h0[v] = in ? static_cast<T>((lx - c.px[q + v]) / s) : T(0);
      h0[V + v] = in ? static_cast<T>((ly - c.py[q + v]) / s) : T(0);
    }
    f = h0 + 2 * V;
  }
  const T* src = c.feats + n * C * c.HW + q;
  for (int64_t k = 0; k < C; ++k) {
    const T* s = src + k * c.HW;
    T* d = f + k * V;
    if (cnt == V) {
#pragma omp simd
      for (int v = 0; v < V; ++v) d[v] = s[v];
    } else {
      for (int v = 0; v < V; ++v) d[v] = v < cnt ? s[v] : T(0);
    }
  }
}

// Forward of one chunk for instance i; the activations of layer l in acts + l * widest * V.
template <class T>
PYECCV_INLINE void chunk_forward(const Ctx<T>& c, int64_t i, int64_t n, int64_t q, int cnt, T* acts) {
  const Net& net = c.net;
  const int64_t stride = static_cast<int64_t>(net.widest) * V;
  load_input(c, i, n, q, cnt, acts);
  const T* prm = c.params + i * net.P;
  for (int l = 0; l < net.L; ++l)
    layer_fwd(prm + net.woff[l], prm + net.boff[l], net.in[l], net.out[l], acts + l * stride,
              acts + (l + 1) * stride, l < net.L - 1);
}

// The default head (and a few common shapes) with every size a constant: the loops unroll and the
// activations of a chunk stay in vector registers (10 + 8 + 8 zmm for the default head).
template <class T, int NIN, int NOUT, bool RELU>
PYECCV_INLINE void layer_fixed(const T* W, const T* b, const T (&hin)[NIN][V], T (&hout)[NOUT][V]) {
#pragma GCC unroll 32
  for (int o = 0; o < NOUT; ++o) {
    T a[V];
#pragma omp simd
    for (int v = 0; v < V; ++v) a[v] = b[o];
#pragma GCC unroll 32
    for (int k = 0; k < NIN; ++k) {
      const T cw = W[o * NIN + k];
#pragma omp simd
      for (int v = 0; v < V; ++v) a[v] += cw * hin[k][v];
    }
#pragma omp simd
    for (int v = 0; v < V; ++v) hout[o][v] = RELU ? (a[v] > T(0) ? a[v] : T(0)) : a[v];
  }
}

template <class T, int IN0, int CH>
PYECCV_INLINE void chunk_forward3(const Ctx<T>& c, int64_t i, int64_t n, int64_t q, int cnt, T* z) {
  const Net& net = c.net;
  alignas(64) T h0[IN0][V];
  alignas(64) T h1[CH][V];
  alignas(64) T h2[CH][V];
  alignas(64) T h3[1][V];
  load_input(c, i, n, q, cnt, &h0[0][0]);
  const T* prm = c.params + i * net.P;
  layer_fixed<T, IN0, CH, true>(prm + net.woff[0], prm + net.boff[0], h0, h1);
  layer_fixed<T, CH, CH, true>(prm + net.woff[1], prm + net.boff[1], h1, h2);
  layer_fixed<T, CH, 1, false>(prm + net.woff[2], prm + net.boff[2], h2, h3);
#pragma omp simd
  for (int v = 0; v < V; ++v) z[v] = h3[0][v];
}

// 0: generic; 1: 10 -> 8 -> 8 -> 1 (the default); 2: 8 -> 8 -> 8 -> 1 (no coordinates)
inline int fixed_kind(const Net& n) {
  if (n.L == 3 && n.out[0] == 8 && n.in[0] == 10) return 1;
  if (n.L == 3 && n.out[0] == 8 && n.in[0] == 8) return 2;
  return 0;
}

template <class T>
PYECCV_INLINE void task_forward(const Ctx<T>& c, int64_t task, Scratch<T>& w) {
  const int64_t n = task / c.tiles_per_image, t = task % c.tiles_per_image;
  const int64_t p0 = t * kTile, p1 = std::min(c.HW, p0 + kTile);
  const Net& net = c.net;
  const int64_t last = static_cast<int64_t>(net.L) * net.widest * V;
  const int kind = fixed_kind(net);
  for (int64_t j = c.first[n]; j < c.first[n + 1]; ++j) {
    const int64_t i = c.order[j];
    for (int64_t q = p0; q < p1; q += V) {
      const int cnt = static_cast<int>(std::min<int64_t>(V, p1 - q));
      alignas(64) T zf[V];
      const T* z = zf;
      if (kind == 1) {
        chunk_forward3<T, 10, 8>(c, i, n, q, cnt, zf);
      } else if (kind == 2) {
        chunk_forward3<T, 8, 8>(c, i, n, q, cnt, zf);
      } else {
        chunk_forward(c, i, n, q, cnt, w.acts.data());
        z = w.acts.data() + last;
      }
      T* o = c.out + i * c.HW + q;
      for (int v = 0; v < cnt; ++v) o[v] = z[v];
    }
  }
}

// dW[o][k] (lane-wise) += dz[o][v] hin[k][v]; db[o] += dz[o][v]; dhin[k][v] = sum_o W[o][k] dz[o][v].
template <class T>
PYECCV_INLINE void layer_bwd(const T* W, int nin, int nout, const T* hin, const T* dz, T* dWv, T* dbv, T* dhin) {
  for (int o = 0; o < nout; ++o) {
    const T* d = dz + o * V;
    T* acc = dbv + o * V;
#pragma omp simd
    for (int v = 0; v < V; ++v) acc[v] += d[v];
  }
  for (int o = 0; o < nout; ++o) {
    const T* d = dz + o * V;
    T* row = dWv + static_cast<int64_t>(o) * nin * V;
    for (int k = 0; k < nin; ++k) {
      const T* x = hin + k * V;
      T* acc = row + k * V;
#pragma omp simd
      for (int v = 0; v < V; ++v) acc[v] += d[v] * x[v];
    }
  }
  if (dhin == nullptr) return;
  for (int k = 0; k < nin; ++k) {
    T a[V] = {};
    for (int o = 0; o < nout; ++o) {
      const T c = W[static_cast<int64_t>(o) * nin + k];
      const T* d = dz + o * V;
#pragma omp simd
      for (int v = 0; v < V; ++v) a[v] += c * d[v];
    }
    T* y = dhin + k * V;
#pragma omp simd
    for (int v = 0; v < V; ++v) y[v] = a[v];
  }
}

template <class T>
PYECCV_INLINE void task_backward(const Ctx<T>& c, int64_t task, Scratch<T>& w) {
  const CondMaskHeadProblem& p = *c.p;
  const int64_t n = task / c.tiles_per_image, t = task % c.tiles_per_image;
  const int64_t p0 = t * kTile, p1 = std::min(c.HW, p0 + kTile);
  const Net& net = c.net;
  const int64_t C = p.in_channels, off = p.rel_coords ? 2 : 0;
  const int64_t stride = static_cast<int64_t>(net.widest) * V;
  T* acts = w.acts.data();
  T* dfeat = w.dfeat.data();
  std::fill(dfeat, dfeat + C * kTile, T(0));
  for (int64_t j = c.first[n]; j < c.first[n + 1]; ++j) {
    const int64_t i = c.order[j];
    const T* prm = c.params + i * net.P;
    T* dpv = w.dparams_v.data();
    std::fill(dpv, dpv + net.P * V, T(0));
    for (int64_t q = p0; q < p1; q += V) {
      const int cnt = static_cast<int>(std::min<int64_t>(V, p1 - q));
      chunk_forward(c, i, n, q, cnt, acts);
      T* dz = w.grad.data();  // gradient w.r.t. the current layer's output (pre-activation)
      T* dh = dz + stride;    // gradient w.r.t. its input
      const T* g = c.g + i * c.HW + q;
      for (int v = 0; v < V; ++v) dz[v] = v < cnt ? g[v] : T(0);
      for (int l = net.L - 1; l >= 0; --l) {
        const T* hin = acts + l * stride;
        const bool first_layer = l == 0;
        layer_bwd(prm + net.woff[l], net.in[l], net.out[l], hin, dz, dpv + net.woff[l] * V, dpv + net.boff[l] * V,
                  dh);
        if (first_layer) {
          const T* df = dh + off * V;  // the feature channels' part of the input gradient
          for (int64_t k = 0; k < C; ++k) {
            T* acc = dfeat + k * kTile + (q - p0);
            const T* s = df + k * V;
            for (int v = 0; v < cnt; ++v) acc[v] += s[v];
          }
        } else {  // through the ReLU of layer l - 1: its output is hin (> 0 where it passed)
#pragma omp simd
          for (int64_t e = 0; e < static_cast<int64_t>(net.in[l]) * V; ++e) dh[e] = hin[e] > T(0) ? dh[e] : T(0);
          std::swap(dz, dh);
        }
      }
    }
    T* dst = w.dparams.data() + i * net.P;  // lane sums into this thread's partial
    for (int64_t e = 0; e < net.P; ++e) {
      T s = 0;
      for (int v = 0; v < V; ++v) s += dpv[e * V + v];
      dst[e] += s;
    }
  }
  T* out = c.d_feats + n * C * c.HW + p0;
  for (int64_t k = 0; k < C; ++k)
    std::copy(dfeat + k * kTile, dfeat + k * kTile + (p1 - p0), out + k * c.HW);
}

void fwd_f32(const Ctx<float>& c, int64_t task, Scratch<float>& w) { task_forward(c, task, w); }
void bwd_f32(const Ctx<float>& c, int64_t task, Scratch<float>& w) { task_backward(c, task, w); }
void fwd_f64(const Ctx<double>& c, int64_t task, Scratch<double>& w) { task_forward(c, task, w); }
void bwd_f64(const Ctx<double>& c, int64_t task, Scratch<double>& w) { task_backward(c, task, w); }
PYECCV_INLINE void fwd(const Ctx<float>& c, int64_t t, Scratch<float>& w) { fwd_f32(c, t, w); }
PYECCV_INLINE void fwd(const Ctx<double>& c, int64_t t, Scratch<double>& w) { fwd_f64(c, t, w); }
PYECCV_INLINE void bwd(const Ctx<float>& c, int64_t t, Scratch<float>& w) { bwd_f32(c, t, w); }
PYECCV_INLINE void bwd(const Ctx<double>& c, int64_t t, Scratch<double>& w) { bwd_f64(c, t, w); }

void check(const CondMaskHeadProblem& p) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("cond_mask_head: " + m); };
  if (p.images < 0 || p.in_channels < 1 || p.height < 0 || p.width < 0 || p.instances < 0)
    fail("sizes must be >= 0 (in_channels >= 1)");
  if (p.num_layers < 2 || p.num_layers > kMaxLayers) fail("num_layers must be in [2, 16]");
  if (p.channels < 1) fail("channels must be >= 1");
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat64) fail("dtype must be float32 or float64 on CPU");
  for (int64_t i = 0; i < p.instances; ++i)
    if (p.im_inds[i] < 0 || p.im_inds[i] >= p.images) fail("im_inds[" + std::to_string(i) + "] out of range");
}

template <class T>
void run(const CondMaskHeadProblem& p, bool backward, void* out, const void* g, void* d_feats, void* d_params,
         int num_threads) {
  check(p);
  Ctx<T> c{};
  c.p = &p;
  c.net = make_net(p);
  c.feats = static_cast<const T*>(p.feats);
  c.params = static_cast<const T*>(p.params);
  c.HW = p.height * p.width;
  c.tiles_per_image = (c.HW + kTile - 1) / kTile;
  c.out = static_cast<T*>(out);
  c.g = static_cast<const T*>(g);
  c.d_feats = static_cast<T*>(d_feats);
  const int64_t P = c.net.P;
  if (backward && d_params != nullptr)
    std::fill(static_cast<T*>(d_params), static_cast<T*>(d_params) + p.instances * P, T(0));
  if (c.HW == 0 || p.images == 0) return;
  // pixel coordinates, float32 as AdelaiDet's compute_locations
  std::vector<float> px(static_cast<size_t>(c.HW)), py(static_cast<size_t>(c.HW));
  for (int64_t h = 0; h < p.height; ++h)
    for (int64_t x = 0; x < p.width; ++x) {
      px[static_cast<size_t>(h * p.width + x)] = static_cast<float>(p.stride * x + p.stride / 2);
      py[static_cast<size_t>(h * p.width + x)] = static_cast<float>(p.stride * h + p.stride / 2);
    }
  c.px = px.data();
  c.py = py.data();
  // instances grouped by image (stable counting sort)
  std::vector<int64_t> first(static_cast<size_t>(p.images + 1), 0), order(static_cast<size_t>(p.instances));
  for (int64_t i = 0; i < p.instances; ++i) ++first[static_cast<size_t>(p.im_inds[i] + 1)];
  for (int64_t n = 0; n < p.images; ++n) first[static_cast<size_t>(n + 1)] += first[static_cast<size_t>(n)];
  {
    std::vector<int64_t> next(first.begin(), first.end() - 1);
    for (int64_t i = 0; i < p.instances; ++i) order[static_cast<size_t>(next[static_cast<size_t>(p.im_inds[i])]++)] = i;
  }
  c.order = order.data();
  c.first = first.data();
  const int64_t tasks = p.images * c.tiles_per_image;
  int nt = 1;
#ifdef PYECCV_HAS_OPENMP
  nt = num_threads > 0 ? num_threads : omp_get_max_threads();
  const int64_t work = p.instances * c.HW * P;
  if (work < (1 << 18) || tasks < 2) nt = 1;
  nt = static_cast<int>(std::min<int64_t>(nt, tasks));
#else
  (void)num_threads;
#endif
  std::vector<std::vector<T>> partials(static_cast<size_t>(backward ? nt : 0));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int tid = 0;
#ifdef PYECCV_HAS_OPENMP
    tid = omp_get_thread_num();
#endif
    Scratch<T> w(c.net, p.in_channels, p.instances, backward);
    // static round-robin: the same tasks go to the same thread every call (deterministic sums)
#pragma omp for schedule(static, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      if (backward) bwd(c, task, w);
      else fwd(c, task, w);
    }
    if (backward) partials[static_cast<size_t>(tid)] = std::move(w.dparams);
  }
  if (backward && d_params != nullptr) {
    T* dp = static_cast<T*>(d_params);
    for (const auto& part : partials)  // in thread order
      for (int64_t e = 0; e < p.instances * P; ++e) dp[e] += part[static_cast<size_t>(e)];
  }
}

}  // namespace

int64_t cmh_num_params(int64_t in_channels, int channels, int num_layers, bool rel_coords) {
  CondMaskHeadProblem p;
  p.in_channels = in_channels;
  p.channels = channels;
  p.num_layers = num_layers;
  p.rel_coords = rel_coords;
  if (num_layers < 1 || num_layers > kMaxLayers) return -1;
  return make_net(p).P;
}

void cmh_forward_cpu(const CondMaskHeadProblem& p, void* out, int num_threads) {
  if (p.dtype == DType::kFloat64) run<double>(p, false, out, nullptr, nullptr, nullptr, num_threads);
  else run<float>(p, false, out, nullptr, nullptr, nullptr, num_threads);
}

void cmh_backward_cpu(const CondMaskHeadProblem& p, const void* g_out, void* d_feats, void* d_params,
                      int num_threads) {
  if (p.dtype == DType::kFloat64) run<double>(p, true, nullptr, g_out, d_feats, d_params, num_threads);
  else run<float>(p, true, nullptr, g_out, d_feats, d_params, num_threads);
}

PYECCV_ISA_END
