// core_test: the torch-free C++ core (csrc/include/pyeccv/*.h) against naive references.
//
// Every CPU entry point is called on small random inputs (fixed-seed PRNG, awkward sizes that hit
// the vector tails and the tiling edges), float32 and float64 where supported, output buffers
// poisoned with NaN, and compared with straight double-precision loops written here from the
// maths (pyeccv/reference/*.py and the header comments). Backward entry points are checked against
// an analytic naive gradient and, in float64 at small sizes, against central finite differences
// of the naive forward. LSAP is checked against brute force over all matchings.
//
// No test framework, no torch: one line per check, then exactly "N passed, M failed"; exit code
// 0 iff nothing failed. `--list-isas` prints the CPU ISA variants compiled in that this CPU can
// run (one per line, best first) when the core has the ISA API (PYECCV_HAS_CPU_ISA_API), else
// exits with status 2.
// Environment: PYECCV_CPU_ISA (read by the core) selects a variant; when set, the test checks
// that the core reports it. PYECCV_TEST_EXPECT_ISA=<name> checks the variant the core picked
// (used under qemu-x86_64 -cpu <model>); PYECCV_TEST_EXPECT_ISA=refused checks that the variant
// PYECCV_CPU_ISA asks for is refused (std::invalid_argument) on this CPU, and stops there.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "pyeccv/common.h"
#include "pyeccv/cond_mask_head.h"
#include "pyeccv/dyn_group_conv.h"
#include "pyeccv/grad_central.h"
#include "pyeccv/hungarian.h"
#include "pyeccv/smooth_ap.h"
#include "pyeccv/volume_render.h"

namespace {

using pyeccv::DType;

const double kNaN = std::numeric_limits<double>::quiet_NaN();
const double kInf = std::numeric_limits<double>::infinity();

// ---- tolerances ---------------------------------------------------------------------------------
// float64 kernel vs float64 naive loops: same maths, other summation order / association
// (~1e-15 relative); 1e-10 leaves room for the conditioning of the worst case.
constexpr double kTol64 = 1e-10;
// float32 kernel vs float64 naive of the same float32 inputs: 6e-8 per rounding, fast exp / log
// within 2 ulp, amplified by reductions over tens to hundreds of terms.
constexpr double kTol32 = 1e-4;
// float64 kernel vs central differences (h = 1e-5) of the float64 naive forward: truncation
// O(h^2 f''') and rounding O(eps |L| / h) are both below ~1e-8 at these sizes and scales.
constexpr double kTolFD = 1e-6;
constexpr double kFdStep = 1e-5;

// ---- reporting ----------------------------------------------------------------------------------
int g_passed = 0, g_failed = 0;

std::string fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

void record(bool ok, const std::string& name, const std::string& detail) {
  std::printf("%s %s%s%s\n", ok ? "PASS" : "FAIL", name.c_str(), detail.empty() ? "" : ": ", detail.c_str());
  std::fflush(stdout);
  ++(ok ? g_passed : g_failed);
}

// Runs f; an exception is a failed check (returns false).
template <class F>
bool no_throw(const std::string& name, F&& f) {
  try {
    f();
    return true;
  } catch (const std::exception& e) {
    record(false, name, std::string("threw: ") + e.what());
  }
  return false;
}

template <class E, class F>
void expect_throw(const std::string& name, F&& f) {
  try {
    f();
  } catch (const E& e) {
    record(true, name, std::string("threw as documented: ") + e.what());
    return;
  } catch (const std::exception& e) {
    record(false, name, std::string("threw the wrong type: ") + e.what());
    return;
  }
  record(false, name, "did not throw");
}

// One compared array: got (from the kernel) and ref (naive). A non-finite ref entry (NaN: an
// element the kernel must not write; inf: DETR padding) must be matched exactly.
struct Part {
  std::string what;
  std::vector<double> got, ref;
};

// Relative error ||got - ref|| / ||ref|| per part (absolute where ref is all zero).
bool check_parts(const std::string& name, const std::vector<Part>& parts, double tol) {
  bool ok = true;
  std::string detail;
  for (const Part& p : parts) {
    if (!detail.empty()) detail += "; ";
    if (p.got.size() != p.ref.size()) {
      ok = false;
      detail += p.what + ": size mismatch";
      continue;
    }
    double num = 0, den = 0, maxd = -1;
    size_t worst = 0, bad = 0, first_bad = 0;
    for (size_t i = 0; i < p.ref.size(); ++i) {
      const double r = p.ref[i], g = p.got[i];
      if (!std::isfinite(r)) {
        const bool same = (std::isnan(r) && std::isnan(g)) || r == g;
        if (!same && bad++ == 0) first_bad = i;
        continue;
      }
      if (!std::isfinite(g)) {
        if (bad++ == 0) first_bad = i;
        continue;
      }
      const double d = g - r;
      num += d * d;
      den += r * r;
      if (std::fabs(d) > maxd) maxd = std::fabs(d), worst = i;
    }
    const double rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
    const bool pok = bad == 0 && rel <= tol;
    ok = ok && pok;
    detail += fmt("%s rel=%.1e", p.what.c_str(), rel);
    if (bad)
      detail += fmt(" [%zu non-finite/unexpected, first at %zu: got %.9g ref %.9g]", bad, first_bad, p.got[first_bad],
                    p.ref[first_bad]);
    if (!pok && maxd >= 0)
      detail += fmt(" [max|d|=%.2e at %zu: got %.12g ref %.12g]", maxd, worst, p.got[worst], p.ref[worst]);
  }
  detail += fmt(" (tol %.0e)", tol);
  record(ok, name, detail);
  return ok;
}

// Elements the kernel must leave at exactly 0 (structural zeros).
void check_exact_zeros(const std::string& name, const std::vector<double>& got, const std::vector<char>& must_be_zero) {
  size_t n = 0, bad = 0, first = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!must_be_zero[i]) continue;
    ++n;
    if (got[i] != 0.0 && bad++ == 0) first = i;
  }
  if (bad)
    record(false, name, fmt("%zu of %zu structural zeros are not 0 (first at %zu: %.9g)", bad, n, first, got[first]));
  else
    record(true, name, fmt("%zu structural zeros exactly 0", n));
}

// ---- types and data -----------------------------------------------------------------------------
template <class T>
struct TI;
template <>
struct TI<float> {
  static constexpr DType dtype = DType::kFloat32;
  static constexpr const char* name = "f32";
};
template <>
struct TI<double> {
  static constexpr DType dtype = DType::kFloat64;
  static constexpr const char* name = "f64";
};
template <class T>
double tol(double t32, double t64) {
  return TI<T>::dtype == DType::kFloat32 ? t32 : t64;
}

// ---- libm-free maths for the references ---------------------------------------------------------
// The references call exp / log millions of times. Under qemu-x86_64 -cpu Haswell, glibc picks its
// FMA variants of exp / log (IFUNC), whose emulated FMAs made the run ~20x slower than the core's
// own work; these straight-line versions compile to plain SSE2 (no fused operations anywhere).
// Accuracy: ~1e-16 relative, far below every tolerance here.
double nexp(double x) {
  if (x != x) return x;
  if (x > 709.0) return kInf;
  if (x < -700.0) {  // keep 2^k normal: exp(x) = exp(x / 2)^2
    if (x < -1000.0) return 0.0;
    const double h = nexp(0.5 * x);
    return h * h;
  }
  const double inv_ln2 = 1.4426950408889634, ln2_hi = 0.6931471803691238, ln2_lo = 1.9082149292705877e-10;
  const double t = x * inv_ln2;
  const int64_t k = static_cast<int64_t>(t + (t >= 0 ? 0.5 : -0.5));
  const double r = (x - static_cast<double>(k) * ln2_hi) - static_cast<double>(k) * ln2_lo;  // |r| <= 0.35
  // Taylor series to r^13 / 13! (remainder < 1e-17), Horner form p_n = 1 + r / n * p_{n+1}
  double p = 1.0;
  for (int n = 13; n >= 1; --n) p = 1.0 + r / static_cast<double>(n) * p;
  const uint64_t bits = static_cast<uint64_t>(k + 1023) << 52;
  double scale;
  std::memcpy(&scale, &bits, 8);
  return p * scale;
}
double nlog(double x) {  // x > 0, finite
  if (!(x > 0)) return x == 0 ? -kInf : kNaN;
  uint64_t b;
  std::memcpy(&b, &x, 8);
  int64_t e = static_cast<int64_t>((b >> 52) & 0x7ff) - 1023;
  if (e == -1023) return nlog(x * 0x1p54) - 54 * 0.6931471805599453;  // subnormal
  b = (b & 0x000fffffffffffffull) | 0x3ff0000000000000ull;  // m in [1, 2)
  double m;
  std::memcpy(&m, &b, 8);
  if (m > 1.4142135623730951) m *= 0.5, ++e;  // m in [sqrt(1/2), sqrt(2))
  const double s = (m - 1) / (m + 1), s2 = s * s;  // log m = 2 atanh s, |s| < 0.172
  double q = 0;
  for (int n = 25; n >= 3; n -= 2) q = s2 * (1.0 / n + q);  // to s^25: remainder < 1e-19
  const double ln2_hi = 0.6931471803691238, ln2_lo = 1.9082149292705877e-10;
  return static_cast<double>(e) * ln2_hi + (2 * s * (1 + q) + static_cast<double>(e) * ln2_lo);
}
double npow(double x, double y) { return nexp(y * nlog(x)); }  // x > 0

struct Rng {  // splitmix64
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uni() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  double uni(double a, double b) { return a + (b - a) * uni(); }
  int64_t randint(int64_t n) { return static_cast<int64_t>(next() % static_cast<uint64_t>(n)); }  // [0, n)
  double normal() {  // Irwin-Hall (4 uniforms): mean 0, variance 1, no libm call; random enough here
    return (uni() + uni() + uni() + uni() - 2.0) * 1.7320508075688772;
  }
  std::vector<double> normals(size_t n, double scale = 1.0) {
    std::vector<double> v(n);
    for (auto& x : v) x = scale * normal();
    return v;
  }
  std::vector<double> unis(size_t n, double a, double b) {
    std::vector<double> v(n);
    for (auto& x : v) x = uni(a, b);
    return v;
  }
};

template <class T>
std::vector<T> cast(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}
template <class T>
std::vector<double> widen(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}
// x rounded to T and back: the values the kernel sees.
template <class T>
std::vector<double> rounded(const std::vector<double>& v) {
  return widen(cast<T>(v));
}
template <class T>
std::vector<T> poisoned(size_t n) {
  return std::vector<T>(n, std::numeric_limits<T>::quiet_NaN());
}

// Central differences of f at x, every coordinate.
std::vector<double> fd_grad(const std::function<double(const std::vector<double>&)>& f, std::vector<double> x) {
  std::vector<double> g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + kFdStep;
    const double fp = f(x);
    x[i] = x0 - kFdStep;
    const double fm = f(x);
    x[i] = x0;
    g[i] = (fp - fm) / (2 * kFdStep);
  }
  return g;
}

// =================================================================================================
// LSAP (hungarian.h): total cost vs brute force over all matchings
// =================================================================================================
using pyeccv::LsapProblem;

// Optimum over all matchings that cover the smaller side; forbidden = +inf (-inf when maximising).
double lsap_brute(const std::vector<double>& c, int nr, int nc, bool maximize, bool* feasible) {
  const bool tr = nr > nc;
  const int n = tr ? nc : nr, m = tr ? nr : nc;
  auto at = [&](int i, int j) { return tr ? c[static_cast<size_t>(j) * nc + i] : c[static_cast<size_t>(i) * nc + j]; };
  const double forbidden = maximize ? -kInf : kInf;
  double best = maximize ? -kInf : kInf;
  bool feas = false;
  std::vector<char> used(static_cast<size_t>(m), 0);
  std::function<void(int, double)> rec = [&](int i, double acc) {
    if (i == n) {
      feas = true;
      best = maximize ? std::max(best, acc) : std::min(best, acc);
      return;
    }
    for (int j = 0; j < m; ++j) {
      if (used[j]) continue;
      const double x = at(i, j);
      if (x == forbidden) continue;
      used[j] = 1;
      rec(i + 1, acc + x);
      used[j] = 0;
    }
  };
  rec(0, 0.0);
  *feasible = feas;
  return feas ? best : 0.0;
}

struct LsapCase {
  int nr = 0, nc = 0;
  std::vector<double> c;  // nr x nc row-major
  int32_t expect = -1;    // expected status; -1: from brute force (ok or infeasible)
  int64_t pass_rows = -100, pass_cols = -100;  // what num_rows / num_cols say: -100 = nr / nc, -200 = rows + 1
};

// kind 0: uniform reals; 1: integers 0..2 (tied optima); 2: 30 % forbidden; 3: negative reals;
// 4: wide range (1e6) plus integer ties.
LsapCase make_lsap(Rng& rng, int nr, int nc, int kind, bool maximize) {
  LsapCase k;
  k.nr = nr, k.nc = nc;
  k.c.resize(static_cast<size_t>(nr) * nc);
  const double forb = maximize ? -kInf : kInf;
  for (auto& x : k.c) {
    switch (kind) {
      case 0: x = rng.uni(0, 10); break;
      case 1: x = static_cast<double>(rng.randint(3)); break;
      case 2: x = rng.uni() < 0.3 ? forb : rng.uni(0, 10); break;
      case 3: x = rng.uni(-5, 5); break;
      default: x = 1e6 * rng.uni() + static_cast<double>(rng.randint(2)); break;
    }
  }
  return k;
}

std::vector<LsapCase> lsap_suite(Rng& rng, bool maximize) {
  const double forb = maximize ? -kInf : kInf;
  std::vector<LsapCase> v;
  v.push_back(make_lsap(rng, 1, 1, 0, maximize));
  v.push_back(make_lsap(rng, 1, 6, 0, maximize));
  v.push_back(make_lsap(rng, 6, 1, 3, maximize));
  v.push_back(make_lsap(rng, 3, 7, 0, maximize));
  v.push_back(make_lsap(rng, 7, 3, 0, maximize));
  v.push_back(make_lsap(rng, 5, 5, 1, maximize));
  v.push_back(make_lsap(rng, 7, 7, 0, maximize));
  v.push_back(make_lsap(rng, 7, 7, 1, maximize));
  v.push_back(make_lsap(rng, 7, 7, 2, maximize));
  v.push_back(make_lsap(rng, 6, 6, 2, maximize));
  v.push_back(make_lsap(rng, 4, 6, 2, maximize));
  v.push_back(make_lsap(rng, 7, 5, 2, maximize));
  v.push_back(make_lsap(rng, 6, 4, 3, maximize));
  v.push_back(make_lsap(rng, 7, 7, 4, maximize));
  v.push_back(make_lsap(rng, 2, 2, 0, maximize));
  v.push_back(make_lsap(rng, 0, 5, 0, maximize));  // no rows: ok, nothing assigned
  v.push_back(make_lsap(rng, 4, 0, 0, maximize));  // no cols
  {  // infeasible: row 1 has no allowed column
    LsapCase k = make_lsap(rng, 3, 3, 0, maximize);
    for (int j = 0; j < 3; ++j) k.c[3 + j] = forb;
    k.expect = pyeccv::kLsapInfeasible;
    v.push_back(k);
  }
  {  // infeasible by Hall: rows 0 and 1 can only use column 2
    LsapCase k = make_lsap(rng, 3, 5, 0, maximize);
    for (int r = 0; r < 2; ++r)
      for (int j = 0; j < 5; ++j)
        if (j != 2) k.c[r * 5 + j] = forb;
    k.expect = pyeccv::kLsapInfeasible;
    v.push_back(k);
  }
  {  // feasible only through one forbidden-free diagonal (rows > cols, transposed inside)
    LsapCase k = make_lsap(rng, 5, 3, 0, maximize);
    for (int r = 0; r < 5; ++r)
      for (int j = 0; j < 3; ++j)
        if (r != j + 2) k.c[r * 3 + j] = forb;
    v.push_back(k);
  }
  return v;
}

// Invalid inputs: each must report its status and assign nothing.
std::vector<LsapCase> lsap_invalid_suite(Rng& rng, bool maximize) {
  std::vector<LsapCase> v;
  {
    LsapCase k = make_lsap(rng, 3, 3, 0, maximize);
    k.c[5] = kNaN;
    k.expect = pyeccv::kLsapInvalidEntry;
    v.push_back(k);
  }
  {  // -inf when minimising / +inf when maximising
    LsapCase k = make_lsap(rng, 4, 2, 0, maximize);
    k.c[3] = maximize ? kInf : -kInf;
    k.expect = pyeccv::kLsapInvalidEntry;
    v.push_back(k);
  }
  {
    LsapCase k = make_lsap(rng, 2, 3, 0, maximize);
    k.pass_rows = -200;
    k.expect = pyeccv::kLsapBadNumRows;
    v.push_back(k);
  }
  {
    LsapCase k = make_lsap(rng, 2, 3, 0, maximize);
    k.pass_cols = -1;
    k.expect = pyeccv::kLsapBadNumCols;
    v.push_back(k);
  }
  v.push_back(make_lsap(rng, 3, 4, 0, maximize));  // a valid neighbour: unaffected by the others
  return v;
}

// mode 0: lsap_cpu(p, arg threads); mode 1: lsap_cpu_threaded_team(p, arg workers).
template <class T>
void lsap_check(const std::string& name, const std::vector<LsapCase>& cases, bool maximize, bool transposed, int mode,
                int arg) {
  const int64_t B = static_cast<int64_t>(cases.size());
  int64_t R = 1, Cc = 1;
  for (const auto& k : cases) R = std::max<int64_t>(R, k.nr), Cc = std::max<int64_t>(Cc, k.nc);
  R += 1, Cc += 2;  // padding rows and columns, NaN: the solver must only read the valid block
  const int64_t sb = R * Cc + 5;
  std::vector<T> cost(static_cast<size_t>(B * sb), std::numeric_limits<T>::quiet_NaN());
  std::vector<int64_t> nrv(static_cast<size_t>(B)), ncv(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const auto& k = cases[static_cast<size_t>(b)];
    for (int r = 0; r < k.nr; ++r)
      for (int c = 0; c < k.nc; ++c)
        cost[static_cast<size_t>(b * sb + (transposed ? c * R + r : r * Cc + c))] = static_cast<T>(k.c[r * k.nc + c]);
    nrv[static_cast<size_t>(b)] = k.pass_rows == -100 ? k.nr : k.pass_rows == -200 ? R + 1 : k.pass_rows;
    ncv[static_cast<size_t>(b)] = k.pass_cols == -100 ? k.nc : k.pass_cols == -200 ? Cc + 1 : k.pass_cols;
  }
  LsapProblem p;
  p.cost = cost.data();
  p.dtype = TI<T>::dtype;
  p.batch = B, p.rows = R, p.cols = Cc;
  p.stride_batch = sb;
  p.stride_row = transposed ? 1 : Cc;
  p.stride_col = transposed ? R : 1;
  p.num_rows = nrv.data();
  p.num_cols = ncv.data();
  p.maximize = maximize;
  std::vector<int64_t> cfr(static_cast<size_t>(B * R), -7);  // poison
  std::vector<int32_t> st(static_cast<size_t>(B), 99);
  p.col_for_row = cfr.data();
  p.status = st.data();
  if (!no_throw(name, [&] {
        if (mode == 0) pyeccv::lsap_cpu(p, arg);
        else pyeccv::lsap_cpu_threaded_team(p, arg);
      }))
    return;
  std::string why;
  int bad = 0;
  for (int64_t b = 0; b < B; ++b) {
    const auto& k = cases[static_cast<size_t>(b)];
    auto fail = [&](const std::string& m) {
      if (bad++ == 0) why = fmt("problem %lld (%dx%d): ", static_cast<long long>(b), k.nr, k.nc) + m;
    };
    std::vector<double> cv(k.c.size());  // the entries as the solver sees them
    for (size_t i = 0; i < cv.size(); ++i) cv[i] = static_cast<double>(static_cast<T>(k.c[i]));
    bool feas = false;
    const double best = lsap_brute(cv, k.nr, k.nc, maximize, &feas);
    const int32_t expect = k.expect >= 0 ? k.expect : (feas ? pyeccv::kLsapOk : pyeccv::kLsapInfeasible);
    const int32_t got = st[static_cast<size_t>(b)];
    const int64_t* row = cfr.data() + b * R;
    if (got != expect) {
      fail(fmt("status %d, expected %d", got, expect));
      continue;
    }
    if (expect != pyeccv::kLsapOk) {
      for (int64_t r = 0; r < R; ++r)
        if (row[r] != -1) {
          fail(fmt("status %d but row %lld -> %lld (expected -1)", got, static_cast<long long>(r),
                   static_cast<long long>(row[r])));
          break;
        }
      continue;
    }
    std::vector<char> used(static_cast<size_t>(std::max(k.nc, 1)), 0);
    int assigned = 0;
    double total = 0;
    bool okrows = true;
    const double forb = maximize ? -kInf : kInf;
    for (int64_t r = 0; r < R && okrows; ++r) {
      const int64_t j = row[r];
      if (r >= k.nr) {
        if (j != -1) fail(fmt("row %lld beyond num_rows -> %lld", static_cast<long long>(r), static_cast<long long>(j))), okrows = false;
        continue;
      }
      if (j == -1) continue;
      if (j < 0 || j >= k.nc) {
        fail(fmt("row %lld -> col %lld out of range", static_cast<long long>(r), static_cast<long long>(j)));
        okrows = false;
      } else if (used[static_cast<size_t>(j)]) {
        fail(fmt("col %lld used twice", static_cast<long long>(j)));
        okrows = false;
      } else {
        used[static_cast<size_t>(j)] = 1;
        ++assigned;
        const double x = cv[static_cast<size_t>(r * k.nc + j)];
        if (x == forb) fail(fmt("row %lld -> forbidden col %lld", static_cast<long long>(r), static_cast<long long>(j))), okrows = false;
        total += x;
      }
    }
    if (!okrows) continue;
    if (assigned != std::min(k.nr, k.nc)) {
      fail(fmt("%d rows assigned, expected %d", assigned, std::min(k.nr, k.nc)));
      continue;
    }
    // float64 duals on the same entries: the optimum exactly, up to summation rounding (~1e-15)
    if (std::fabs(total - best) > 1e-9 * std::max(1.0, std::fabs(best)))
      fail(fmt("total %.17g, brute force %.17g", total, best));
  }
  record(bad == 0, name,
         bad ? why + fmt(" (%d of %lld problems bad)", bad, static_cast<long long>(B))
             : fmt("%lld problems: statuses and optimal totals match brute force", static_cast<long long>(B)));
}

template <class T>
void test_lsap(Rng& rng) {
  const std::string t = TI<T>::name;
  const auto mins = lsap_suite(rng, false), maxs = lsap_suite(rng, true);
  lsap_check<T>("lsap " + t + " min serial", mins, false, false, 0, 1);
  lsap_check<T>("lsap " + t + " min omp2 transposed strides", mins, false, true, 0, 2);
  lsap_check<T>("lsap " + t + " max omp0", maxs, true, false, 0, 0);
  lsap_check<T>("lsap " + t + " min threaded_team 1", mins, false, false, 1, 1);
  lsap_check<T>("lsap " + t + " min threaded_team 3 transposed", mins, false, true, 1, 3);
  lsap_check<T>("lsap " + t + " max threaded_team 4", maxs, true, false, 1, 4);
  lsap_check<T>("lsap " + t + " min invalid entries / sizes", lsap_invalid_suite(rng, false), false, false, 0, 1);
  lsap_check<T>("lsap " + t + " max invalid entries / sizes", lsap_invalid_suite(rng, true), true, false, 0, 2);
  lsap_check<T>("lsap " + t + " min invalid, threaded_team 2", lsap_invalid_suite(rng, false), false, false, 1, 2);
}

void test_lsap_errors() {
  std::vector<float> c(4, 1.f);
  std::vector<int64_t> cfr(2);
  std::vector<int32_t> st(1);
  LsapProblem p;
  p.cost = c.data(), p.batch = 1, p.rows = 2, p.cols = 2, p.stride_batch = 4, p.stride_row = 2, p.stride_col = 1;
  p.col_for_row = cfr.data(), p.status = st.data();
  expect_throw<std::invalid_argument>("lsap threaded_team size 0 rejected", [&] { pyeccv::lsap_cpu_threaded_team(p, 0); });
  LsapProblem q = p;
  q.dtype = DType::kBFloat16;
  expect_throw<std::invalid_argument>("lsap bfloat16 rejected", [&] { pyeccv::lsap_cpu(q, 1); });
  LsapProblem r = p;
  r.status = nullptr;
  expect_throw<std::invalid_argument>("lsap null status rejected", [&] { pyeccv::lsap_cpu(r, 1); });
  if (!pyeccv::cuda_compiled()) {
    expect_throw<std::runtime_error>("lsap_cuda without CUDA throws", [&] { pyeccv::lsap_cuda(p, nullptr, 0, 0, nullptr); });
    record(pyeccv::lsap_cuda_workspace_bytes(p) == 0, "lsap_cuda_workspace_bytes without CUDA", "0 bytes");
  }
}

// =================================================================================================
// DETR matching cost (hungarian.h)
// =================================================================================================
template <class T>
void detr_check(Rng& rng, const std::string& name, int64_t B, int64_t Q, int64_t K, const std::vector<int64_t>& counts,
                int64_t tmax_extra, bool focal, double gamma, bool strided, int nt) {
  int64_t tmax = 0, Tt = 0;
  for (int64_t c : counts) tmax = std::max(tmax, c), Tt += c;
  tmax += tmax_extra;
  const auto logits = rounded<T>(rng.normals(static_cast<size_t>(B * Q * K), 2.0));
  std::vector<double> boxes(static_cast<size_t>(B * Q * 4)), tb(static_cast<size_t>(std::max<int64_t>(1, Tt) * 4));
  auto fill_boxes = [&](std::vector<double>& v, int64_t n, bool col_major) {  // (n, 4) or (4, n)
    for (int64_t i = 0; i < n; ++i) {
      const double bx[4] = {rng.uni(0.1, 0.9), rng.uni(0.1, 0.9), rng.uni(0.02, 0.6), rng.uni(0.02, 0.6)};
      for (int c = 0; c < 4; ++c) v[static_cast<size_t>(col_major ? c * n + i : i * 4 + c)] = bx[c];
    }
  };
  // predicted boxes: (B, Q, 4) or per image (4, Q)
  for (int64_t b = 0; b < B; ++b) {
    std::vector<double> one(static_cast<size_t>(Q * 4));
    fill_boxes(one, Q, strided);
    std::copy(one.begin(), one.end(), boxes.begin() + b * Q * 4);
  }
  fill_boxes(tb, Tt, strided);
  boxes = rounded<T>(boxes);
  tb = rounded<T>(tb);
  const int64_t s_lab = strided ? 3 : 1;
  std::vector<int64_t> labels(static_cast<size_t>(std::max<int64_t>(1, Tt) * s_lab));
  for (auto& l : labels) l = rng.randint(K);
  std::vector<int64_t> offsets(static_cast<size_t>(B));
  for (int64_t b = 0, o = 0; b < B; ++b) offsets[static_cast<size_t>(b)] = o, o += counts[static_cast<size_t>(b)];

  pyeccv::DetrCostProblem p;
  p.dtype = TI<T>::dtype;
  p.batch = B, p.queries = Q, p.classes = K, p.tmax = tmax;
  const auto lt = cast<T>(logits), bt = cast<T>(boxes), tbt = cast<T>(tb);
  p.logits = lt.data();
  p.sl_b = Q * K;
  p.sl_q = strided ? 1 : K;  // strided: class-major (B, K, Q)
  p.sl_k = strided ? Q : 1;
  p.boxes = bt.data();
  p.sb_b = Q * 4;
  p.sb_q = strided ? 1 : 4;
  p.sb_c = strided ? Q : 1;
  p.labels = labels.data();
  p.s_lab = s_lab;
  p.tboxes = tbt.data();
  p.st_t = strided ? 1 : 4;
  p.st_c = strided ? Tt : 1;
  p.counts = counts.data();
  p.offsets = offsets.data();
  p.w_class = 2.0, p.w_bbox = 5.0, p.w_giou = 2.0;
  p.focal = focal, p.alpha = 0.25, p.gamma = gamma;
  auto out = poisoned<T>(static_cast<size_t>(B * Q * tmax));
  p.out = out.data();
  if (!no_throw(name, [&] { pyeccv::detr_cost_cpu(p, nt); })) return;

  std::vector<double> ref(out.size());
  auto xyxy = [](const double* b, double* o) {
    o[0] = b[0] - 0.5 * b[2], o[1] = b[1] - 0.5 * b[3], o[2] = b[0] + 0.5 * b[2], o[3] = b[1] + 0.5 * b[3];
  };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t q = 0; q < Q; ++q) {
      auto logit = [&](int64_t k) { return logits[static_cast<size_t>(b * p.sl_b + q * p.sl_q + k * p.sl_k)]; };
      double mx = -kInf, se = 0;
      for (int64_t k = 0; k < K; ++k) mx = std::max(mx, logit(k));
      for (int64_t k = 0; k < K; ++k) se += nexp(logit(k) - mx);
      double pb[4], pa[4];
      for (int c = 0; c < 4; ++c) pb[c] = boxes[static_cast<size_t>(b * p.sb_b + q * p.sb_q + c * p.sb_c)];
      xyxy(pb, pa);
      for (int64_t t = 0; t < tmax; ++t) {
        double& o = ref[static_cast<size_t>((b * Q + q) * tmax + t)];
        if (t >= counts[static_cast<size_t>(b)]) {
          o = kInf;
          continue;
        }
        const int64_t tt = offsets[static_cast<size_t>(b)] + t;
        const double x = logit(labels[static_cast<size_t>(tt * s_lab)]);
        double cls;
        if (!focal) {
          cls = -nexp(x - mx) / se;
        } else {
          const double pr = 1 / (1 + nexp(-x));
          const double neg = (1 - p.alpha) * npow(pr, gamma) * (-nlog(1 - pr + 1e-8));
          const double pos = p.alpha * npow(1 - pr, gamma) * (-nlog(pr + 1e-8));
          cls = pos - neg;
        }
        double qb[4], qa[4];
        for (int c = 0; c < 4; ++c) qb[c] = tb[static_cast<size_t>(tt * p.st_t + c * p.st_c)];
        xyxy(qb, qa);
        double l1 = 0;
        for (int c = 0; c < 4; ++c) l1 += std::fabs(pb[c] - qb[c]);
        const double area1 = (pa[2] - pa[0]) * (pa[3] - pa[1]), area2 = (qa[2] - qa[0]) * (qa[3] - qa[1]);
        const double iw = std::max(0.0, std::min(pa[2], qa[2]) - std::max(pa[0], qa[0]));
        const double ih = std::max(0.0, std::min(pa[3], qa[3]) - std::max(pa[1], qa[1]));
        const double inter = iw * ih, uni = area1 + area2 - inter;
        const double hw = std::max(0.0, std::max(pa[2], qa[2]) - std::min(pa[0], qa[0]));
        const double hh = std::max(0.0, std::max(pa[3], qa[3]) - std::min(pa[1], qa[1]));
        const double hull = hw * hh;
        const double giou = inter / uni - (hull - uni) / hull;
        o = p.w_bbox * l1 + p.w_class * cls - p.w_giou * giou;
      }
    }
  // f32: elementwise (a few float ops, one fast exp / log per entry) -> 1e-5; f64: kTol64
  check_parts(name, {{"cost", widen(out), ref}}, tol<T>(1e-5, kTol64));
}

template <class T>
void test_detr(Rng& rng) {
  const std::string t = "detr_cost " + std::string(TI<T>::name);
  detr_check<T>(rng, t + " softmax B2 Q13 K7 counts{5,0}+2", 2, 13, 7, {5, 0}, 2, false, 2.0, false, 1);
  detr_check<T>(rng, t + " softmax strided B3 Q5 K92 counts{1,67,3}", 3, 5, 92, {1, 67, 3}, 0, false, 2.0, true, 1);
  detr_check<T>(rng, t + " softmax K1 Q1", 1, 1, 1, {1}, 0, false, 2.0, false, 1);
  detr_check<T>(rng, t + " focal g2 strided B2 Q11 K17", 2, 11, 17, {9, 4}, 1, true, 2.0, true, 1);
  detr_check<T>(rng, t + " focal g1.5 B2 Q7 K5", 2, 7, 5, {3, 6}, 0, true, 1.5, false, 1);
  detr_check<T>(rng, t + " softmax omp2 B3 Q100 K92", 3, 100, 92, {40, 17, 33}, 0, false, 2.0, false, 2);
  detr_check<T>(rng, t + " focal g2 omp0 B3 Q100 K91", 3, 100, 91, {40, 0, 33}, 3, true, 2.0, true, 0);
}

// =================================================================================================
// Smooth-AP (smooth_ap.h)
// =================================================================================================
struct SapData {
  int64_t Q = 0, N = 0, ld = 0;
  std::vector<int64_t> labels, qitem, perm, pstart, pcount;
  std::vector<double> sim;  // (Q, ld); padding NaN
};

SapData make_sap(Rng& rng, int64_t Q, int64_t N, int64_t ncls, int64_t pad) {
  SapData d;
  d.Q = Q, d.N = N, d.ld = N + pad;
  d.labels.resize(static_cast<size_t>(N));
  for (auto& l : d.labels) l = rng.randint(ncls);
  if (N >= 2) d.labels[static_cast<size_t>(N - 1)] = ncls;  // a class of one (no positive in "paper")
  std::vector<int64_t> items(static_cast<size_t>(N));
  std::iota(items.begin(), items.end(), 0);
  for (int64_t i = N - 1; i > 0; --i) std::swap(items[static_cast<size_t>(i)], items[static_cast<size_t>(rng.randint(i + 1))]);
  if (N >= 2) std::swap(*std::find(items.begin(), items.end(), N - 1), items[0]);  // the singleton is a query
  d.qitem.assign(items.begin(), items.begin() + Q);
  d.perm = std::vector<int64_t>(static_cast<size_t>(N));
  std::iota(d.perm.begin(), d.perm.end(), 0);
  std::stable_sort(d.perm.begin(), d.perm.end(), [&](int64_t a, int64_t b) { return d.labels[a] < d.labels[b]; });
  for (int64_t q = 0; q < Q; ++q) {
    const int64_t L = d.labels[static_cast<size_t>(d.qitem[static_cast<size_t>(q)])];
    int64_t s = -1, c = 0;
    for (int64_t i = 0; i < N; ++i)
      if (d.labels[static_cast<size_t>(d.perm[static_cast<size_t>(i)])] == L) {
        if (s < 0) s = i;
        ++c;
      }
    d.pstart.push_back(s);
    d.pcount.push_back(c);
  }
  d.sim.assign(static_cast<size_t>(Q * d.ld), kNaN);
  for (int64_t q = 0; q < Q; ++q) {
    for (int64_t k = 0; k < N; ++k) d.sim[static_cast<size_t>(q * d.ld + k)] = rng.uni(-1, 1);
    d.sim[static_cast<size_t>(q * d.ld + d.qitem[static_cast<size_t>(q)])] = 1.0;  // self similarity
  }
  return d;
}

double sap_sig(double x, double tau) {
  const double e = std::min(std::max(-x / tau, -50.0), 50.0);
  return 1.0 / (1.0 + nexp(e));
}
double sap_slope(double x, double tau) {  // d sig / dx; 0 where the exponent is clamped (as autograd)
  const double e = -x / tau;
  if (e < -50 || e > 50) return 0.0;
  const double s = sap_sig(x, tau);
  return s * (1 - s) / tau;
}

// AP of query q (similarity row s) and, if grad != null, d ap / d s (N entries).
double sap_naive(const SapData& d, const double* s, int64_t q, double tau, bool paper, double* grad) {
  const int64_t self = d.qitem[static_cast<size_t>(q)], L = d.labels[static_cast<size_t>(self)], N = d.N;
  auto in_omega = [&](int64_t k) { return !(paper && k == self); };
  auto in_pos = [&](int64_t k) { return d.labels[static_cast<size_t>(k)] == L && in_omega(k); };
  std::vector<int64_t> P;
  for (int64_t k = 0; k < N; ++k)
    if (in_pos(k)) P.push_back(k);
  if (grad) std::fill(grad, grad + N, 0.0);
  if (P.empty()) return 0.0;
  double ap = 0;
  for (int64_t j : P) {
    double rp = 1, ra = 1;
    for (int64_t k = 0; k < N; ++k) {
      if (k == j) continue;
      const double sg = sap_sig(s[k] - s[j], tau);
      if (in_omega(k)) ra += sg;
      if (in_pos(k)) rp += sg;
    }
    ap += rp / ra;
    if (grad)
      for (int64_t k = 0; k < N; ++k) {
        if (k == j) continue;
        const double sl = sap_slope(s[k] - s[j], tau);
        const double dv = (in_pos(k) ? sl : 0.0) / ra - rp * (in_omega(k) ? sl : 0.0) / (ra * ra);
        grad[k] += dv;  // through s_k
        grad[j] -= dv;  // through -s_j
      }
  }
  const double np = static_cast<double>(P.size());
  if (grad)
    for (int64_t k = 0; k < N; ++k) grad[k] /= np;
  return ap / np;
}

template <class T>
pyeccv::SmoothApProblem sap_problem(const SapData& d, const std::vector<T>& sim, double tau, bool paper) {
  pyeccv::SmoothApProblem p;
  p.dtype = TI<T>::dtype;
  p.queries = d.Q, p.items = d.N;
  p.sim = sim.data();
  p.ld = d.ld;
  p.labels = d.labels.data();
  p.query_item = d.qitem.data();
  p.perm = d.perm.data();
  p.pos_start = d.pstart.data();
  p.pos_count = d.pcount.data();
  p.temperature = tau;
  p.paper = paper;
  return p;
}

template <class T>
void sap_check(Rng& rng, const std::string& name, int64_t Q, int64_t N, int64_t ncls, int64_t pad, double tau, bool paper,
               int nt) {
  const SapData d = make_sap(rng, Q, N, ncls, pad);
  const auto simT = cast<T>(d.sim);
  const auto sim = widen(simT);
  const auto p = sap_problem(d, simT, tau, paper);
  auto ap = poisoned<T>(static_cast<size_t>(Q));
  if (!no_throw(name + " fwd", [&] { pyeccv::smooth_ap_forward_cpu(p, ap.data(), nt); })) return;
  const auto gap = rounded<T>(rng.normals(static_cast<size_t>(Q)));
  std::vector<double> ref_ap(static_cast<size_t>(Q)), ref_ds(static_cast<size_t>(Q * N));
  for (int64_t q = 0; q < Q; ++q) {
    double* g = ref_ds.data() + q * N;
    ref_ap[static_cast<size_t>(q)] = sap_naive(d, sim.data() + q * d.ld, q, tau, paper, g);
    for (int64_t k = 0; k < N; ++k) g[k] *= gap[static_cast<size_t>(q)];
  }
  // f32 at tau 0.01: the float rounding of s_k - s_j is amplified 100x in the exponent -> kTol32
  check_parts(name + " fwd", {{"ap", widen(ap), ref_ap}}, tol<T>(kTol32, kTol64));
  const auto gapT = cast<T>(gap);
  auto ds = poisoned<T>(static_cast<size_t>(Q * N));
  if (!no_throw(name + " bwd", [&] { pyeccv::smooth_ap_backward_cpu(p, gapT.data(), ds.data(), nt); })) return;
  // vs the analytic naive gradient (same amplification as the forward)
  check_parts(name + " bwd", {{"dsim", widen(ds), ref_ds}}, tol<T>(kTol32, kTol64));
}

// float64 backward vs central differences of the naive AP (tau 0.2: nothing clamped, smooth).
void sap_fd_check(Rng& rng, bool paper) {
  const std::string name = std::string("smooth_ap f64 ") + (paper ? "paper" : "official") + " bwd vs finite differences";
  const double tau = 0.2;
  const SapData d = make_sap(rng, 4, 11, 3, 2);
  const auto p = sap_problem(d, d.sim, tau, paper);
  const auto gap = rng.normals(4);
  auto ds = poisoned<double>(static_cast<size_t>(4 * 11));
  if (!no_throw(name, [&] { pyeccv::smooth_ap_backward_cpu(p, gap.data(), ds.data(), 1); })) return;
  std::vector<double> fd(ds.size());
  for (int64_t q = 0; q < 4; ++q) {
    std::vector<double> row(d.sim.begin() + q * d.ld, d.sim.begin() + q * d.ld + 11);
    const auto g = fd_grad([&](const std::vector<double>& s) { return gap[q] * sap_naive(d, s.data(), q, tau, paper, nullptr); }, row);
    std::copy(g.begin(), g.end(), fd.begin() + q * 11);
  }
  check_parts(name, {{"dsim", ds, fd}}, kTolFD);  // FD truncation / rounding: see kTolFD
}

template <class T>
void test_smooth_ap(Rng& rng) {
  const std::string t = "smooth_ap " + std::string(TI<T>::name);
  for (bool paper : {false, true}) {
    const std::string f = paper ? " paper" : " official";
    sap_check<T>(rng, t + f + " Q1 N1", 1, 1, 1, 0, 0.01, paper, 1);
    sap_check<T>(rng, t + f + " Q5 N13 ld+3", 5, 13, 4, 3, 0.01, paper, 1);
    sap_check<T>(rng, t + f + " Q37 N37", 37, 37, 5, 0, 0.01, paper, 1);
    sap_check<T>(rng, t + f + " Q61 N97 omp2", 61, 97, 9, 1, 0.01, paper, 2);
    sap_check<T>(rng, t + f + " Q9 N33 tau0.3", 9, 33, 3, 0, 0.3, paper, 0);
  }
}

// =================================================================================================
// Gradient Centralization optimizers (grad_central.h)
// =================================================================================================
struct Bf16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};
double to_d(float x) { return x; }
double to_d(double x) { return x; }
double to_d(Bf16 x) {
  const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
double to_d(F16 x) {
  const int e = (x.bits >> 10) & 0x1f, m = x.bits & 0x3ff;
  const double s = (x.bits & 0x8000) ? -1.0 : 1.0;
  if (e == 0) return s * std::ldexp(m, -24);
  if (e == 31) return m ? kNaN : s * kInf;
  return s * std::ldexp(1.0 + m / 1024.0, e - 15);
}
template <class P>
P from_d(double x);
template <>
float from_d<float>(double x) { return static_cast<float>(x); }
template <>
double from_d<double>(double x) { return x; }
template <>
Bf16 from_d<Bf16>(double x) {  // truncation: inputs only (any bf16 value will do)
  const float f = static_cast<float>(x);
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return Bf16{static_cast<uint16_t>(u >> 16)};
}
template <>
F16 from_d<F16>(double x) {  // truncation, tiny values flushed to 0: inputs only
  const float f = static_cast<float>(x);
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const int e = static_cast<int>((u >> 23) & 0xff) - 127;
  if (e < -14) return F16{static_cast<uint16_t>(sign)};
  if (e > 15) return F16{static_cast<uint16_t>(sign | 0x7bffu)};
  return F16{static_cast<uint16_t>(sign | (static_cast<uint32_t>(e + 15) << 10) | ((u >> 13) & 0x3ffu))};
}

template <class P>
struct GcInfo;
template <>
struct GcInfo<float> {
  using S = float;
  static constexpr DType dtype = DType::kFloat32;
  static constexpr const char* name = "f32";
  static constexpr double tol = kTol32;  // a few float roundings per element, state carried over steps
};
template <>
struct GcInfo<double> {
  using S = double;
  static constexpr DType dtype = DType::kFloat64;
  static constexpr const char* name = "f64";
  static constexpr double tol = kTol64;
};
template <>
struct GcInfo<Bf16> {
  using S = float;
  static constexpr DType dtype = DType::kBFloat16;
  static constexpr const char* name = "bf16";
  static constexpr double tol = 1.0 / 256;  // one rounding to bf16's 8-bit significand (<= 2^-9 relative)
};
template <>
struct GcInfo<F16> {
  using S = float;
  static constexpr DType dtype = DType::kFloat16;
  static constexpr const char* name = "f16";
  static constexpr double tol = 1.0 / 2048;  // one rounding to half's 11-bit significand (<= 2^-12 relative)
};

struct GcShape {
  int64_t rows, len;
  int gc;
};
const std::vector<GcShape> kGcSmall = {{1, 1, 1}, {3, 5, 1}, {7, 33, 1}, {13, 1, 1}, {2, 67, 1}, {1, 131, 0}, {5, 17, 0}};
// > 64 K elements: several row-aligned blocks, a single row longer than a block, a flat tensor
const std::vector<GcShape> kGcBig = {{300, 257, 1}, {1, 70001, 1}, {1, 70001, 0}, {3, 5, 1}};

template <class P>
struct GcTensors {
  using S = typename GcInfo<P>::S;
  std::vector<std::vector<P>> p, g;
  std::vector<std::vector<S>> b0, b1, b2;
  std::vector<std::vector<double>> rp, rb0, rb1, rb2;  // reference state
};

// Row means of x over the shapes' rows (per tensor), used when gc is set.
void center_rows(std::vector<double>& x, const GcShape& s) {
  for (int64_t r = 0; r < s.rows; ++r) {
    double m = 0;
    for (int64_t i = 0; i < s.len; ++i) m += x[static_cast<size_t>(r * s.len + i)];
    m /= static_cast<double>(s.len);
    for (int64_t i = 0; i < s.len; ++i) x[static_cast<size_t>(r * s.len + i)] -= m;
  }
}

template <class P, class S>
std::vector<double> widen_any(const std::vector<S>& v) {
  std::vector<double> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = to_d(v[i]);
  return o;
}

template <class P>
void gc_sgd_check(Rng& rng, const std::string& name, const std::vector<GcShape>& shapes, const pyeccv::GcSgdHyper& h,
                  int steps, int nt) {
  using S = typename GcInfo<P>::S;
  const size_t n = shapes.size();
  const bool mom = h.momentum != 0;
  GcTensors<P> t;
  for (const auto& s : shapes) {
    const size_t e = static_cast<size_t>(s.rows * s.len);
    std::vector<P> p(e);
    for (auto& x : p) x = from_d<P>(rng.normal());
    t.rp.push_back(widen_any<P>(p));
    t.p.push_back(p);
    t.b0.push_back(std::vector<S>(e, std::numeric_limits<S>::quiet_NaN()));  // created by step 0: poison
    t.rb0.push_back(std::vector<double>(e, 0.0));
  }
  for (int step = 0; step < steps; ++step) {
    std::vector<pyeccv::GcTensorRef> refs(n);
    t.g.clear();
    for (size_t k = 0; k < n; ++k) {
      std::vector<P> g(t.p[k].size());
      for (auto& x : g) x = from_d<P>(rng.normal());
      t.g.push_back(g);
    }
    for (size_t k = 0; k < n; ++k) {
      auto& r = refs[k];
      r.param = t.p[k].data();
      r.grad = t.g[k].data();
      r.buf0 = mom ? t.b0[k].data() : nullptr;
      r.rows = shapes[k].rows, r.row_len = shapes[k].len, r.gc = shapes[k].gc;
      r.init_buf = step == 0;
    }
    if (!no_throw(name, [&] { pyeccv::gc_sgd_cpu(refs.data(), static_cast<int64_t>(n), GcInfo<P>::dtype, h, nt); })) return;
    for (size_t k = 0; k < n; ++k) {  // the reference step in double
      std::vector<double> d = widen_any<P>(t.g[k]);
      auto& p = t.rp[k];
      auto& buf = t.rb0[k];
      for (size_t i = 0; i < d.size(); ++i) d[i] = (h.maximize ? -d[i] : d[i]) + h.weight_decay * p[i];
      if (shapes[k].gc) center_rows(d, shapes[k]);
      for (size_t i = 0; i < d.size(); ++i) {
        double di = d[i];
        if (mom) {
          buf[i] = step == 0 ? di : h.momentum * buf[i] + (1 - h.dampening) * di;
          di = h.nesterov ? di + h.momentum * buf[i] : buf[i];
        }
        p[i] -= h.lr * di;
      }
    }
  }
  std::vector<double> gp, rp, gb, rb;
  for (size_t k = 0; k < n; ++k) {
    const auto w = widen_any<P>(t.p[k]);
    gp.insert(gp.end(), w.begin(), w.end());
    rp.insert(rp.end(), t.rp[k].begin(), t.rp[k].end());
    if (mom) {
      const auto wb = widen_any<S>(t.b0[k]);
      gb.insert(gb.end(), wb.begin(), wb.end());
      rb.insert(rb.end(), t.rb0[k].begin(), t.rb0[k].end());
    }
  }
  std::vector<Part> parts{{"param", gp, rp}};
  if (mom) parts.push_back({"momentum_buffer", gb, rb});
  check_parts(name, parts, GcInfo<P>::tol);  // tolerance per storage type: see GcInfo
}

template <class P>
void gc_adam_check(Rng& rng, const std::string& name, const std::vector<GcShape>& shapes, const pyeccv::GcAdamHyper& h,
                   int steps, int nt) {
  using S = typename GcInfo<P>::S;
  const size_t n = shapes.size();
  const int t0 = 5;  // mid-training: non-trivial bias corrections and moments
  GcTensors<P> t;
  for (const auto& s : shapes) {
    const size_t e = static_cast<size_t>(s.rows * s.len);
    std::vector<P> p(e);
    for (auto& x : p) x = from_d<P>(rng.normal());
    std::vector<S> m(e), v(e), vm(e);
    for (size_t i = 0; i < e; ++i) {
      m[i] = static_cast<S>(0.1 * rng.normal());
      v[i] = static_cast<S>(rng.uni(1e-4, 1e-2));
      vm[i] = static_cast<S>(static_cast<double>(v[i]) + rng.uni(0, 2e-3) - 1e-3);
      if (vm[i] < 0) vm[i] = 0;
    }
    t.rp.push_back(widen_any<P>(p));
    t.rb0.push_back(widen_any<S>(m));
    t.rb1.push_back(widen_any<S>(v));
    t.rb2.push_back(widen_any<S>(vm));
    t.p.push_back(p), t.b0.push_back(m), t.b1.push_back(v), t.b2.push_back(vm);
  }
  for (int step = 0; step < steps; ++step) {
    const int ts = t0 + step;
    const double bc1 = 1 - std::pow(h.beta1, ts), bc2s = std::sqrt(1 - std::pow(h.beta2, ts)), step_size = h.lr / bc1;
    t.g.clear();
    for (size_t k = 0; k < n; ++k) {
      std::vector<P> g(t.p[k].size());
      for (auto& x : g) x = from_d<P>(0.3 * rng.normal());
      t.g.push_back(g);
    }
    std::vector<pyeccv::GcTensorRef> refs(n);
    for (size_t k = 0; k < n; ++k) {
      auto& r = refs[k];
      r.param = t.p[k].data();
      r.grad = t.g[k].data();
      r.buf0 = t.b0[k].data(), r.buf1 = t.b1[k].data(), r.buf2 = h.amsgrad ? t.b2[k].data() : nullptr;
      r.rows = shapes[k].rows, r.row_len = shapes[k].len, r.gc = shapes[k].gc;
      r.step_size = step_size, r.bc2_sqrt = bc2s;
    }
    if (!no_throw(name, [&] { pyeccv::gc_adam_cpu(refs.data(), static_cast<int64_t>(n), GcInfo<P>::dtype, h, nt); })) return;
    for (size_t k = 0; k < n; ++k) {
      std::vector<double> d = widen_any<P>(t.g[k]);
      auto &p = t.rp[k], &m = t.rb0[k], &v = t.rb1[k], &vm = t.rb2[k];
      for (size_t i = 0; i < d.size(); ++i) d[i] = (h.maximize ? -d[i] : d[i]) + (h.decoupled ? 0.0 : h.weight_decay * p[i]);
      if (shapes[k].gc && !h.gc_update) center_rows(d, shapes[k]);
      std::vector<double> u(d.size());
      for (size_t i = 0; i < d.size(); ++i) {
        m[i] = h.beta1 * m[i] + (1 - h.beta1) * d[i];
        v[i] = h.beta2 * v[i] + (1 - h.beta2) * d[i] * d[i];
        if (h.amsgrad) vm[i] = std::max(vm[i], v[i]);
        u[i] = m[i] / (std::sqrt(h.amsgrad ? vm[i] : v[i]) / bc2s + h.eps);
      }
      if (shapes[k].gc && h.gc_update) center_rows(u, shapes[k]);
      for (size_t i = 0; i < d.size(); ++i) p[i] = p[i] * (h.decoupled ? 1 - h.lr * h.weight_decay : 1.0) - step_size * u[i];
    }
  }
  std::vector<Part> parts{{"param", {}, {}}, {"exp_avg", {}, {}}, {"exp_avg_sq", {}, {}}};
  if (h.amsgrad) parts.push_back({"max_exp_avg_sq", {}, {}});
  for (size_t k = 0; k < n; ++k) {
    auto app = [](std::vector<double>& a, const std::vector<double>& b) { a.insert(a.end(), b.begin(), b.end()); };
    app(parts[0].got, widen_any<P>(t.p[k])), app(parts[0].ref, t.rp[k]);
    app(parts[1].got, widen_any<S>(t.b0[k])), app(parts[1].ref, t.rb0[k]);
    app(parts[2].got, widen_any<S>(t.b1[k])), app(parts[2].ref, t.rb1[k]);
    if (h.amsgrad) app(parts[3].got, widen_any<S>(t.b2[k])), app(parts[3].ref, t.rb2[k]);
  }
  check_parts(name, parts, GcInfo<P>::tol);  // tolerance per storage type: see GcInfo
}

template <class P>
void test_gc(Rng& rng, bool reduced_precision) {
  const std::string t = std::string(GcInfo<P>::name);
  const int steps = reduced_precision ? 1 : 3;  // bf16 / f16: one rounding of p per step; keep it to one
  pyeccv::GcSgdHyper plain;
  plain.lr = 0.1;
  gc_sgd_check<P>(rng, "gc_sgd " + t + " plain (no momentum)", kGcSmall, plain, steps, 1);
  pyeccv::GcSgdHyper mom;
  mom.lr = 0.05, mom.momentum = 0.9, mom.dampening = 0.1, mom.weight_decay = 1e-2;
  gc_sgd_check<P>(rng, "gc_sgd " + t + " momentum+dampening+wd", kGcSmall, mom, steps, 1);
  pyeccv::GcSgdHyper nest;
  nest.lr = 0.05, nest.momentum = 0.9, nest.weight_decay = 5e-4, nest.nesterov = true, nest.maximize = true;
  gc_sgd_check<P>(rng, "gc_sgd " + t + " nesterov+maximize", kGcSmall, nest, steps, 1);
  if (!reduced_precision) gc_sgd_check<P>(rng, "gc_sgd " + t + " momentum big omp2", kGcBig, mom, 2, 2);
  for (int key = 0; key < 8; ++key) {
    if (reduced_precision && key != 0 && key != 7) continue;
    pyeccv::GcAdamHyper h;
    h.lr = 1e-2;
    h.amsgrad = key & 4, h.decoupled = key & 2, h.gc_update = key & 1;
    h.weight_decay = h.decoupled ? 0.05 : 0.01;
    h.maximize = key == 3 || key == 6;
    const std::string f = fmt("gc_adam %s%s%s%s%s", t.c_str(), h.amsgrad ? " amsgrad" : "", h.decoupled ? " adamw" : " adam",
                              h.gc_update ? " gc_update" : " gc_grad", h.maximize ? " maximize" : "");
    gc_adam_check<P>(rng, f, kGcSmall, h, reduced_precision ? 1 : 2, 1);
  }
  if (!reduced_precision) {
    pyeccv::GcAdamHyper h;
    h.lr = 1e-2, h.weight_decay = 0.01, h.amsgrad = true;
    gc_adam_check<P>(rng, "gc_adam " + t + " amsgrad big omp2", kGcBig, h, 2, 2);
    h.gc_update = true, h.decoupled = true;
    gc_adam_check<P>(rng, "gc_adam " + t + " adamw gc_update big omp0", kGcBig, h, 1, 0);
  }
}

// =================================================================================================
// Volume rendering (volume_render.h)
// =================================================================================================
struct VrData {
  int64_t rays = 0, samples = 0;
  std::vector<int64_t> packed;             // (rays, 2)
  std::vector<double> vals, ts, te, rgbs;  // (samples,), (samples,), (samples,), (samples, 3)
  std::vector<double> bg;                  // empty, 3, or 3 * rays
  bool is_alpha = false, has_t = true, bg_per_ray = false;
  double eps = 0;
  std::vector<char> in_ray;  // the sample belongs to a ray
};

struct VrOut {
  std::vector<double> rgb, op, depth, w, tr, al;
};

// One ray of the naive compositing: weights / transmittance / alphas of its samples into o, and
// its rgb / opacity / depth.
void vr_naive_ray(const VrData& d, int64_t r, const double* vals, const double* rgbs, const double* bg, VrOut& o) {
  const int64_t s0 = d.packed[static_cast<size_t>(2 * r)], n = d.packed[static_cast<size_t>(2 * r + 1)];
  double T = 1, cum = 0, op = 0, c[3] = {0, 0, 0}, dep = 0;
  for (int64_t i = s0; i < s0 + n; ++i) {
    double a, Ti;
    if (d.is_alpha) {
      a = vals[i];
      Ti = T;
      T *= 1 - a;
    } else {
      const double tau = vals[i] * (d.te[static_cast<size_t>(i)] - d.ts[static_cast<size_t>(i)]);
      Ti = nexp(-cum);
      a = 1 - nexp(-tau);
      cum += tau;
    }
    const double w = (d.eps > 0 && Ti < d.eps) ? 0.0 : Ti * a;
    o.w[static_cast<size_t>(i)] = w, o.tr[static_cast<size_t>(i)] = Ti, o.al[static_cast<size_t>(i)] = a;
    op += w;
    for (int k = 0; k < 3; ++k) c[k] += w * rgbs[3 * i + k];
    if (d.has_t) dep += w * 0.5 * (d.ts[static_cast<size_t>(i)] + d.te[static_cast<size_t>(i)]);
  }
  for (int k = 0; k < 3; ++k) o.rgb[static_cast<size_t>(3 * r + k)] = c[k] + (bg ? (1 - op) * bg[k] : 0.0);
  o.op[static_cast<size_t>(r)] = op;
  o.depth[static_cast<size_t>(r)] = dep;
}

VrOut vr_naive(const VrData& d, const double* vals, const double* rgbs, const double* bg) {
  VrOut o;
  o.rgb.assign(static_cast<size_t>(3 * d.rays), 0);
  o.op.assign(static_cast<size_t>(d.rays), 0);
  o.depth.assign(static_cast<size_t>(d.rays), 0);
  o.w.assign(static_cast<size_t>(d.samples), kNaN);  // samples of no ray: never written
  o.tr = o.w, o.al = o.w;
  for (int64_t r = 0; r < d.rays; ++r)
    vr_naive_ray(d, r, vals, rgbs, bg ? bg + (d.bg_per_ray ? 3 * r : 0) : nullptr, o);
  return o;
}

// counts per ray; rays placed with gaps of 0-2 unowned samples, then listed in shuffled order.
// bg_mode 0: none, 1: shared (3,), 2: per ray.
VrData make_vr(Rng& rng, const std::vector<int64_t>& counts, bool is_alpha, bool has_t, int bg_mode, double eps,
               int64_t min_samples = 0) {
  for (int attempt = 0;; ++attempt) {
    VrData d;
    d.rays = static_cast<int64_t>(counts.size());
    d.is_alpha = is_alpha, d.has_t = has_t, d.bg_per_ray = bg_mode == 2, d.eps = eps;
    int64_t pos = 0;
    for (int64_t c : counts) {
      pos += rng.randint(3);
      d.packed.push_back(pos);
      d.packed.push_back(c);
      pos += c;
    }
    pos += rng.randint(2);
    d.samples = std::max(pos, min_samples);
    for (int64_t r = d.rays - 1; r > 0; --r) {  // rays in any order
      const int64_t q = rng.randint(r + 1);
      std::swap(d.packed[static_cast<size_t>(2 * r)], d.packed[static_cast<size_t>(2 * q)]);
      std::swap(d.packed[static_cast<size_t>(2 * r + 1)], d.packed[static_cast<size_t>(2 * q + 1)]);
    }
    const size_t S = static_cast<size_t>(d.samples);
    d.in_ray.assign(S, 0);
    for (int64_t r = 0; r < d.rays; ++r)
      for (int64_t i = 0; i < d.packed[static_cast<size_t>(2 * r + 1)]; ++i) d.in_ray[static_cast<size_t>(d.packed[static_cast<size_t>(2 * r)] + i)] = 1;
    d.vals.resize(S), d.ts.resize(S), d.te.resize(S), d.rgbs.resize(3 * S);
    double t = rng.uni(0.5, 1.0);
    for (size_t i = 0; i < S; ++i) {
      if (is_alpha) {
        const double u = rng.uni();
        d.vals[i] = u < 0.05 ? 0.0 : u < 0.08 ? 1.0 : rng.uni(0, 0.6);
      } else {
        d.vals[i] = rng.uni() < 0.1 ? 0.0 : rng.uni(0, 8);
      }
      const double dt = rng.uni() < 0.05 ? 0.0 : rng.uni(0.005, 0.15);
      d.ts[i] = t, d.te[i] = t + dt;
      t += dt;
      if (rng.uni() < 0.05) t = rng.uni(0.5, 1.0);  // a new ray's start now and then
      for (int k = 0; k < 3; ++k) d.rgbs[3 * i + k] = rng.uni();
    }
    if (bg_mode == 1) d.bg = rng.unis(3, 0, 1);
    if (bg_mode == 2) d.bg = rng.unis(static_cast<size_t>(3 * d.rays), 0, 1);
    if (eps <= 0) return d;
    // early stop: no transmittance within 1e-3 (relative) of eps, so the mask is stable under the
    // finite-difference steps and the float32 rounding
    const VrOut o = vr_naive(d, d.vals.data(), d.rgbs.data(), d.bg.empty() ? nullptr : d.bg.data());
    bool near = false;
    for (size_t i = 0; i < S; ++i)
      if (d.in_ray[i] && std::fabs(o.tr[i] / eps - 1) < 1e-3) near = true;
    if (!near || attempt > 20) return d;
  }
}

template <class T>
struct VrTyped {  // the kernel's copies (inputs rounded to T; the reference uses the same values)
  std::vector<T> vals, ts, te, rgbs, bg;
};
template <class T>
VrTyped<T> vr_round(VrData& d) {
  VrTyped<T> t;
  t.vals = cast<T>(d.vals), t.ts = cast<T>(d.ts), t.te = cast<T>(d.te), t.rgbs = cast<T>(d.rgbs), t.bg = cast<T>(d.bg);
  d.vals = widen(t.vals), d.ts = widen(t.ts), d.te = widen(t.te), d.rgbs = widen(t.rgbs), d.bg = widen(t.bg);
  return t;
}

template <class T>
pyeccv::VolumeRenderProblem vr_problem(const VrData& d, const VrTyped<T>& t) {
  pyeccv::VolumeRenderProblem p;
  p.dtype = TI<T>::dtype;
  p.rays = d.rays, p.samples = d.samples;
  p.packed_info = d.packed.data();
  p.values = t.vals.data();
  p.t_starts = d.has_t ? t.ts.data() : nullptr;
  p.t_ends = d.has_t ? t.te.data() : nullptr;
  p.is_alpha = d.is_alpha;
  p.early_stop_eps = d.eps;
  return p;
}

// Samples' entries where the sample is in no ray: NaN in the reference (must stay untouched).
std::vector<double> mask_unowned(std::vector<double> v, const VrData& d, int per) {
  for (size_t i = 0; i < d.in_ray.size(); ++i)
    if (!d.in_ray[i])
      for (int k = 0; k < per; ++k) v[i * per + k] = kNaN;
  return v;
}

// vr_forward_cpu + vr_backward_cpu vs the naive loops and central differences per ray.
template <class T>
void vr_check(Rng& rng, const std::string& name, const std::vector<int64_t>& counts, bool is_alpha, bool has_t, int bg_mode,
              double eps, bool with_gw, bool write_weights, int nt) {
  VrData d = make_vr(rng, counts, is_alpha, has_t, bg_mode, eps);
  const auto t = vr_round<T>(d);
  const auto p = vr_problem(d, t);
  const size_t R = static_cast<size_t>(d.rays), S = static_cast<size_t>(d.samples);
  const double* bgd = bg_mode ? d.bg.data() : nullptr;
  const T* bgt = bg_mode ? t.bg.data() : nullptr;
  auto rgb = poisoned<T>(3 * R), op = poisoned<T>(R), depth = poisoned<T>(R), w = poisoned<T>(S);
  bool ok = false;
  if (!no_throw(name + " fwd", [&] {
        ok = pyeccv::vr_forward_cpu(p, t.rgbs.data(), bgt, d.bg_per_ray, rgb.data(), op.data(), depth.data(),
                                    write_weights ? w.data() : nullptr, nt);
      }))
    return;
  const VrOut ref = vr_naive(d, d.vals.data(), d.rgbs.data(), bgd);
  std::vector<Part> parts{{"rgb", widen(rgb), ref.rgb}, {"opacity", widen(op), ref.op}, {"depth", widen(depth), ref.depth}};
  if (write_weights) parts.push_back({"weights", widen(w), ref.w});
  if (!ok) record(false, name + " fwd", "returned false (negative interval) on valid input");
  // f32: a running sum of tau / product of (1 - alpha) along rays of up to ~100 samples -> kTol32
  else check_parts(name + " fwd", parts, tol<T>(kTol32, kTol64));

  // backward: L = sum g_rgb . rgb + g_op op + g_depth depth + g_w . w
  const auto g_rgb = rounded<T>(rng.normals(3 * R)), g_op = rounded<T>(rng.normals(R)), g_d = rounded<T>(rng.normals(R));
  const auto g_w = rounded<T>(rng.normals(S));
  const auto g_rgbT = cast<T>(g_rgb), g_opT = cast<T>(g_op), g_dT = cast<T>(g_d), g_wT = cast<T>(g_w);
  auto dv = poisoned<T>(S), dc = poisoned<T>(3 * S);
  auto db = poisoned<T>(bg_mode ? d.bg.size() : 0);
  if (!no_throw(name + " bwd", [&] {
        pyeccv::vr_backward_cpu(p, t.rgbs.data(), bgt, d.bg_per_ray, g_rgbT.data(), g_opT.data(),
                                has_t ? g_dT.data() : nullptr, with_gw ? g_wT.data() : nullptr, dv.data(), dc.data(),
                                bg_mode ? db.data() : nullptr, nt);
      }))
    return;
  // central differences of the naive loss; a sample's values only reach its own ray
  std::vector<double> vals = d.vals, rgbs = d.rgbs, bg = d.bg;
  VrOut scratch = ref;
  auto ray_loss = [&](int64_t r) {
    vr_naive_ray(d, r, vals.data(), rgbs.data(), bg_mode ? bg.data() + (d.bg_per_ray ? 3 * r : 0) : nullptr, scratch);
    double L = g_op[static_cast<size_t>(r)] * scratch.op[static_cast<size_t>(r)];
    for (int k = 0; k < 3; ++k) L += g_rgb[static_cast<size_t>(3 * r + k)] * scratch.rgb[static_cast<size_t>(3 * r + k)];
    if (has_t) L += g_d[static_cast<size_t>(r)] * scratch.depth[static_cast<size_t>(r)];
    if (with_gw) {
      const int64_t s0 = d.packed[static_cast<size_t>(2 * r)], n = d.packed[static_cast<size_t>(2 * r + 1)];
      for (int64_t i = s0; i < s0 + n; ++i) L += g_w[static_cast<size_t>(i)] * scratch.w[static_cast<size_t>(i)];
    }
    return L;
  };
  auto fd_at = [&](double& x, const std::function<double()>& loss) {
    const double x0 = x;
    x = x0 + kFdStep;
    const double lp = loss();
    x = x0 - kFdStep;
    const double lm = loss();
    x = x0;
    return (lp - lm) / (2 * kFdStep);
  };
  std::vector<double> fdv(S, kNaN), fdc(3 * S, kNaN), fdb(d.bg.size(), 0.0);
  for (int64_t r = 0; r < d.rays; ++r) {
    const int64_t s0 = d.packed[static_cast<size_t>(2 * r)], n = d.packed[static_cast<size_t>(2 * r + 1)];
    for (int64_t i = s0; i < s0 + n; ++i) {
      fdv[static_cast<size_t>(i)] = fd_at(vals[static_cast<size_t>(i)], [&] { return ray_loss(r); });
      for (int k = 0; k < 3; ++k) fdc[static_cast<size_t>(3 * i + k)] = fd_at(rgbs[static_cast<size_t>(3 * i + k)], [&] { return ray_loss(r); });
    }
    if (bg_mode == 2)
      for (int k = 0; k < 3; ++k) fdb[static_cast<size_t>(3 * r + k)] = fd_at(bg[static_cast<size_t>(3 * r + k)], [&] { return ray_loss(r); });
  }
  if (bg_mode == 1)
    for (int k = 0; k < 3; ++k)
      fdb[static_cast<size_t>(k)] = fd_at(bg[static_cast<size_t>(k)], [&] {
        double L = 0;
        for (int64_t r = 0; r < d.rays; ++r) L += ray_loss(r);
        return L;
      });
  std::vector<Part> bparts{{"d_values", widen(dv), fdv}, {"d_rgbs", widen(dc), fdc}};
  if (bg_mode) bparts.push_back({"d_background", widen(db), fdb});
  // f64: vs central differences (kTolFD); f32: float rounding dominates (kTol32)
  check_parts(name + " bwd vs finite differences", bparts, tol<T>(kTol32, kTolFD));
}

// render_weights_cpu + render_weights_backward_cpu.
template <class T>
void rw_check(Rng& rng, const std::string& name, const std::vector<int64_t>& counts, bool is_alpha, double eps, int nt) {
  VrData d = make_vr(rng, counts, is_alpha, true, 0, eps);
  const auto t = vr_round<T>(d);
  const auto p = vr_problem(d, t);
  const size_t S = static_cast<size_t>(d.samples);
  auto w = poisoned<T>(S), tr = poisoned<T>(S), al = poisoned<T>(S);
  bool ok = false;
  if (!no_throw(name + " fwd", [&] { ok = pyeccv::render_weights_cpu(p, w.data(), tr.data(), al.data(), nt); })) return;
  const VrOut ref = vr_naive(d, d.vals.data(), d.rgbs.data(), nullptr);
  if (!ok) record(false, name + " fwd", "returned false (negative interval) on valid input");
  // f32: see vr_check
  else check_parts(name + " fwd", {{"weights", widen(w), ref.w}, {"transmittance", widen(tr), ref.tr}, {"alphas", widen(al), ref.al}},
                   tol<T>(kTol32, kTol64));
  const auto gw = rounded<T>(rng.normals(S)), gt = rounded<T>(rng.normals(S)), ga = rounded<T>(rng.normals(S));
  const auto gwT = cast<T>(gw), gtT = cast<T>(gt), gaT = cast<T>(ga);
  auto dv = poisoned<T>(S);
  if (!no_throw(name + " bwd", [&] { pyeccv::render_weights_backward_cpu(p, gwT.data(), gtT.data(), gaT.data(), dv.data(), nt); }))
    return;
  std::vector<double> vals = d.vals;
  VrOut scratch = ref;
  std::vector<double> fdv(S, kNaN);
  for (int64_t r = 0; r < d.rays; ++r) {
    const int64_t s0 = d.packed[static_cast<size_t>(2 * r)], n = d.packed[static_cast<size_t>(2 * r + 1)];
    auto loss = [&] {
      vr_naive_ray(d, r, vals.data(), d.rgbs.data(), nullptr, scratch);
      double L = 0;
      for (int64_t i = s0; i < s0 + n; ++i)
        L += gw[static_cast<size_t>(i)] * scratch.w[static_cast<size_t>(i)] + gt[static_cast<size_t>(i)] * scratch.tr[static_cast<size_t>(i)] +
             ga[static_cast<size_t>(i)] * scratch.al[static_cast<size_t>(i)];
      return L;
    };
    for (int64_t i = s0; i < s0 + n; ++i) {
      double& x = vals[static_cast<size_t>(i)];
      const double x0 = x;
      x = x0 + kFdStep;
      const double lp = loss();
      x = x0 - kFdStep;
      const double lm = loss();
      x = x0;
      fdv[static_cast<size_t>(i)] = (lp - lm) / (2 * kFdStep);
    }
  }
  // f64: vs central differences (kTolFD); f32: float rounding dominates (kTol32)
  check_parts(name + " bwd vs finite differences", {{"d_values", widen(dv), fdv}}, tol<T>(kTol32, kTolFD));
}

// Many rays, over the threading threshold (>= 32768 samples): forward vs naive, backward with 2
// threads vs 1 thread (every per-ray quantity is computed the same way: bitwise equal), and a
// second 2-thread run.
template <class T>
void vr_big_check(Rng& rng, const std::string& name) {
  std::vector<int64_t> counts(1100);
  for (auto& c : counts) c = rng.randint(61);
  VrData d = make_vr(rng, counts, false, true, 1, 1e-4, 32768 + 7);
  const auto t = vr_round<T>(d);
  const auto p = vr_problem(d, t);
  const size_t R = static_cast<size_t>(d.rays), S = static_cast<size_t>(d.samples);
  auto rgb = poisoned<T>(3 * R), op = poisoned<T>(R), depth = poisoned<T>(R), w = poisoned<T>(S);
  bool ok = false;
  if (!no_throw(name + " fwd", [&] {
        ok = pyeccv::vr_forward_cpu(p, t.rgbs.data(), t.bg.data(), false, rgb.data(), op.data(), depth.data(), w.data(), 2);
      }))
    return;
  const VrOut ref = vr_naive(d, d.vals.data(), d.rgbs.data(), d.bg.data());
  // see vr_check
  if (!ok) record(false, name + " fwd", "returned false on valid input");
  else check_parts(name + " fwd", {{"rgb", widen(rgb), ref.rgb}, {"opacity", widen(op), ref.op}, {"depth", widen(depth), ref.depth}, {"weights", widen(w), ref.w}},
                   tol<T>(kTol32, kTol64));
  const auto g_rgb = cast<T>(rng.normals(3 * R)), g_op = cast<T>(rng.normals(R)), g_d = cast<T>(rng.normals(R));
  std::vector<std::vector<T>> dv(3), dc(3), db(3);
  const int nts[3] = {1, 2, 2};
  for (int k = 0; k < 3; ++k) {
    dv[k] = poisoned<T>(S), dc[k] = poisoned<T>(3 * S), db[k] = poisoned<T>(3);
    if (!no_throw(name + " bwd", [&] {
          pyeccv::vr_backward_cpu(p, t.rgbs.data(), t.bg.data(), false, g_rgb.data(), g_op.data(), g_d.data(), nullptr,
                                  dv[k].data(), dc[k].data(), db[k].data(), nts[k]);
        }))
      return;
  }
  const auto own = [&](const std::vector<T>& v, int per) { return mask_unowned(widen(v), d, per); };
  // per-ray results do not depend on the thread count: exact
  check_parts(name + " bwd omp2 vs serial (per-ray, exact)", {{"d_values", own(dv[1], 1), own(dv[0], 1)}, {"d_rgbs", own(dc[1], 3), own(dc[0], 3)}}, 0.0);
  // the shared background gradient: per-thread partial sums, another summation order
  check_parts(name + " bwd omp2 vs serial (shared d_background)", {{"d_background", widen(db[1]), widen(db[0])}}, tol<T>(1e-5, 1e-12));
  // per-ray results are repeatable bit for bit; the shared background gradient is not promised to
  // be (rays go to threads by a dynamic schedule, so its per-thread partial sums vary run to run)
  check_parts(name + " bwd omp2 repeatable (per-ray, bitwise)", {{"d_values", own(dv[2], 1), own(dv[1], 1)}, {"d_rgbs", own(dc[2], 3), own(dc[1], 3)}}, 0.0);
  check_parts(name + " bwd omp2 repeatable (shared d_background)", {{"d_background", widen(db[2]), widen(db[1])}}, tol<T>(1e-5, 1e-12));
}

template <class T>
void test_vr(Rng& rng) {
  const std::string t = "volume_render " + std::string(TI<T>::name);
  const std::vector<int64_t> mixed = {0, 1, 2, 5, 31, 32, 33, 67, 3, 100};
  vr_check<T>(rng, t + " density bg-shared", mixed, false, true, 1, 0.0, false, true, 1);
  vr_check<T>(rng, t + " density bg-per-ray eps1e-2 g_weights", mixed, false, true, 2, 1e-2, true, true, 1);
  vr_check<T>(rng, t + " density no-bg no-weights omp0", {7, 40, 1, 0, 13}, false, true, 0, 0.0, false, false, 0);
  vr_check<T>(rng, t + " alpha with t no-bg", mixed, true, true, 0, 0.0, true, true, 1);
  vr_check<T>(rng, t + " alpha no-t bg-shared eps1e-3", mixed, true, false, 1, 1e-3, true, true, 2);
  rw_check<T>(rng, "render_weights " + std::string(TI<T>::name) + " density", mixed, false, 0.0, 1);
  rw_check<T>(rng, "render_weights " + std::string(TI<T>::name) + " density eps1e-2", mixed, false, 1e-2, 1);
  rw_check<T>(rng, "render_weights " + std::string(TI<T>::name) + " alpha eps1e-3", mixed, true, 1e-3, 2);
  vr_big_check<T>(rng, t + " 1100 rays omp2");
  {  // a negative interval is reported
    VrData d = make_vr(rng, {4, 6}, false, true, 0, 0.0);
    const int64_t i = d.packed[3 - 1 + 0] + 2;  // ray 1's third sample
    std::swap(d.ts[static_cast<size_t>(i)], d.te[static_cast<size_t>(i)]);
    d.te[static_cast<size_t>(i)] -= 0.01;
    const auto tt = vr_round<T>(d);
    const auto p = vr_problem(d, tt);
    auto a = poisoned<T>(3 * 2), b = poisoned<T>(2), c = poisoned<T>(2), w = poisoned<T>(static_cast<size_t>(d.samples));
    auto x = poisoned<T>(static_cast<size_t>(d.samples)), y = poisoned<T>(static_cast<size_t>(d.samples));
    bool r1 = true, r2 = true;
    if (no_throw(t + " negative interval", [&] {
          r1 = pyeccv::vr_forward_cpu(p, tt.rgbs.data(), nullptr, false, a.data(), b.data(), c.data(), w.data(), 1);
          r2 = pyeccv::render_weights_cpu(p, w.data(), x.data(), y.data(), 1);
        }))
      record(!r1 && !r2, t + " negative interval reported", fmt("vr_forward_cpu -> %d, render_weights_cpu -> %d (want 0, 0)", r1, r2));
  }
}

void test_vr_check_packed() {
  auto run = [](const std::vector<int64_t>& pi, int64_t samples, int64_t want, bool want_order, bool want_cover,
                const std::string& what) {
    bool o = !want_order, c = !want_cover;
    const int64_t got = pyeccv::vr_check_packed(pi.data(), static_cast<int64_t>(pi.size() / 2), samples, &o, &c);
    record(got == want && o == want_order && c == want_cover, "vr_check_packed " + what,
           fmt("bad ray %lld (want %lld), in_order %d (want %d), covered %d (want %d)", static_cast<long long>(got),
               static_cast<long long>(want), o, want_order, c, want_cover));
  };
  run({0, 3, 3, 0, 3, 4}, 7, -1, true, true, "in order, covering");
  run({3, 4, 0, 3}, 7, -1, false, true, "out of order");
  run({0, 3, 4, 2}, 7, -1, true, false, "gap");
  run({0, 3, 2, 2}, 7, -1, false, false, "overlap");
  run({0, 3, 5, 3}, 7, 1, false, false, "ray past the end");
  run({0, 3, -1, 2}, 7, 1, false, false, "negative start");
}

// =================================================================================================
// CondInst dynamic mask head (cond_mask_head.h)
// =================================================================================================
struct CmhData {
  int64_t N = 0, C = 0, H = 0, W = 0, I = 0;
  int L = 3, ch = 8, stride = 8;
  bool rel = true;
  std::vector<double> feats, params;
  std::vector<int64_t> im;
  std::vector<float> loc, soi;
  int64_t P = 0;
  std::vector<int> dims;                   // L + 1 layer widths
  std::vector<int64_t> woff, boff;         // per layer
};

CmhData make_cmh(Rng& rng, int64_t N, int64_t C, int64_t H, int64_t W, int64_t I, int L, int ch, bool rel, int stride,
                 const std::vector<int64_t>& images_used) {
  CmhData d;
  d.N = N, d.C = C, d.H = H, d.W = W, d.I = I, d.L = L, d.ch = ch, d.rel = rel, d.stride = stride;
  d.dims.push_back(static_cast<int>(C + (rel ? 2 : 0)));
  for (int l = 1; l < L; ++l) d.dims.push_back(ch);
  d.dims.push_back(1);
  int64_t o = 0;
  for (int l = 0; l < L; ++l) d.woff.push_back(o), o += static_cast<int64_t>(d.dims[l]) * d.dims[l + 1];
  for (int l = 0; l < L; ++l) d.boff.push_back(o), o += d.dims[l + 1];
  d.P = o;
  d.feats = rng.normals(static_cast<size_t>(N * C * H * W));
  d.params = rng.normals(static_cast<size_t>(I * d.P), 0.6);
  for (int64_t i = 0; i < I; ++i) {
    d.im.push_back(images_used[static_cast<size_t>(rng.randint(static_cast<int64_t>(images_used.size())))]);
    d.loc.push_back(static_cast<float>(rng.uni(0, static_cast<double>(W * stride))));
    d.loc.push_back(static_cast<float>(rng.uni(0, static_cast<double>(H * stride))));
    d.soi.push_back(static_cast<float>(rng.uni(20, 300)));
  }
  return d;
}

// Instance i at pixel (y, x): the logit; with go != 0, backprop go into dfeats / dparams.
double cmh_naive_pixel(const CmhData& d, const double* feats, const double* params, int64_t i, int64_t y, int64_t x,
                       double go, double* dfeats, double* dparams) {
  const int L = d.L;
  std::vector<std::vector<double>> h(static_cast<size_t>(L + 1));
  h[0].resize(static_cast<size_t>(d.dims[0]));
  const int64_t n = d.im[static_cast<size_t>(i)], HW = d.H * d.W;
  int off = 0;
  if (d.rel) {  // float32 as AdelaiDet: (location - pixel centre) / soi
    const float px = static_cast<float>(d.stride * x + d.stride / 2), py = static_cast<float>(d.stride * y + d.stride / 2);
    const float lx = d.loc[static_cast<size_t>(2 * i)], ly = d.loc[static_cast<size_t>(2 * i + 1)], s = d.soi[static_cast<size_t>(i)];
    const float rx = (lx - px) / s, ry = (ly - py) / s;
    h[0][0] = rx, h[0][1] = ry;
    off = 2;
  }
  for (int64_t c = 0; c < d.C; ++c) h[0][static_cast<size_t>(off + c)] = feats[(n * d.C + c) * HW + y * d.W + x];
  const double* prm = params + i * d.P;
  for (int l = 0; l < L; ++l) {
    const int nin = d.dims[l], nout = d.dims[l + 1];
    h[static_cast<size_t>(l + 1)].assign(static_cast<size_t>(nout), 0.0);
    for (int o = 0; o < nout; ++o) {
      double z = prm[d.boff[static_cast<size_t>(l)] + o];
      for (int k = 0; k < nin; ++k) z += prm[d.woff[static_cast<size_t>(l)] + o * nin + k] * h[static_cast<size_t>(l)][static_cast<size_t>(k)];
      h[static_cast<size_t>(l + 1)][static_cast<size_t>(o)] = (l < L - 1) ? std::max(z, 0.0) : z;
    }
  }
  const double out = h[static_cast<size_t>(L)][0];
  if (go != 0 && dfeats && dparams) {
    double* dp = dparams + i * d.P;
    std::vector<double> dz{go};
    for (int l = L - 1; l >= 0; --l) {
      const int nin = d.dims[l], nout = d.dims[l + 1];
      std::vector<double> dh(static_cast<size_t>(nin), 0.0);
      for (int o = 0; o < nout; ++o) {
        dp[d.boff[static_cast<size_t>(l)] + o] += dz[static_cast<size_t>(o)];
        for (int k = 0; k < nin; ++k) {
          dp[d.woff[static_cast<size_t>(l)] + o * nin + k] += dz[static_cast<size_t>(o)] * h[static_cast<size_t>(l)][static_cast<size_t>(k)];
          dh[static_cast<size_t>(k)] += prm[d.woff[static_cast<size_t>(l)] + o * nin + k] * dz[static_cast<size_t>(o)];
        }
      }
      if (l > 0) {  // through the ReLU that made h[l]
        for (int k = 0; k < nin; ++k)
          if (!(h[static_cast<size_t>(l)][static_cast<size_t>(k)] > 0)) dh[static_cast<size_t>(k)] = 0;
        dz = dh;
      } else {
        for (int64_t c = 0; c < d.C; ++c) dfeats[(n * d.C + c) * HW + y * d.W + x] += dh[static_cast<size_t>(off + c)];
      }
    }
  }
  return out;
}

std::vector<double> cmh_naive_forward(const CmhData& d, const double* feats, const double* params) {
  std::vector<double> out(static_cast<size_t>(d.I * d.H * d.W));
  for (int64_t i = 0; i < d.I; ++i)
    for (int64_t y = 0; y < d.H; ++y)
      for (int64_t x = 0; x < d.W; ++x)
        out[static_cast<size_t>((i * d.H + y) * d.W + x)] = cmh_naive_pixel(d, feats, params, i, y, x, 0, nullptr, nullptr);
  return out;
}

template <class T>
pyeccv::CondMaskHeadProblem cmh_problem(const CmhData& d, const std::vector<T>& f, const std::vector<T>& pr) {
  pyeccv::CondMaskHeadProblem p;
  p.dtype = TI<T>::dtype;
  p.images = d.N, p.in_channels = d.C, p.height = d.H, p.width = d.W, p.instances = d.I;
  p.num_layers = d.L, p.channels = d.ch, p.rel_coords = d.rel, p.stride = d.stride;
  p.feats = f.data(), p.params = pr.data();
  p.im_inds = d.im.data(), p.locations = d.loc.data(), p.soi = d.soi.data();
  return p;
}

template <class T>
void cmh_check(Rng& rng, const std::string& name, int64_t N, int64_t C, int64_t H, int64_t W, int64_t I, int L, int ch,
               bool rel, int stride, const std::vector<int64_t>& used, int nt) {
  CmhData d = make_cmh(rng, N, C, H, W, I, L, ch, rel, stride, used);
  const auto fT = cast<T>(d.feats), pT = cast<T>(d.params);
  d.feats = widen(fT), d.params = widen(pT);
  const auto p = cmh_problem(d, fT, pT);
  const int64_t np = pyeccv::cmh_num_params(C, ch, L, rel);
  if (np != d.P) {
    record(false, name + " num_params", fmt("cmh_num_params %lld, expected %lld", static_cast<long long>(np), static_cast<long long>(d.P)));
    return;
  }
  auto out = poisoned<T>(static_cast<size_t>(I * H * W));
  if (!no_throw(name + " fwd", [&] { pyeccv::cmh_forward_cpu(p, out.data(), nt); })) return;
  // f32: an MLP of a few layers of <= 10-term dot products -> kTol32
  check_parts(name + " fwd", {{"logits", widen(out), cmh_naive_forward(d, d.feats.data(), d.params.data())}}, tol<T>(kTol32, kTol64));
  const auto g = rounded<T>(rng.normals(static_cast<size_t>(I * H * W)));
  const auto gT = cast<T>(g);
  auto df = poisoned<T>(d.feats.size()), dp = poisoned<T>(d.params.size());
  if (!no_throw(name + " bwd", [&] { pyeccv::cmh_backward_cpu(p, gT.data(), df.data(), dp.data(), nt); })) return;
  std::vector<double> rdf(d.feats.size(), 0.0), rdp(d.params.size(), 0.0);
  for (int64_t i = 0; i < I; ++i)
    for (int64_t y = 0; y < H; ++y)
      for (int64_t x = 0; x < W; ++x)
        cmh_naive_pixel(d, d.feats.data(), d.params.data(), i, y, x, g[static_cast<size_t>((i * H + y) * W + x)], rdf.data(), rdp.data());
  // analytic naive backprop; d_params sums over all pixels of an instance -> kTol32 in f32
  check_parts(name + " bwd", {{"d_feats", widen(df), rdf}, {"d_params", widen(dp), rdp}}, tol<T>(kTol32, kTol64));
  std::vector<char> empty_image(d.feats.size(), 1);  // feature gradients of images without instances
  for (int64_t i = 0; i < I; ++i)
    std::fill(empty_image.begin() + d.im[static_cast<size_t>(i)] * C * H * W, empty_image.begin() + (d.im[static_cast<size_t>(i)] + 1) * C * H * W, 0);
  if (std::count(empty_image.begin(), empty_image.end(), 1) > 0)
    check_exact_zeros(name + " bwd d_feats of images without instances", widen(df), empty_image);
  if (nt != 1) {  // deterministic for a given thread count
    auto df2 = poisoned<T>(d.feats.size()), dp2 = poisoned<T>(d.params.size());
    if (!no_throw(name + " bwd repeat", [&] { pyeccv::cmh_backward_cpu(p, gT.data(), df2.data(), dp2.data(), nt); })) return;
    check_parts(name + " bwd repeatable (bitwise)", {{"d_feats", widen(df2), widen(df)}, {"d_params", widen(dp2), widen(dp)}}, 0.0);
  }
}

void cmh_fd_check(Rng& rng) {
  const std::string name = "cond_mask_head f64 bwd vs finite differences";
  CmhData d = make_cmh(rng, 2, 2, 3, 4, 3, 3, 3, true, 4, {0, 1});
  const auto p = cmh_problem(d, d.feats, d.params);
  const auto g = rng.normals(static_cast<size_t>(d.I * d.H * d.W));
  auto df = poisoned<double>(d.feats.size()), dp = poisoned<double>(d.params.size());
  if (!no_throw(name, [&] { pyeccv::cmh_backward_cpu(p, g.data(), df.data(), dp.data(), 1); })) return;
  auto loss = [&](const std::vector<double>& f, const std::vector<double>& pr) {
    const auto o = cmh_naive_forward(d, f.data(), pr.data());
    double L = 0;
    for (size_t k = 0; k < o.size(); ++k) L += g[k] * o[k];
    return L;
  };
  const auto fdf = fd_grad([&](const std::vector<double>& f) { return loss(f, d.params); }, d.feats);
  const auto fdp = fd_grad([&](const std::vector<double>& pr) { return loss(d.feats, pr); }, d.params);
  check_parts(name, {{"d_feats", df, fdf}, {"d_params", dp, fdp}}, kTolFD);  // see kTolFD
}

template <class T>
void test_cmh(Rng& rng) {
  const std::string t = "cond_mask_head " + std::string(TI<T>::name);
  cmh_check<T>(rng, t + " default head 10-8-8-1 H5 W7", 2, 8, 5, 7, 3, 3, 8, true, 8, {0, 1}, 1);
  cmh_check<T>(rng, t + " no coords 8-8-8-1, empty image", 3, 8, 6, 5, 4, 3, 8, false, 8, {0, 2}, 1);
  cmh_check<T>(rng, t + " generic L4 ch5 C3 stride3 H17 W19 (2 tiles)", 3, 3, 17, 19, 5, 4, 5, true, 3, {0, 2}, 1);
  cmh_check<T>(rng, t + " L2 ch1 C1 H1 W1", 1, 1, 1, 1, 2, 2, 1, true, 8, {0}, 1);
  cmh_check<T>(rng, t + " default head omp2 I8 H16 W13", 2, 8, 16, 13, 8, 3, 8, true, 8, {0, 1}, 2);
  cmh_check<T>(rng, t + " generic omp0 L3 ch6 C5 H18 W15", 3, 5, 18, 15, 9, 3, 6, true, 4, {0, 1, 2}, 0);
  cmh_check<T>(rng, t + " no instances", 2, 4, 3, 3, 0, 3, 8, true, 8, {0}, 1);
}

// =================================================================================================
// Dynamic Group Convolution (dyn_group_conv.h)
// =================================================================================================
struct DgcGeo {
  int64_t B, C, H, W, Co, heads, kh, kw, keep, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  int64_t Ho() const { return (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1; }
  int64_t Wo() const { return (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1; }
  std::string str() const {
    return fmt("B%lld C%lld %lldx%lld Co%lld heads%lld k%lldx%lld keep%lld s%lld,%lld p%lld,%lld d%lld,%lld", (long long)B, (long long)C,
               (long long)H, (long long)W, (long long)Co, (long long)heads, (long long)kh, (long long)kw, (long long)keep,
               (long long)sh, (long long)sw, (long long)ph, (long long)pw, (long long)dh, (long long)dw);
  }
};

// kept[(b * heads + h) * C + c]: the official rule (ties at the threshold all dropped).
std::vector<char> dgc_kept(const DgcGeo& g, const double* s) {
  std::vector<char> k(static_cast<size_t>(g.B * g.heads * g.C), 1);
  if (g.keep >= g.C) return k;
  for (int64_t r = 0; r < g.B * g.heads; ++r) {
    std::vector<double> row(s + r * g.C, s + (r + 1) * g.C);
    std::sort(row.begin(), row.end());
    const double t = row[static_cast<size_t>(g.C - g.keep - 1)];  // the largest of the C - keep smallest
    for (int64_t c = 0; c < g.C; ++c) k[static_cast<size_t>(r * g.C + c)] = s[r * g.C + c] > t;
  }
  return k;
}

// Visits every (output element, kept channel, tap, input element) term of the convolution.
template <class F>
void dgc_terms(const DgcGeo& g, const std::vector<char>& kept, F&& f) {
  const int64_t co = g.Co / g.heads, Ho = g.Ho(), Wo = g.Wo();
  for (int64_t b = 0; b < g.B; ++b)
    for (int64_t h = 0; h < g.heads; ++h)
      for (int64_t c = 0; c < g.C; ++c) {
        if (!kept[static_cast<size_t>((b * g.heads + h) * g.C + c)]) continue;
        for (int64_t j = 0; j < co; ++j) {
          const int64_t oc = j * g.heads + h, row = h * co + j;
          for (int64_t dy = 0; dy < g.kh; ++dy)
            for (int64_t dx = 0; dx < g.kw; ++dx)
              for (int64_t oy = 0; oy < Ho; ++oy) {
                const int64_t iy = oy * g.sh - g.ph + dy * g.dh;
                if (iy < 0 || iy >= g.H) continue;
                for (int64_t ox = 0; ox < Wo; ++ox) {
                  const int64_t ix = ox * g.sw - g.pw + dx * g.dw;
                  if (ix < 0 || ix >= g.W) continue;
                  f(((b * g.Co + oc) * Ho + oy) * Wo + ox,              // output
                    ((b * g.C + c) * g.H + iy) * g.W + ix,              // input
                    ((row * g.C + c) * g.kh + dy) * g.kw + dx,          // weight
                    (b * g.heads + h) * g.C + c);                       // saliency
                }
              }
        }
      }
}

std::vector<double> dgc_naive(const DgcGeo& g, const std::vector<double>& x, const std::vector<double>& w,
                              const std::vector<double>& s, const std::vector<char>& kept) {
  std::vector<double> out(static_cast<size_t>(g.B * g.Co * g.Ho() * g.Wo()), 0.0);
  dgc_terms(g, kept, [&](int64_t o, int64_t i, int64_t k, int64_t si) { out[static_cast<size_t>(o)] += w[static_cast<size_t>(k)] * s[static_cast<size_t>(si)] * x[static_cast<size_t>(i)]; });
  return out;
}

struct DgcData {
  DgcGeo g;
  std::vector<double> x, w, s;
};
DgcData make_dgc(Rng& rng, const DgcGeo& g, bool ties) {
  DgcData d{g, rng.normals(static_cast<size_t>(g.B * g.C * g.H * g.W)), rng.normals(static_cast<size_t>(g.Co * g.C * g.kh * g.kw), 0.3), {}};
  d.s.resize(static_cast<size_t>(g.B * g.heads * g.C));
  for (auto& v : d.s) v = ties ? 0.5 * static_cast<double>(rng.randint(3)) : rng.uni(0, 2);
  return d;
}

template <class T>
pyeccv::DynGroupConvProblem dgc_problem(const DgcGeo& g, const std::vector<T>& x, const std::vector<T>& w, const std::vector<T>& s) {
  pyeccv::DynGroupConvProblem p;
  p.dtype = TI<T>::dtype;
  p.batch = g.B, p.in_channels = g.C, p.height = g.H, p.width = g.W, p.out_channels = g.Co;
  p.heads = g.heads, p.kh = g.kh, p.kw = g.kw, p.keep = g.keep;
  p.stride_h = g.sh, p.stride_w = g.sw, p.pad_h = g.ph, p.pad_w = g.pw, p.dil_h = g.dh, p.dil_w = g.dw;
  p.x = x.data(), p.weight = w.data(), p.saliency = s.data();
  return p;
}

template <class T>
void dgc_check(Rng& rng, const std::string& label, const DgcGeo& g, bool ties, int nt) {
  const std::string name = "dyn_group_conv " + std::string(TI<T>::name) + " " + label + " (" + g.str() + ")";
  DgcData d = make_dgc(rng, g, ties);
  const auto xT = cast<T>(d.x), wT = cast<T>(d.w), sT = cast<T>(d.s);
  d.x = widen(xT), d.w = widen(wT), d.s = widen(sT);
  const auto p = dgc_problem(g, xT, wT, sT);
  const int64_t Ho = g.Ho(), Wo = g.Wo();
  if (pyeccv::dgc_out_size(g.H, g.kh, g.sh, g.ph, g.dh) != Ho || pyeccv::dgc_out_size(g.W, g.kw, g.sw, g.pw, g.dw) != Wo) {
    record(false, name + " out size", "dgc_out_size disagrees with conv2d's formula");
    return;
  }
  const auto kept = dgc_kept(g, d.s.data());
  auto out = poisoned<T>(static_cast<size_t>(g.B * g.Co * Ho * Wo));
  if (!no_throw(name + " fwd", [&] { pyeccv::dgc_forward_cpu(p, out.data(), nt); })) return;
  // f32: dot products of keep * kh * kw (up to ~100) terms -> kTol32
  check_parts(name + " fwd", {{"out", widen(out), dgc_naive(g, d.x, d.w, d.s, kept)}}, tol<T>(kTol32, kTol64));
  const auto go = rounded<T>(rng.normals(out.size()));
  const auto goT = cast<T>(go);
  auto dx = poisoned<T>(d.x.size()), dw = poisoned<T>(d.w.size()), ds = poisoned<T>(d.s.size());
  if (!no_throw(name + " bwd", [&] { pyeccv::dgc_backward_cpu(p, goT.data(), dx.data(), dw.data(), ds.data(), nt); })) return;
  std::vector<double> rdx(d.x.size(), 0.0), rdw(d.w.size(), 0.0), rds(d.s.size(), 0.0);
  dgc_terms(g, kept, [&](int64_t o, int64_t i, int64_t k, int64_t si) {
    const double gv = go[static_cast<size_t>(o)];
    rdx[static_cast<size_t>(i)] += gv * d.w[static_cast<size_t>(k)] * d.s[static_cast<size_t>(si)];
    rdw[static_cast<size_t>(k)] += gv * d.s[static_cast<size_t>(si)] * d.x[static_cast<size_t>(i)];
    rds[static_cast<size_t>(si)] += gv * d.w[static_cast<size_t>(k)] * d.x[static_cast<size_t>(i)];
  });
  // analytic naive gradient (the op is linear in each input); f32 reductions over pixels -> kTol32
  check_parts(name + " bwd", {{"d_x", widen(dx), rdx}, {"d_weight", widen(dw), rdw}, {"d_saliency", widen(ds), rds}},
              tol<T>(kTol32, kTol64));
  // structural zeros: saliency of dropped channels; inputs no head keeps; filter columns of
  // channels no sample keeps for that head
  std::vector<char> zs(d.s.size()), zx(d.x.size(), 1), zw(d.w.size(), 1);
  const int64_t co = g.Co / g.heads, kk = g.kh * g.kw, HW = g.H * g.W;
  for (int64_t b = 0; b < g.B; ++b)
    for (int64_t h = 0; h < g.heads; ++h)
      for (int64_t c = 0; c < g.C; ++c) {
        const size_t si = static_cast<size_t>((b * g.heads + h) * g.C + c);
        zs[si] = !kept[si];
        if (!kept[si]) continue;
        std::fill(zx.begin() + (b * g.C + c) * HW, zx.begin() + (b * g.C + c + 1) * HW, 0);
        for (int64_t j = 0; j < co; ++j)
          std::fill(zw.begin() + ((h * co + j) * g.C + c) * kk, zw.begin() + ((h * co + j) * g.C + c + 1) * kk, 0);
      }
  std::vector<double> all;
  std::vector<char> mask;
  for (auto* pr : {&zs, &zx, &zw}) mask.insert(mask.end(), pr->begin(), pr->end());
  for (const auto* v : {&ds, &dx, &dw}) {
    const auto wv = widen(*v);
    all.insert(all.end(), wv.begin(), wv.end());
  }
  if (std::count(mask.begin(), mask.end(), 1) > 0) check_exact_zeros(name + " bwd zeros of dropped channels", all, mask);
  if (nt != 1) {
    auto dx2 = poisoned<T>(d.x.size()), dw2 = poisoned<T>(d.w.size()), ds2 = poisoned<T>(d.s.size());
    if (!no_throw(name + " bwd repeat", [&] { pyeccv::dgc_backward_cpu(p, goT.data(), dx2.data(), dw2.data(), ds2.data(), nt); })) return;
    check_parts(name + " bwd repeatable (bitwise)", {{"d_x", widen(dx2), widen(dx)}, {"d_weight", widen(dw2), widen(dw)}, {"d_saliency", widen(ds2), widen(ds)}}, 0.0);
  }
}

void dgc_fd_check(Rng& rng) {
  DgcGeo g{1, 4, 4, 5, 4, 2, 3, 3, 2};
  g.ph = g.pw = 1;
  const std::string name = "dyn_group_conv f64 bwd vs finite differences (" + g.str() + ")";
  DgcData d = make_dgc(rng, g, false);
  const auto p = dgc_problem(g, d.x, d.w, d.s);
  const auto kept = dgc_kept(g, d.s.data());  // distinct saliencies: the selection is stable under +-h
  const auto go = rng.normals(static_cast<size_t>(g.B * g.Co * g.Ho() * g.Wo()));
  auto dx = poisoned<double>(d.x.size()), dw = poisoned<double>(d.w.size()), ds = poisoned<double>(d.s.size());
  if (!no_throw(name, [&] { pyeccv::dgc_backward_cpu(p, go.data(), dx.data(), dw.data(), ds.data(), 1); })) return;
  auto loss = [&](const std::vector<double>& x, const std::vector<double>& w, const std::vector<double>& s) {
    const auto o = dgc_naive(g, x, w, s, kept);
    double L = 0;
    for (size_t k = 0; k < o.size(); ++k) L += go[k] * o[k];
    return L;
  };
  const auto fx = fd_grad([&](const std::vector<double>& v) { return loss(v, d.w, d.s); }, d.x);
  const auto fw = fd_grad([&](const std::vector<double>& v) { return loss(d.x, v, d.s); }, d.w);
  const auto fs = fd_grad([&](const std::vector<double>& v) { return loss(d.x, d.w, v); }, d.s);
  check_parts(name, {{"d_x", dx, fx}, {"d_weight", dw, fw}, {"d_saliency", ds, fs}}, kTolFD);  // see kTolFD
}

template <class T>
void test_dgc(Rng& rng) {
  auto G = [](int64_t B, int64_t C, int64_t H, int64_t W, int64_t Co, int64_t heads, int64_t kh, int64_t kw, int64_t keep,
              int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
    DgcGeo g{B, C, H, W, Co, heads, kh, kw, keep};
    g.sh = sh, g.sw = sw, g.ph = ph, g.pw = pw, g.dh = dh, g.dw = dw;
    return g;
  };
  dgc_check<T>(rng, "3x3 s1", G(2, 5, 7, 9, 6, 2, 3, 3, 3, 1, 1, 1, 1, 1, 1), false, 1);
  dgc_check<T>(rng, "tails: 121 px, co 13", G(1, 19, 11, 11, 26, 2, 3, 3, 11, 1, 1, 1, 1, 1, 1), false, 1);
  dgc_check<T>(rng, "strided", G(3, 7, 10, 13, 5, 1, 3, 3, 4, 2, 2, 1, 1, 1, 1), false, 1);
  dgc_check<T>(rng, "dilated 3x2, all kept", G(2, 6, 9, 8, 9, 3, 3, 2, 6, 1, 2, 2, 0, 2, 1), false, 1);
  dgc_check<T>(rng, "ties, 1x1", G(2, 8, 6, 6, 4, 2, 1, 1, 5, 1, 1, 0, 0, 1, 1), true, 1);
  dgc_check<T>(rng, "ties, all kept incl. zeros", G(2, 6, 5, 7, 6, 3, 3, 3, 6, 1, 1, 1, 1, 1, 1), true, 1);
  dgc_check<T>(rng, "filter packing B*keep>=4C", G(6, 7, 5, 6, 18, 2, 3, 3, 5, 1, 1, 1, 1, 1, 1), false, 1);
  dgc_check<T>(rng, "5x5 p2 keep1 Co1", G(1, 3, 5, 5, 1, 1, 5, 5, 1, 1, 1, 2, 2, 1, 1), false, 1);
  dgc_check<T>(rng, "1x1 image, C1, 3x3 p1", G(1, 1, 1, 1, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1), false, 1);
  dgc_check<T>(rng, "strided dilated 1 px wide", G(2, 5, 9, 3, 10, 5, 3, 3, 3, 3, 2, 1, 0, 2, 1), false, 1);
  dgc_check<T>(rng, "omp2 33 px panels, co 17", G(2, 16, 12, 11, 34, 2, 3, 3, 10, 1, 1, 1, 0, 1, 1), false, 2);
  dgc_check<T>(rng, "omp0 strided packing", G(8, 9, 13, 12, 24, 3, 3, 3, 7, 2, 2, 1, 1, 1, 1), false, 0);
}

void test_dgc_errors() {
  std::vector<float> x(2 * 4 * 4, 1.f), w(2 * 2 * 9, 1.f), s(2, 1.f), out(2 * 2 * 4 * 4);
  DgcGeo g{1, 2, 4, 4, 2, 1, 3, 3, 0};
  auto p = dgc_problem(g, x, w, s);
  expect_throw<std::invalid_argument>("dyn_group_conv keep 0 rejected", [&] { pyeccv::dgc_forward_cpu(p, out.data(), 1); });
  p.keep = 1;
  s[1] = -1.f;
  expect_throw<std::invalid_argument>("dyn_group_conv negative saliency rejected", [&] { pyeccv::dgc_forward_cpu(p, out.data(), 1); });
  s[1] = 1.f;
  p.out_channels = 3, p.heads = 2;
  expect_throw<std::invalid_argument>("dyn_group_conv out_channels % heads rejected", [&] { pyeccv::dgc_forward_cpu(p, out.data(), 1); });
}

}  // namespace

int finish() {
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--list-isas") == 0) {
#ifdef PYECCV_HAS_CPU_ISA_API
    // The variants compiled in that this CPU runs, best first (comma-separated in the API).
    std::string item;
    for (const char* c = pyeccv::cpu_isas_available();; ++c) {
      if (*c == ',' || *c == '\0') {
        if (!item.empty()) std::puts(item.c_str());
        item.clear();
        if (*c == '\0') break;
      } else if (*c != ' ') {
        item += *c;
      }
    }
    return 0;
#else
    std::fprintf(stderr, "core_test: the core has no CPU ISA API (PYECCV_HAS_CPU_ISA_API is not defined)\n");
    return 2;
#endif
  }
  if (argc > 1) {
    std::fprintf(stderr, "usage: %s [--list-isas]\n", argv[0]);
    return 2;
  }
  const auto t0 = std::chrono::steady_clock::now();
  std::printf("core_test: %s; cuda_compiled=%d\n", pyeccv::build_info(), pyeccv::cuda_compiled());
#ifdef PYECCV_HAS_CPU_ISA_API
  {
    const char* req = std::getenv("PYECCV_CPU_ISA");
    const char* exp = std::getenv("PYECCV_TEST_EXPECT_ISA");  // a variant name, or "refused"
    std::string isa, err;
    try {
      isa = pyeccv::cpu_isa_name();
    } catch (const std::invalid_argument& e) {
      err = e.what();
    }
    std::printf("core_test: cpu %s; isas compiled %s, available %s; active %s (PYECCV_CPU_ISA=%s)\n", pyeccv::cpu_model(),
                pyeccv::cpu_isas_compiled(), pyeccv::cpu_isas_available(), err.empty() ? isa.c_str() : "<refused>",
                req ? req : "<unset>");
    if (exp && std::strcmp(exp, "refused") == 0) {  // asking for a variant this CPU lacks must be refused, not run
      record(!err.empty(), fmt("cpu isa PYECCV_CPU_ISA=%s refused on this CPU", req ? req : ""),
             err.empty() ? "accepted, active " + isa : "std::invalid_argument: " + err);
      return finish();
    }
    if (!err.empty()) {
      record(false, "cpu isa", "cpu_isa_name() threw: " + err);
      return finish();
    }
    if (req && *req && std::strcmp(req, "auto") != 0)
      record(isa == req, "cpu isa requested by PYECCV_CPU_ISA is active", fmt("requested %s, active %s", req, isa.c_str()));
    if (exp && *exp) record(isa == exp, "cpu isa picked for this CPU", fmt("expected %s, active %s", exp, isa.c_str()));
  }
#else
  std::printf("core_test: cpu isa: (no ISA API in this core)\n");
#endif
#ifdef PYECCV_TEST_EXPECT_OPENMP
  record(std::strstr(pyeccv::build_info(), "openmp=yes") != nullptr, "core built with OpenMP", pyeccv::build_info());
#endif
  Rng rng(20201127);
  auto section = [&](const char* what, const std::function<void()>& f) {
    const auto s0 = std::chrono::steady_clock::now();
    f();
    std::printf("core_test: [%s] %.2f s\n", what, std::chrono::duration<double>(std::chrono::steady_clock::now() - s0).count());
  };
  section("lsap", [&] {
    test_lsap<float>(rng);
    test_lsap<double>(rng);
    test_lsap_errors();
  });
  section("detr_cost", [&] {
    test_detr<float>(rng);
    test_detr<double>(rng);
  });
  section("smooth_ap", [&] {
    test_smooth_ap<float>(rng);
    test_smooth_ap<double>(rng);
    sap_fd_check(rng, false);
    sap_fd_check(rng, true);
  });
  section("grad_central", [&] {
    test_gc<float>(rng, false);
    test_gc<double>(rng, false);
    test_gc<Bf16>(rng, true);
    test_gc<F16>(rng, true);
  });
  section("volume_render", [&] {
    test_vr<float>(rng);
    test_vr<double>(rng);
    test_vr_check_packed();
  });
  section("cond_mask_head", [&] {
    test_cmh<float>(rng);
    test_cmh<double>(rng);
    cmh_fd_check(rng);
  });
  section("dyn_group_conv", [&] {
    test_dgc<float>(rng);
    test_dgc<double>(rng);
    dgc_fd_check(rng);
    test_dgc_errors();
  });
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("core_test: %.2f s\n", secs);
  return finish();
}
