// pybind11 module pyeccv._C: argument plumbing only. Tensors cross as raw addresses (ints)
// plus sizes and strides in elements; allocation and checks live in pyeccv/ops/.
// C++ exceptions: std::invalid_argument -> ValueError, std::runtime_error -> RuntimeError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

// Instruction counting (`python -m pyeccv bench --count instructions`): callgrind's client requests
// are a few no-op instructions outside valgrind; header-only, used only when the build finds it.
#if defined(__has_include)
#if __has_include(<valgrind/callgrind.h>)
#include <valgrind/callgrind.h>
#define PYECCV_HAS_CALLGRIND 1
#endif
#endif

#include "common/isa.h"
#include "pyeccv/common.h"
#include "pyeccv/cond_mask_head.h"
#include "pyeccv/dyn_group_conv.h"
#include "pyeccv/grad_central.h"
#include "pyeccv/hungarian.h"
#include "pyeccv/smooth_ap.h"
#include "pyeccv/volume_render.h"

namespace py = pybind11;
using pyeccv::DType;
using pyeccv::LsapProblem;

namespace {

template <class T>
T* ptr(uintptr_t a) {
  return reinterpret_cast<T*>(a);
}

LsapProblem lsap_problem(uintptr_t cost, int dtype, int64_t batch, int64_t rows, int64_t cols, int64_t sb,
                         int64_t sr, int64_t sc, uintptr_t num_rows, uintptr_t num_cols, bool maximize,
                         uintptr_t out, uintptr_t status) {
  LsapProblem p;
  p.cost = ptr<const void>(cost);
  p.dtype = static_cast<DType>(dtype);
  p.batch = batch;
  p.rows = rows;
  p.cols = cols;
  p.stride_batch = sb;
  p.stride_row = sr;
  p.stride_col = sc;
  p.num_rows = ptr<const int64_t>(num_rows);
  p.num_cols = ptr<const int64_t>(num_cols);
  p.maximize = maximize;
  p.col_for_row = ptr<int64_t>(out);
  p.status = ptr<int32_t>(status);
  return p;
}

pyeccv::SmoothApProblem smooth_ap_problem(int dtype, int64_t queries, int64_t items, uintptr_t sim, int64_t ld,
                                          uintptr_t labels, uintptr_t query_item, uintptr_t perm,
                                          uintptr_t pos_start, uintptr_t pos_count, double temperature, bool paper) {
  pyeccv::SmoothApProblem p;
  p.dtype = static_cast<DType>(dtype);
  p.queries = queries;
  p.items = items;
  p.sim = ptr<const void>(sim);
  p.ld = ld;
  p.labels = ptr<const int64_t>(labels);
  p.query_item = ptr<const int64_t>(query_item);
  p.perm = ptr<const int64_t>(perm);
  p.pos_start = ptr<const int64_t>(pos_start);
  p.pos_count = ptr<const int64_t>(pos_count);
  p.temperature = temperature;
  p.paper = paper;
  return p;
}

// Rows of an int64 table (param, grad, buf0, buf1, buf2, rows, row_len, gc, init_buf) and a
// float64 one (step_size, bc2_sqrt), built by pyeccv/ops/grad_central.py.
std::vector<pyeccv::GcTensorRef> gc_tensors(uintptr_t tab, uintptr_t scal, int64_t n) {
  const int64_t* t = ptr<const int64_t>(tab);
  const double* s = ptr<const double>(scal);
  std::vector<pyeccv::GcTensorRef> out(static_cast<size_t>(std::max<int64_t>(n, 0)));
  for (int64_t i = 0; i < n; ++i, t += 11, s += 2) {
    auto& r = out[i];
    r.param = ptr<void>(static_cast<uintptr_t>(t[0]));
    r.grad = ptr<const void>(static_cast<uintptr_t>(t[1]));
    r.buf0 = ptr<void>(static_cast<uintptr_t>(t[2]));
    r.buf1 = ptr<void>(static_cast<uintptr_t>(t[3]));
    r.buf2 = ptr<void>(static_cast<uintptr_t>(t[4]));
    r.rows = t[5];
    r.row_len = t[6];
    r.gc = static_cast<int32_t>(t[7]);
    r.init_buf = static_cast<int32_t>(t[8]);
    r.step_size = s[0];
    r.bc2_sqrt = s[1];
  }
  return out;
}

pyeccv::CondMaskHeadProblem cmh_problem(int dtype, int64_t images, int64_t in_channels, int64_t height,
                                        int64_t width, int64_t instances, int num_layers, int channels,
                                        bool rel_coords, int stride, uintptr_t feats, uintptr_t params,
                                        uintptr_t im_inds, uintptr_t locations, uintptr_t soi) {
  pyeccv::CondMaskHeadProblem p;
  p.dtype = static_cast<DType>(dtype);
  p.images = images;
  p.in_channels = in_channels;
  p.height = height;
  p.width = width;
  p.instances = instances;
  p.num_layers = num_layers;
  p.channels = channels;
  p.rel_coords = rel_coords;
  p.stride = stride;
  p.feats = ptr<const void>(feats);
  p.params = ptr<const void>(params);
  p.im_inds = ptr<const int64_t>(im_inds);
  p.locations = ptr<const float>(locations);
  p.soi = ptr<const float>(soi);
  return p;
}

pyeccv::DynGroupConvProblem dgc_problem(int dtype, int64_t batch, int64_t in_channels, int64_t height, int64_t width,
                                        int64_t out_channels, int64_t heads, int64_t kh, int64_t kw, int64_t keep,
                                        int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                                        uintptr_t x, uintptr_t weight, uintptr_t saliency) {
  pyeccv::DynGroupConvProblem p;
  p.dtype = static_cast<DType>(dtype);
  p.batch = batch;
  p.in_channels = in_channels;
  p.height = height;
  p.width = width;
  p.out_channels = out_channels;
  p.heads = heads;
  p.kh = kh;
  p.kw = kw;
  p.keep = keep;
  p.stride_h = sh;
  p.stride_w = sw;
  p.pad_h = ph;
  p.pad_w = pw;
  p.dil_h = dh;
  p.dil_w = dw;
  p.x = ptr<const void>(x);
  p.weight = ptr<const void>(weight);
  p.saliency = ptr<const void>(saliency);
  return p;
}

pyeccv::VolumeRenderProblem vr_problem(int dtype, int64_t rays, int64_t samples, uintptr_t packed_info,
                                       uintptr_t values, uintptr_t t_starts, uintptr_t t_ends, bool is_alpha,
                                       double early_stop_eps) {
  pyeccv::VolumeRenderProblem p;
  p.dtype = static_cast<DType>(dtype);
  p.rays = rays;
  p.samples = samples;
  p.packed_info = ptr<const int64_t>(packed_info);
  p.values = ptr<const void>(values);
  p.t_starts = ptr<const void>(t_starts);
  p.t_ends = ptr<const void>(t_ends);
  p.is_alpha = is_alpha;
  p.early_stop_eps = early_stop_eps;
  return p;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyeccv compiled kernels (torch-free core; see csrc/include/pyeccv)";
  m.def("cuda_compiled", &pyeccv::cuda_compiled, "True when the CUDA kernels were built in");
  m.def("build_info", &pyeccv::build_info);
  m.def("cpu_isa", &pyeccv::cpu_isa_name, "the CPU instruction-set variant serving the kernels");
  m.def("set_cpu_isa", [](const std::string& name) { pyeccv::set_cpu_isa(name.c_str()); }, py::arg("name"));
  m.def("cpu_isas_available", &pyeccv::cpu_isas_available);
  m.def("cpu_isas_compiled", &pyeccv::cpu_isas_compiled);
  m.def("cpu_model", &pyeccv::cpu_model);
  m.def("_restrict_cpu_isas_for_testing", &pyeccv::restrict_cpu_isas_for_testing, py::arg("mask"));
#ifdef PYECCV_HAS_CALLGRIND
  m.def("callgrind_available", [] { return true; });
  m.def("running_on_valgrind", [] { return RUNNING_ON_VALGRIND != 0; });
  m.def("callgrind_start", [] { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; CALLGRIND_TOGGLE_COLLECT; });
  m.def("callgrind_stop", [](const std::string& name) {
    CALLGRIND_TOGGLE_COLLECT;
    CALLGRIND_DUMP_STATS_AT(name.c_str());
  }, py::arg("name"));
#else
  m.def("callgrind_available", [] { return false; });
  m.def("running_on_valgrind", [] { return false; });
  m.def("callgrind_start", [] {});
  m.def("callgrind_stop", [](const std::string&) {}, py::arg("name"));
#endif

#define LSAP_ARGS                                                                                        \
  py::arg("cost"), py::arg("dtype"), py::arg("batch"), py::arg("rows"), py::arg("cols"), py::arg("sb"), \
      py::arg("sr"), py::arg("sc"), py::arg("num_rows"), py::arg("num_cols"), py::arg("maximize"),      \
      py::arg("out"), py::arg("status")

  m.def(
      "lsap_cpu",
      [](uintptr_t cost, int dtype, int64_t batch, int64_t rows, int64_t cols, int64_t sb, int64_t sr,
         int64_t sc, uintptr_t nr, uintptr_t nc, bool maximize, uintptr_t out, uintptr_t status, int threads,
         int team_size) {
        const LsapProblem p = lsap_problem(cost, dtype, batch, rows, cols, sb, sr, sc, nr, nc, maximize, out, status);
        py::gil_scoped_release release;
        if (team_size > 0) pyeccv::lsap_cpu_threaded_team(p, team_size);  // tests: the GPU algorithm on CPU
        else pyeccv::lsap_cpu(p, threads);
      },
      LSAP_ARGS, py::arg("num_threads"), py::arg("team_size") = 0);
  // SciPy drop-in for one NumPy matrix: (row_ind, col_ind) int64 arrays. The one binding that
  // allocates: at SciPy's scale (1-5 us a call) the Python-side allocations and address lookups
  // would cost more than the solve itself.
  m.def(
      "lsap_cpu_scipy",
      [](py::array cost, bool maximize) {
        if (cost.ndim() != 2) throw std::invalid_argument("expected a matrix (2-D array)");
        const bool f64 = py::isinstance<py::array_t<double>>(cost);
        if (!f64 && !py::isinstance<py::array_t<float>>(cost))
          throw std::invalid_argument("cost must be float32 or float64");
        const auto es = static_cast<int64_t>(cost.itemsize());
        const int64_t n = cost.shape(0), m = cost.shape(1);
        py::array_t<int64_t> col(n);
        int32_t status = 0;
        const LsapProblem p = lsap_problem(reinterpret_cast<uintptr_t>(cost.data()), f64 ? 1 : 0, 1, n, m, 0,
                                           cost.strides(0) / es, cost.strides(1) / es, 0, 0, maximize,
                                           reinterpret_cast<uintptr_t>(col.mutable_data()),
                                           reinterpret_cast<uintptr_t>(&status));
        {
          py::gil_scoped_release release;
          pyeccv::lsap_cpu(p, 1);
        }
        if (status == pyeccv::kLsapInvalidEntry) throw std::invalid_argument("matrix contains invalid numeric entries");
        if (status == pyeccv::kLsapInfeasible) throw std::invalid_argument("cost matrix is infeasible");
        const int64_t k = std::min(n, m);
        py::array_t<int64_t> rows(k), cols(k);
        int64_t* r = rows.mutable_data();
        int64_t* c = cols.mutable_data();
        const int64_t* x = col.data();
        int64_t at = 0;
        for (int64_t i = 0; i < n && at < k; ++i)
          if (x[i] >= 0) {
            r[at] = i;
            c[at] = x[i];
            ++at;
          }
        return py::make_tuple(rows, cols);
      },
      py::arg("cost"), py::arg("maximize"));
  m.def(
      "lsap_cuda_workspace_bytes",
      [](int dtype, int64_t batch, int64_t rows, int64_t cols) {
        LsapProblem p;
        p.dtype = static_cast<DType>(dtype);
        p.batch = batch;
        p.rows = rows;
        p.cols = cols;
        return pyeccv::lsap_cuda_workspace_bytes(p);
      },
      py::arg("dtype"), py::arg("batch"), py::arg("rows"), py::arg("cols"));
  m.def(
      "lsap_cuda",
      [](uintptr_t cost, int dtype, int64_t batch, int64_t rows, int64_t cols, int64_t sb, int64_t sr,
         int64_t sc, uintptr_t nr, uintptr_t nc, bool maximize, uintptr_t out, uintptr_t status,
         uintptr_t workspace, size_t workspace_bytes, int device, uintptr_t stream) {
        const LsapProblem p = lsap_problem(cost, dtype, batch, rows, cols, sb, sr, sc, nr, nc, maximize, out, status);
        py::gil_scoped_release release;
        pyeccv::lsap_cuda(p, ptr<void>(workspace), workspace_bytes, device, ptr<void>(stream));
      },
      LSAP_ARGS, py::arg("workspace"), py::arg("workspace_bytes"), py::arg("device"), py::arg("stream"));
#undef LSAP_ARGS

  m.def(
      "detr_cost_cpu",
      [](int dtype, int64_t batch, int64_t queries, int64_t classes, int64_t tmax, uintptr_t logits, int64_t sl_b,
         int64_t sl_q, int64_t sl_k, uintptr_t boxes, int64_t sb_b, int64_t sb_q, int64_t sb_c, uintptr_t labels,
         int64_t s_lab, uintptr_t tboxes, int64_t st_t, int64_t st_c, uintptr_t counts, uintptr_t offsets,
         double w_class, double w_bbox, double w_giou, bool focal, double alpha, double gamma, uintptr_t out,
         int threads) {
        pyeccv::DetrCostProblem p;
        p.dtype = static_cast<DType>(dtype);
        p.batch = batch;
        p.queries = queries;
        p.classes = classes;
        p.tmax = tmax;
        p.logits = ptr<const void>(logits);
        p.sl_b = sl_b;
        p.sl_q = sl_q;
        p.sl_k = sl_k;
        p.boxes = ptr<const void>(boxes);
        p.sb_b = sb_b;
        p.sb_q = sb_q;
        p.sb_c = sb_c;
        p.labels = ptr<const int64_t>(labels);
        p.s_lab = s_lab;
        p.tboxes = ptr<const void>(tboxes);
        p.st_t = st_t;
        p.st_c = st_c;
        p.counts = ptr<const int64_t>(counts);
        p.offsets = ptr<const int64_t>(offsets);
        p.w_class = w_class;
        p.w_bbox = w_bbox;
        p.w_giou = w_giou;
        p.focal = focal;
        p.alpha = alpha;
        p.gamma = gamma;
        p.out = ptr<void>(out);
        py::gil_scoped_release release;
        pyeccv::detr_cost_cpu(p, threads);
      });

#define SMOOTH_AP_ARGS                                                                                      \
  py::arg("dtype"), py::arg("queries"), py::arg("items"), py::arg("sim"), py::arg("ld"), py::arg("labels"), \
      py::arg("query_item"), py::arg("perm"), py::arg("pos_start"), py::arg("pos_count"),                   \
      py::arg("temperature"), py::arg("paper")
  m.def(
      "smooth_ap_forward_cpu",
      [](int dtype, int64_t queries, int64_t items, uintptr_t sim, int64_t ld, uintptr_t labels,
         uintptr_t query_item, uintptr_t perm, uintptr_t pos_start, uintptr_t pos_count, double temperature,
         bool paper, uintptr_t ap, int threads) {
        const auto p = smooth_ap_problem(dtype, queries, items, sim, ld, labels, query_item, perm, pos_start,
                                         pos_count, temperature, paper);
        py::gil_scoped_release release;
        pyeccv::smooth_ap_forward_cpu(p, ptr<void>(ap), threads);
      },
      SMOOTH_AP_ARGS, py::arg("ap"), py::arg("num_threads"));
  m.def(
      "smooth_ap_backward_cpu",
      [](int dtype, int64_t queries, int64_t items, uintptr_t sim, int64_t ld, uintptr_t labels,
         uintptr_t query_item, uintptr_t perm, uintptr_t pos_start, uintptr_t pos_count, double temperature,
         bool paper, uintptr_t grad_ap, uintptr_t dsim, int threads) {
        const auto p = smooth_ap_problem(dtype, queries, items, sim, ld, labels, query_item, perm, pos_start,
                                         pos_count, temperature, paper);
        py::gil_scoped_release release;
        pyeccv::smooth_ap_backward_cpu(p, ptr<const void>(grad_ap), ptr<void>(dsim), threads);
      },
      SMOOTH_AP_ARGS, py::arg("grad_ap"), py::arg("dsim"), py::arg("num_threads"));
#undef SMOOTH_AP_ARGS

  m.def(
      "gc_sgd_cpu",
      [](uintptr_t tab, uintptr_t scal, int64_t n, int dtype, double lr, double momentum, double dampening,
         double weight_decay, bool nesterov, bool maximize, int threads) {
        const auto ts = gc_tensors(tab, scal, n);
        pyeccv::GcSgdHyper h;
        h.lr = lr;
        h.momentum = momentum;
        h.dampening = dampening;
        h.weight_decay = weight_decay;
        h.nesterov = nesterov;
        h.maximize = maximize;
        py::gil_scoped_release release;
        pyeccv::gc_sgd_cpu(ts.data(), n, static_cast<DType>(dtype), h, threads);
      },
      py::arg("tab"), py::arg("scal"), py::arg("n"), py::arg("dtype"), py::arg("lr"), py::arg("momentum"),
      py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"), py::arg("maximize"), py::arg("num_threads"));
  m.def(
      "gc_adam_cpu",
      [](uintptr_t tab, uintptr_t scal, int64_t n, int dtype, double lr, double beta1, double beta2, double eps,
         double weight_decay, bool amsgrad, bool maximize, bool decoupled, bool gc_update, int threads) {
        const auto ts = gc_tensors(tab, scal, n);
        pyeccv::GcAdamHyper h;
        h.lr = lr;
        h.beta1 = beta1;
        h.beta2 = beta2;
        h.eps = eps;
        h.weight_decay = weight_decay;
        h.amsgrad = amsgrad;
        h.maximize = maximize;
        h.decoupled = decoupled;
        h.gc_update = gc_update;
        py::gil_scoped_release release;
        pyeccv::gc_adam_cpu(ts.data(), n, static_cast<DType>(dtype), h, threads);
      },
      py::arg("tab"), py::arg("scal"), py::arg("n"), py::arg("dtype"), py::arg("lr"), py::arg("beta1"),
      py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("amsgrad"), py::arg("maximize"),
      py::arg("decoupled"), py::arg("gc_update"), py::arg("num_threads"));

#define VR_ARGS                                                                                          \
  py::arg("dtype"), py::arg("rays"), py::arg("samples"), py::arg("packed_info"), py::arg("values"),     \
      py::arg("t_starts"), py::arg("t_ends"), py::arg("is_alpha"), py::arg("early_stop_eps")
#define VR_PARAMS                                                                                        \
  int dtype, int64_t rays, int64_t samples, uintptr_t packed_info, uintptr_t values, uintptr_t t_starts, \
      uintptr_t t_ends, bool is_alpha, double eps
#define VR_PROBLEM vr_problem(dtype, rays, samples, packed_info, values, t_starts, t_ends, is_alpha, eps)
  m.def(
      "vr_check_packed",
      [](uintptr_t packed_info, int64_t rays, int64_t samples) {
        bool in_order = false, covered = false;
        const int64_t bad = pyeccv::vr_check_packed(ptr<const int64_t>(packed_info), rays, samples, &in_order, &covered);
        return py::make_tuple(bad, in_order, covered);
      },
      py::arg("packed_info"), py::arg("rays"), py::arg("samples"));
  m.def(
      "vr_forward_cpu",
      [](VR_PARAMS, uintptr_t rgbs, uintptr_t bg, bool bg_per_ray, uintptr_t rgb, uintptr_t opacity,
         uintptr_t depth, uintptr_t weights, int threads) {
        const auto p = VR_PROBLEM;
        py::gil_scoped_release release;
        return pyeccv::vr_forward_cpu(p, ptr<const void>(rgbs), ptr<const void>(bg), bg_per_ray, ptr<void>(rgb),
                               ptr<void>(opacity), ptr<void>(depth), ptr<void>(weights), threads);
      },
      VR_ARGS, py::arg("rgbs"), py::arg("background"), py::arg("bg_per_ray"), py::arg("rgb"), py::arg("opacity"),
      py::arg("depth"), py::arg("weights"), py::arg("num_threads"));
  m.def(
      "vr_backward_cpu",
      [](VR_PARAMS, uintptr_t rgbs, uintptr_t bg, bool bg_per_ray, uintptr_t g_rgb, uintptr_t g_opacity,
         uintptr_t g_depth, uintptr_t g_weights, uintptr_t d_values, uintptr_t d_rgbs, uintptr_t d_bg, int threads) {
        const auto p = VR_PROBLEM;
        py::gil_scoped_release release;
        pyeccv::vr_backward_cpu(p, ptr<const void>(rgbs), ptr<const void>(bg), bg_per_ray, ptr<const void>(g_rgb),
                                ptr<const void>(g_opacity), ptr<const void>(g_depth), ptr<const void>(g_weights),
                                ptr<void>(d_values), ptr<void>(d_rgbs), ptr<void>(d_bg), threads);
      },
      VR_ARGS, py::arg("rgbs"), py::arg("background"), py::arg("bg_per_ray"), py::arg("g_rgb"),
      py::arg("g_opacity"), py::arg("g_depth"), py::arg("g_weights"), py::arg("d_values"), py::arg("d_rgbs"),
      py::arg("d_background"), py::arg("num_threads"));
  m.def(
      "render_weights_cpu",
      [](VR_PARAMS, uintptr_t weights, uintptr_t trans, uintptr_t alphas, int threads) {
        const auto p = VR_PROBLEM;
        py::gil_scoped_release release;
        return pyeccv::render_weights_cpu(p, ptr<void>(weights), ptr<void>(trans), ptr<void>(alphas), threads);
      },
      VR_ARGS, py::arg("weights"), py::arg("transmittance"), py::arg("alphas"), py::arg("num_threads"));
  m.def(
      "render_weights_backward_cpu",
      [](VR_PARAMS, uintptr_t gw, uintptr_t gt, uintptr_t ga, uintptr_t d_values, int threads) {
        const auto p = VR_PROBLEM;
        py::gil_scoped_release release;
        pyeccv::render_weights_backward_cpu(p, ptr<const void>(gw), ptr<const void>(gt), ptr<const void>(ga),
                                            ptr<void>(d_values), threads);
      },
      VR_ARGS, py::arg("g_weights"), py::arg("g_trans"), py::arg("g_alphas"), py::arg("d_values"),
      py::arg("num_threads"));
#undef VR_ARGS
#define CMH_PARAMS                                                                                           \
  int dtype, int64_t images, int64_t in_channels, int64_t height, int64_t width, int64_t instances, int num_layers, \
      int channels, bool rel_coords, int stride, uintptr_t feats, uintptr_t params, uintptr_t im_inds,          \
      uintptr_t locations, uintptr_t soi
#define CMH_ARGS                                                                                             \
  py::arg("dtype"), py::arg("images"), py::arg("in_channels"), py::arg("height"), py::arg("width"),         \
      py::arg("instances"), py::arg("num_layers"), py::arg("channels"), py::arg("rel_coords"), py::arg("stride"), \
      py::arg("feats"), py::arg("params"), py::arg("im_inds"), py::arg("locations"), py::arg("soi")
#define CMH_PROBLEM                                                                                            \
  cmh_problem(dtype, images, in_channels, height, width, instances, num_layers, channels, rel_coords, stride, \
              feats, params, im_inds, locations, soi)
  m.def("cmh_num_params", &pyeccv::cmh_num_params, py::arg("in_channels"), py::arg("channels"),
        py::arg("num_layers"), py::arg("rel_coords"));
  m.def(
      "cmh_forward_cpu",
      [](CMH_PARAMS, uintptr_t out, int threads) {
        const auto p = CMH_PROBLEM;
        py::gil_scoped_release release;
        pyeccv::cmh_forward_cpu(p, ptr<void>(out), threads);
      },
      CMH_ARGS, py::arg("out"), py::arg("num_threads"));
  m.def(
      "cmh_backward_cpu",
      [](CMH_PARAMS, uintptr_t g_out, uintptr_t d_feats, uintptr_t d_params, int threads) {
        const auto p = CMH_PROBLEM;
        py::gil_scoped_release release;
        pyeccv::cmh_backward_cpu(p, ptr<const void>(g_out), ptr<void>(d_feats), ptr<void>(d_params), threads);
      },
      CMH_ARGS, py::arg("g_out"), py::arg("d_feats"), py::arg("d_params"), py::arg("num_threads"));
#undef CMH_PARAMS
#undef CMH_ARGS
#undef CMH_PROBLEM
#define DGC_PARAMS                                                                                           \
  int dtype, int64_t batch, int64_t in_channels, int64_t height, int64_t width, int64_t out_channels,           \
      int64_t heads, int64_t kh, int64_t kw, int64_t keep, int64_t sh, int64_t sw, int64_t ph, int64_t pw,       \
      int64_t dh, int64_t dw, uintptr_t x, uintptr_t weight, uintptr_t saliency
#define DGC_ARGS                                                                                             \
  py::arg("dtype"), py::arg("batch"), py::arg("in_channels"), py::arg("height"), py::arg("width"),           \
      py::arg("out_channels"), py::arg("heads"), py::arg("kh"), py::arg("kw"), py::arg("keep"),               \
      py::arg("stride_h"), py::arg("stride_w"), py::arg("pad_h"), py::arg("pad_w"), py::arg("dil_h"),          \
      py::arg("dil_w"), py::arg("x"), py::arg("weight"), py::arg("saliency")
#define DGC_PROBLEM \
  dgc_problem(dtype, batch, in_channels, height, width, out_channels, heads, kh, kw, keep, sh, sw, ph, pw, dh, dw, \
              x, weight, saliency)
  m.def(
      "dgc_forward_cpu",
      [](DGC_PARAMS, uintptr_t out, int threads) {
        const auto p = DGC_PROBLEM;
        py::gil_scoped_release release;
        pyeccv::dgc_forward_cpu(p, ptr<void>(out), threads);
      },
      DGC_ARGS, py::arg("out"), py::arg("num_threads"));
  m.def(
      "dgc_backward_cpu",
      [](DGC_PARAMS, uintptr_t g_out, uintptr_t d_x, uintptr_t d_weight, uintptr_t d_saliency, int threads) {
        const auto p = DGC_PROBLEM;
        py::gil_scoped_release release;
        pyeccv::dgc_backward_cpu(p, ptr<const void>(g_out), ptr<void>(d_x), ptr<void>(d_weight),
                                 ptr<void>(d_saliency), threads);
      },
      DGC_ARGS, py::arg("g_out"), py::arg("d_x"), py::arg("d_weight"), py::arg("d_saliency"), py::arg("num_threads"));
#undef DGC_PARAMS
#undef DGC_ARGS
#undef DGC_PROBLEM
#undef VR_PARAMS
#undef VR_PROBLEM
}
