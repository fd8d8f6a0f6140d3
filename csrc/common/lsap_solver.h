// The linear sum assignment solver, written once against a Team (see team.h) so the CPU path
// (SerialTeam), the CUDA path (a thread block) and the threaded CPU emulation of the CUDA path
// run the very same algorithm.
//
// Algorithm (exact, float64 duals):
//   1. load: copy the valid region into a contiguous n x m buffer with n <= m (transposed when
//      the problem is tall), negated when maximising; flag NaN / -inf (invalid) and +inf
//      (forbidden pair).
//   2. square and finite only: column reduction (Jonker & Volgenant 1987): v_j = min_i c_ij,
//      assign each column's argmin row while it is free.
//   3. augmenting row reduction (JV), two passes, from the free rows. v only decreases and only
//      on columns that end up assigned, so with v starting at 0 the rectangular dual constraint
//      v_j <= 0 (= 0 on unassigned columns) holds and the result stays optimal.
//   4. shortest augmenting paths (Crouse 2016, as SciPy) for the rows still free; +inf reduced
//      distance everywhere => infeasible.
// Ties pick the smallest reduced distance, then an unassigned column (as SciPy), then the
// lowest index: a total order, so every team size gives the same answer.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/team.h"
#include "pyeccv/hungarian.h"

namespace pyeccv {
namespace lsap {

PYECCV_HD double inf() { return __builtin_huge_val(); }

enum : int32_t { kOk = 0, kInvalid = 1, kInfeasible = 2 };

// Per-problem solver state; arrays sized for n rows and m columns (n <= m).
struct State {
  double* u;           // n  row duals
  double* v;           // m  column duals
  double* spc;         // m  shortest path costs of the current search
  int32_t* path;       // m  predecessor row of each column in the current search
  int32_t* col4row;    // n
  int32_t* row4col;    // m
  int32_t* free_rows;  // n
  uint8_t* SR;         // n  rows reached in the current search
  uint8_t* SC;         // m  columns scanned in the current search
};

// Bytes of State for (n, m), carved by carve_state in this order (doubles, ints, bytes).
PYECCV_HD int64_t state_bytes(int64_t n, int64_t m) {
  int64_t b = 8 * (n + 2 * m) + 4 * (2 * n + 2 * m) + (n + m);
  return (b + 15) / 16 * 16;
}

PYECCV_HD State carve_state(void* base, int64_t n, int64_t m) {
  State s;
  double* d = static_cast<double*>(base);
  s.u = d;
  s.v = d + n;
  s.spc = d + n + m;
  int32_t* i = reinterpret_cast<int32_t*>(d + n + 2 * m);
  s.path = i;
  s.col4row = i + m;
  s.row4col = i + m + n;
  s.free_rows = i + 2 * m + n;
  uint8_t* c = reinterpret_cast<uint8_t*>(i + 2 * m + 2 * n);
  s.SR = c;
  s.SC = c + n;
  return s;
}

// Smallest reduced distance; then unassigned column first; then lowest index.
struct MinKey {
  double val;
  int32_t assigned;
  int32_t j;
};
PYECCV_HD bool key_less(const MinKey& a, const MinKey& b) {
  if (a.val != b.val) return a.val < b.val;
  if (a.assigned != b.assigned) return a.assigned < b.assigned;
  return a.j < b.j;
}
struct MinKeyOp {
  PYECCV_HD MinKey operator()(const MinKey& a, const MinKey& b) const { return key_less(b, a) ? b : a; }
};

// The two smallest values of a row (ties: lowest index first), with the rows that hold
// those columns, read inside the scan: after the reduction the leader may reassign them.
struct Top2 {
  double a;
  int32_t ja, ia;
  double b;
  int32_t jb, ib;
};
PYECCV_HD bool lt(double x, int32_t jx, double y, int32_t jy) { return x < y || (x == y && jx < jy); }
// Pushes (x, j) with j increasing within each worker, so strict comparisons already keep the
// lowest index first among equal values (the merge below handles ties across workers).
PYECCV_HD void top2_push(Top2& t, double x, int32_t j, const int32_t* row4col) {
  if (x < t.b) {
    if (x < t.a) {
      t.b = t.a;
      t.jb = t.ja;
      t.ib = t.ia;
      t.a = x;
      t.ja = j;
      t.ia = row4col[j];
    } else {
      t.b = x;
      t.jb = j;
      t.ib = row4col[j];
    }
  }
}
struct Top2Op {
  PYECCV_HD Top2 operator()(Top2 x, Top2 y) const {
    if (lt(y.a, y.ja, x.a, x.ja)) {
      Top2 t = x;
      x = y;
      y = t;
    }
    // x.a is the best; the runner-up is the better of x.b and y.a.
    if (lt(y.a, y.ja, x.b, x.jb)) {
      x.b = y.a;
      x.jb = y.ja;
      x.ib = y.ia;
    }
    return x;
  }
};
PYECCV_HD Top2 top2_empty() { return Top2{inf(), 0x7fffffff, -1, inf(), 0x7fffffff, -1}; }

struct SumOp {
  PYECCV_HD int32_t operator()(int32_t a, int32_t b) const { return a + b; }
};
struct OrOp {
  PYECCV_HD int32_t operator()(int32_t a, int32_t b) const { return a | b; }
};

enum : int32_t { kFlagInvalid = 1, kFlagNonFinite = 2 };

// Step 1. Copies src (nr x nc, strides in elements) into dst (n x m, n = min, m = max),
// transposed when nr > nc, negated when maximising. Returns kFlag* bits (every worker).
template <class Team, class In>
PYECCV_HD int32_t load_problem(const Team& t, const In* src, int64_t s_r, int64_t s_c, int32_t nr,
                               int32_t nc, bool maximize, In* dst) {
  const bool tr = nr > nc;
  const int64_t m = tr ? nr : nc;
  const double ninf = -inf();
  int32_t flags = 0;
  auto put = [&](int64_t r, int64_t col) {
    In x = src[r * s_r + col * s_c];
    if (maximize) x = -x;
    const double xd = static_cast<double>(x);
    if (xd != xd || xd == ninf) flags |= kFlagInvalid;
    else if (xd == inf()) flags |= kFlagNonFinite;
    dst[tr ? col * m + r : r * m + col] = x;
  };
  if constexpr (Team::kSerial) {
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t col = 0; col < nc; ++col) put(r, col);
  } else {
    t.for_range(static_cast<int64_t>(nr) * nc, [&](int64_t idx) { put(idx / nc, idx % nc); });
  }
  return t.reduce(flags, OrOp{});
}

// Steps 2-4 on a loaded problem. c: n x m row-major, 1 <= n <= m, no NaN / -inf.
// On return (every worker): kOk with the matching in s.col4row / s.row4col, or kInfeasible.
template <class Team, class T>
PYECCV_HD int32_t solve(const Team& t, const T* c, int32_t n, int32_t m, bool all_finite, const State& s) {
  t.for_range(m, [&](int32_t j) {
    s.v[j] = 0.0;
    s.row4col[j] = -1;
    s.SC[j] = 0;
  });
  t.for_range(n, [&](int32_t i) {
    s.u[i] = 0.0;
    s.col4row[i] = -1;
    s.SR[i] = 0;
  });
  t.sync();

  // ---- 2. column reduction (square, finite) ----
  if (n == m && all_finite) {
    if constexpr (Team::kSerial) {
      for (int32_t j = 0; j < m; ++j) {
        s.v[j] = static_cast<double>(c[j]);
        s.path[j] = 0;
      }
      for (int32_t i = 1; i < n; ++i) {
        const T* ci = c + static_cast<int64_t>(i) * m;
        for (int32_t j = 0; j < m; ++j) {
          const double x = static_cast<double>(ci[j]);
          if (x < s.v[j]) {
            s.v[j] = x;
            s.path[j] = i;
          }
        }
      }
    } else {
      t.for_range(m, [&](int32_t j) {  // column j: coalesced across the team
        double best = static_cast<double>(c[j]);
        int32_t bi = 0;
        for (int32_t i = 1; i < n; ++i) {
          const double x = static_cast<double>(c[static_cast<int64_t>(i) * m + j]);
          if (x < best) {
            best = x;
            bi = i;
          }
        }
        s.v[j] = best;
        s.path[j] = bi;
      });
    }
    t.sync();
    if (t.leader()) {
      for (int32_t j = m - 1; j >= 0; --j) {  // JV assigns from the last column
        const int32_t i = s.path[j];
        if (s.col4row[i] < 0) {
          s.col4row[i] = j;
          s.row4col[j] = i;
        }
      }
    }
    t.sync();
  }

  // ---- 3. augmenting row reduction ----
  if (t.leader()) {
    int32_t k = 0;
    for (int32_t i = 0; i < n; ++i)
      if (s.col4row[i] < 0) s.free_rows[k++] = i;
  }
  int32_t local_free = 0;
  t.for_range(n, [&](int32_t i) { local_free += s.col4row[i] < 0 ? 1 : 0; });
  int32_t nfree = t.reduce(local_free, SumOp{});  // ends with a barrier: free_rows visible

  for (int pass = 0; pass < 2 && nfree > 0; ++pass) {
    int32_t k = 0;
    const int32_t prv = nfree;
    nfree = 0;
    // JV terminates on exact arithmetic; the cap only hands stubborn rows to step 4.
    int64_t budget = 4 * static_cast<int64_t>(n) + 2 * static_cast<int64_t>(m) + 16;
    while (k < prv) {
      if (--budget < 0) {  // defer the rest [k, prv) to the augmenting paths
        if (t.leader())
          for (int32_t q = k; q < prv; ++q) s.free_rows[nfree + (q - k)] = s.free_rows[q];
        nfree += prv - k;
        t.sync();
        break;
      }
      const int32_t i = s.free_rows[k++];
      const T* ci = c + static_cast<int64_t>(i) * m;
      Top2 local = top2_empty();
      t.for_range(m, [&](int32_t j) { top2_push(local, static_cast<double>(ci[j]) - s.v[j], j, s.row4col); });
      const Top2 r = t.reduce(local, Top2Op{});
      const double u1 = r.a, u2 = r.b;
      if (!(u1 < inf())) {  // nothing finite left in this row: step 4 reports infeasible
        if (t.leader()) s.free_rows[nfree] = i;
        ++nfree;
        t.sync();
        continue;
      }
      int32_t j1 = r.ja;
      int32_t i0 = r.ia;
      // u1 < u2 < inf: lower v_j1 so row i is tight on j1 and j2, and retry the displaced row
      // at once. Otherwise take j1 (or j2 on a tie, if j1 is taken) and queue the displaced row.
      const bool lower = (u1 < u2) && (u2 < inf());
      if (!lower && u1 == u2 && i0 >= 0) {
        j1 = r.jb;
        i0 = r.ib;
      }
      if (t.leader()) {
        if (lower) s.v[j1] -= u2 - u1;
        if (i0 >= 0) s.col4row[i0] = -1;
        s.row4col[j1] = i;
        s.col4row[i] = j1;
      }
      if (i0 >= 0) {
        if (lower) {
          --k;
          if (t.leader()) s.free_rows[k] = i0;
        } else {
          if (t.leader()) s.free_rows[nfree] = i0;
          ++nfree;
        }
      }
      t.sync();
    }
  }

  // Row duals for the assigned rows: u_i = min_j (c_ij - v_j), attained at col4row[i].
  t.for_range(n, [&](int32_t i) {
    const int32_t j = s.col4row[i];
    s.u[i] = j >= 0 ? static_cast<double>(c[static_cast<int64_t>(i) * m + j]) - s.v[j] : 0.0;
  });
  t.sync();

  // ---- 4. shortest augmenting paths ----
  for (int32_t f = 0; f < nfree; ++f) {
    const int32_t cur = s.free_rows[f];
    t.for_range(m, [&](int32_t j) {
      s.SC[j] = 0;
      s.spc[j] = inf();
    });
    t.for_range(n, [&](int32_t i) { s.SR[i] = 0; });
    t.sync();
    double min_val = 0.0;
    int32_t i = cur;
    int32_t sink = -1;
    while (sink < 0) {
      if (t.leader()) s.SR[i] = 1;
      const double base = min_val - s.u[i];
      const T* ci = c + static_cast<int64_t>(i) * m;
      MinKey local{inf(), 1, 0x7fffffff};
      t.for_range(m, [&](int32_t j) {
        if (s.SC[j]) return;
        double d = s.spc[j];
        const double rc = base + static_cast<double>(ci[j]) - s.v[j];
        if (rc < d) {
          d = rc;
          s.spc[j] = rc;
          s.path[j] = i;
        }
        if (d <= local.val) {
          const MinKey key{d, s.row4col[j] >= 0 ? 1 : 0, j};
          if (key_less(key, local)) local = key;
        }
      });
      const MinKey best = t.reduce(local, MinKeyOp{});
      if (!(best.val < inf())) return kInfeasible;
      min_val = best.val;
      const int32_t j = best.j;
      if (t.owns(j)) s.SC[j] = 1;  // only j's owner reads SC[j]: no barrier needed
      if (s.row4col[j] < 0) sink = j;
      else i = s.row4col[j];
    }
    // Dual update (Crouse, eq. for u and v after a search).
    if (t.leader()) s.u[cur] += min_val;
    t.for_range(n, [&](int32_t r) {
      if (s.SR[r] && r != cur) s.u[r] += min_val - s.spc[s.col4row[r]];
    });
    t.for_range(m, [&](int32_t j) {
      if (s.SC[j]) s.v[j] -= min_val - s.spc[j];
    });
    t.sync();
    if (t.leader()) {  // augment along the path
      int32_t j = sink;
      for (;;) {
        const int32_t r = s.path[j];
        s.row4col[j] = r;
        const int32_t prev = s.col4row[r];
        s.col4row[r] = j;
        j = prev;
        if (r == cur) break;
      }
    }
    t.sync();
  }
  return kOk;
}

// Writes problem b's answer into out (rows entries, -1 = unassigned).
template <class Team>
PYECCV_HD void store_result(const Team& t, const State& s, bool ok, bool transposed, int32_t nr, int64_t rows,
                            int64_t* out) {
  t.for_range(rows, [&](int64_t r) {
    int64_t v = -1;
    if (ok && r < nr) v = transposed ? s.row4col[r] : s.col4row[r];
    out[r] = v;
  });
}

// Valid size of problem b, or a status when num_rows / num_cols are out of range.
PYECCV_HD int32_t problem_size(const LsapProblem& p, int64_t b, int32_t& nr, int32_t& nc) {
  const int64_t r = p.num_rows ? p.num_rows[b] : p.rows;
  const int64_t c = p.num_cols ? p.num_cols[b] : p.cols;
  nr = 0;
  nc = 0;
  if (r < 0 || r > p.rows) return kLsapBadNumRows;
  if (c < 0 || c > p.cols) return kLsapBadNumCols;
  nr = static_cast<int32_t>(r);
  nc = static_cast<int32_t>(c);
  return kLsapOk;
}

// Problem b of a batch, end to end, by every worker of team t. buf holds min*max elements
// of T; state_mem holds state_bytes(min(rows, cols), max(rows, cols)).
template <class Team, class T>
PYECCV_HD void solve_problem(const Team& t, const LsapProblem& p, int64_t b, T* buf, void* state_mem) {
  int32_t nr = 0, nc = 0;
  int32_t status = problem_size(p, b, nr, nc);
  const bool transposed = nr > nc;
  State st{};
  if (status == kLsapOk && nr > 0 && nc > 0) {
    const int32_t n = transposed ? nc : nr, m = transposed ? nr : nc;
    const T* src = static_cast<const T*>(p.cost) + b * p.stride_batch;
    const int32_t flags = load_problem(t, src, p.stride_row, p.stride_col, nr, nc, p.maximize, buf);
    st = carve_state(state_mem, n, m);
    if (flags & kFlagInvalid) {
      status = kLsapInvalidEntry;
    } else {
      t.sync();  // buf complete before any worker reads a row of it
      status = solve(t, buf, n, m, !(flags & kFlagNonFinite), st) == kOk ? kLsapOk : kLsapInfeasible;
    }
  }
  const bool solved = status == kLsapOk && nr > 0 && nc > 0;
  if (p.rows > 0) store_result(t, st, solved, transposed, nr, p.rows, p.col_for_row + b * p.rows);
  if (t.leader()) p.status[b] = status;
}

}  // namespace lsap
}  // namespace pyeccv
