// CPU Dynamic Group Convolution (see pyeccv/dyn_group_conv.h).
//
// Work: per (sample b, head h) one GEMM  out_h (co x pixels) = W_h,kept (co x K) * col (K x pixels)
// with K = kept * kh * kw: the pruned channels cost nothing. Tasks are (b, h) (split further into
// pixel-panel chunks when there are fewer than two tasks per thread).
//
// Forward, per task: select the kept channels (nth_element: the official threshold), copy them,
// times their saliency, into planes, pack the head's filter columns of those channels into 8-row
// panels, then for every 32-pixel panel run the micro-kernel over each 8-row filter block: 8 x 32
// accumulators in 16 zmm registers, per reduction step 8 broadcasts of the packed filters times two
// 16-float vectors of the B row. With stride 1 every channel gets kw column-shifted copies of its
// zero-padded plane, Wo wide (copy dx starts at padded column dx * dw), so the B row of reduction
// index (channel c, tap (dy, dx)) at output pixel p = oh * Wo + ow is shifted_c,dx[p + dy * dh * Wo],
// contiguous in p: no im2col, only the Ho x Wo output pixels are computed (Wp-wide output rows
// wasted 2 pw / Wp of the FMAs), and the micro-kernel reads the rows in place (unaligned; copying
// each panel's rows into an aligned block first measured 11% slower at 28 x 28 and even at 14 x 14).
// Strided convolutions gather each panel's rows into a sequential block. The reduction runs in
// chunks of 128 rows (the chunk's B rows stay in L1 across the filter blocks). Filter panels: with
// B x keep >= 4 C the filters are put in panel-major order once per call and each task copies its
// kept channels' blocks; below that, each task gathers them from the filter rows.
//
// Backward, per task: the gradient of the output block g_h is laid out in the stride-1 padded
// grid (zero-inserted for strides > 1), so that
//   d_plane_c[q] = sum_{m, r} W[m][c][r] * g1_m[q - roff(r)]      (input gradient: rows = kept
//                                                                  channels, reduction = co * kk)
//   dW[m][c][r]  = sum_l g1_m[l] * plane_c[l + roff(r)]             (weight gradient: rows = (c, r),
//                                                                  columns = m, reduction = pixels)
// are again GEMMs over contiguous shifted rows. Weight gradients accumulate in per-thread buffers
// (tasks statically assigned, partials added in thread order) and input gradients per (b, h) slot,
// summed over heads in head order: deterministic for a given thread count.
#include <algorithm>
#include <cstring>
#include <memory>
#include <utility>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/isa.h"
#include "common/vmath.h"
#include "pyeccv/dyn_group_conv.h"

#ifdef PYECCV_HAS_OPENMP
#include <omp.h>
#endif

PYECCV_ISA_BEGIN
namespace {

constexpr int MR = 8;  // rows of the register tile

// One native vector of the variant (common/isa.h): 16 floats on AVX-512, 8 on AVX2, 4 on SSE2 /
// NEON. The register tile is MR x (2 vectors); it is computed in passes of MRP rows so that the
// accumulators plus the two B vectors and a broadcast fit the variant's registers (AVX-512 and
// NEON: 32 registers, one pass of 8 rows; AVX2 / SSE2: 16 registers, two passes of 4 rows, which
// read the B rows twice from L1 - 64-byte vectors on a 16-register machine spilled every step and
// ran 35x slower).
template <class T>
struct Vec {
  typedef T v __attribute__((vector_size(PYECCV_VEC_BYTES), aligned(sizeof(T)), __may_alias__));
  static constexpr int N = PYECCV_VEC_BYTES / sizeof(T);
};
template <int NV>
constexpr int rows_per_pass() {
  return MR * NV + NV + 2 <= PYECCV_VEC_REGS ? MR : MR / 2;
}
template <class T>
constexpr int64_t NR = 2 * Vec<T>::N;  // columns of the register tile: two vectors

inline int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }

// d[j MR + i] = rows[i][off + j] for i, j < 8 (MR = 8): an 8 x 8 transpose in registers, three
// stages of two-source shuffles (GCC vector extensions: any target).
template <class T>
PYECCV_INLINE void transpose8(const T* const* rows, int64_t off, T* d) {
  static_assert(MR == 8, "transpose8 transposes 8 x 8 blocks");
  typedef T V8 __attribute__((vector_size(8 * sizeof(T)), aligned(sizeof(T)), __may_alias__));
  typedef typename std::conditional<sizeof(T) == 4, int32_t, int64_t>::type I;
  typedef I M8 __attribute__((vector_size(8 * sizeof(T))));
  V8 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = *reinterpret_cast<const V8*>(rows[i] + off);
  const M8 lo1 = {0, 8, 1, 9, 4, 12, 5, 13}, hi1 = {2, 10, 3, 11, 6, 14, 7, 15};
  const M8 lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
  const M8 lo3 = {0, 1, 2, 3, 8, 9, 10, 11}, hi3 = {4, 5, 6, 7, 12, 13, 14, 15};
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shuffle(r[i], r[i + 1], lo1);
    t[i + 1] = __builtin_shuffle(r[i], r[i + 1], hi1);
  }
  for (int i = 0; i < 8; i += 4)
    for (int j = 0; j < 2; ++j) {
      u[i + 2 * j] = __builtin_shuffle(t[i + j], t[i + j + 2], lo2);
      u[i + 2 * j + 1] = __builtin_shuffle(t[i + j], t[i + j + 2], hi2);
    }
  // u[0] = (r0..r3 at columns 0, 4), u[1] = (.. 1, 5), u[2] = (.. 2, 6), u[3] = (.. 3, 7); u[4..7]: rows 4..7
  for (int j = 0; j < 4; ++j) {
    *reinterpret_cast<V8*>(d + j * 8) = __builtin_shuffle(u[j], u[j + 4], lo3);
    *reinterpret_cast<V8*>(d + (j + 4) * 8) = __builtin_shuffle(u[j], u[j + 4], hi3);
  }
}

// d[0 .. n) = s[0 .. n) for short runs (plane rows, tile rows, filter blocks): vector moves, no
// call (GCC turns a plain loop into a memmove call, ~20 cycles for a few elements); n >= one vector:
// the last vector overlaps the previous one instead of a scalar tail (s and d do not overlap)
template <class T>
PYECCV_INLINE void copy_short(const T* s, int64_t n, T* d) {
  using V = typename Vec<T>::v;
  constexpr int N = Vec<T>::N;
  if (n < N) {
    typedef T H __attribute__((vector_size(PYECCV_VEC_BYTES / 2), aligned(sizeof(T)), __may_alias__));
    constexpr int NH = N / 2;  // half a vector
    if (NH >= 2 && n >= NH) {  // two overlapping half-vector moves (e.g. 14-float plane rows)
      *reinterpret_cast<H*>(d) = *reinterpret_cast<const H*>(s);
      *reinterpret_cast<H*>(d + n - NH) = *reinterpret_cast<const H*>(s + n - NH);
      return;
    }
    for (int64_t j = 0; j < n; ++j) d[j] = s[j];
    return;
  }
  for (int64_t j = 0; j + N < n; j += N) *reinterpret_cast<V*>(d + j) = *reinterpret_cast<const V*>(s + j);
  *reinterpret_cast<V*>(d + n - N) = *reinterpret_cast<const V*>(s + n - N);
}

template <class T>
T* align64(T* p) {  // the next 64-byte boundary (buffers carry 64 bytes of slack)
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

// Where a GEMM's A rows come from. PackedA: A[l MR + i] (a packed panel, one 8-row block after
// another); RowPtrA: row i is rows[i] + a0, contiguous in l (the input gradient's filters read where
// they lie, no per-task packing). pass<P>(i0) binds rows i0..i0+P-1 of the block for one pass.
template <class T>
struct PackedA {
  const T* A;
  template <int P>
  struct Pass {
    const T* a;
    PYECCV_INLINE T operator()(int64_t l, int i) const { return a[l * MR + i]; }
  };
  template <int P>
  PYECCV_INLINE Pass<P> pass(int i0) const { return {A + i0}; }
  PYECCV_INLINE PackedA block(int64_t rb, int64_t L, int64_t l0) const { return {A + (rb * L + l0) * MR}; }
};
template <class T>
struct RowPtrA {
  const T* const* rows;
  int64_t a0;
  template <int P>
  struct Pass {
    const T* a[P];
    PYECCV_INLINE T operator()(int64_t l, int i) const { return a[i][l]; }
  };
  template <int P>
  PYECCV_INLINE Pass<P> pass(int i0) const {
    Pass<P> q;
#pragma GCC unroll 8
    for (int i = 0; i < P; ++i) q.a[i] = rows[i0 + i] + a0;
    return q;
  }
  PYECCV_INLINE RowPtrA block(int64_t rb, int64_t, int64_t l0) const { return {rows + rb * MR, a0 + l0}; }
};

// tile[i][j] (+)= sum_l A(l, i) B(l, j), B(l, j) = B[boff[l] + j]: A from a PackedA / RowPtrA, B rows
// anywhere; columns j < NV vectors (NV = 2: the full 32-column tile; NV = 1: a panel of at most 16
// pixels). The tile's row stride is NR either way.
// boff == nullptr: B rows are sequential, NR apart (a packed panel): no table load per step.
template <int NV, class T, class AS>
PYECCV_INLINE void micro_rows(int64_t L, const AS& A, const T* B, const int64_t* boff, T* tile, bool accumulate) {
  using V = typename Vec<T>::v;
  constexpr int N = Vec<T>::N;
  constexpr int P = rows_per_pass<NV>();
  for (int i0 = 0; i0 < MR; i0 += P) {
    V acc[P][NV];
#pragma GCC unroll 8
    for (int i = 0; i < P; ++i)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v)
        acc[i][v] = accumulate ? *reinterpret_cast<const V*>(tile + (i0 + i) * 2 * N + v * N) : V{};
    const auto a = A.template pass<P>(i0);
#pragma GCC unroll 2
    for (int64_t l = 0; l < L; ++l) {
      const T* b = boff ? B + boff[l] : B + l * NR<T>;
      V bv[NV];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) bv[v] = *reinterpret_cast<const V*>(b + v * N);
#pragma GCC unroll 8
      for (int i = 0; i < P; ++i) {
        const T ai = a(l, i);
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) acc[i][v] += ai * bv[v];
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < P; ++i)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) *reinterpret_cast<V*>(tile + (i0 + i) * 2 * N + v * N) = acc[i][v];
  }
}

// The reduction is cut into chunks of KC rows so that a chunk's B rows (KC x NR elements) stay in
// L1 while every 8-row block of A passes over them; tiles (rows x NR) accumulate across chunks.
constexpr int64_t KC = 128;

// tiles[rb][i][j] = sum_l A_rb(l, i) B(l, j) for rb < rblocks (A: a PackedA over rblocks packed
// panels, or a RowPtrA over rblocks x MR row pointers).
template <int NV = 2, class T, class AS>
PYECCV_INLINE void gemm_panel(int64_t L, int64_t rblocks, const AS& A, const T* B, const int64_t* boff, T* tiles) {
  constexpr int64_t nr = NR<T>;
  for (int64_t l0 = 0; l0 < L; l0 += KC) {
    const int64_t ll = std::min(KC, L - l0);
    for (int64_t rb = 0; rb < rblocks; ++rb)
      micro_rows<NV>(ll, A.block(rb, L, l0), boff ? B : B + l0 * nr, boff ? boff + l0 : nullptr,
                     tiles + rb * MR * nr, l0 > 0);
  }
  if (L == 0) std::fill(tiles, tiles + rblocks * MR * nr, T(0));
}

// Forward micro-kernel, per kept channel: tile[i][j] (+)= sum_{ci in [c0, c1)} sum_{r < kk}
// A_ci[r MR + i] B_ci[toff[r] + j] with A_ci = A + aoff[ci] (a kk x MR block) and B_ci = B + ci bstride.
// The filter blocks are read where they lie - the panel-major filters of the call (aoff = kept
// channel * kk MR) or the task's own packed panel (aoff = ci kk MR) - so large batches copy no
// filters per task (at 16-pixel maps that copy was half of the forward), and the B rows of a
// channel are a fixed tap pattern (toff): no per-row offset table.
template <int NV, class T>
PYECCV_INLINE void micro_chan(int64_t c0, int64_t c1, int64_t kk, const T* A, const int64_t* aoff, const T* B,
                              int64_t bstride, const int64_t* toff, T* tile, bool accumulate) {
  using V = typename Vec<T>::v;
  constexpr int N = Vec<T>::N;
  constexpr int P = rows_per_pass<NV>();
  for (int i0 = 0; i0 < MR; i0 += P) {
    V acc[P][NV];
#pragma GCC unroll 8
    for (int i = 0; i < P; ++i)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v)
        acc[i][v] = accumulate ? *reinterpret_cast<const V*>(tile + (i0 + i) * 2 * N + v * N) : V{};
    for (int64_t ci = c0; ci < c1; ++ci) {
      const T* a = A + aoff[ci] + i0;
      const T* bc = B + ci * bstride;
#pragma GCC unroll 3
      for (int64_t r = 0; r < kk; ++r) {
        const T* b = bc + toff[r];
        V bv[NV];
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) bv[v] = *reinterpret_cast<const V*>(b + v * N);
#pragma GCC unroll 8
        for (int i = 0; i < P; ++i) {
          const T ai = a[r * MR + i];
#pragma GCC unroll 2
          for (int v = 0; v < NV; ++v) acc[i][v] += ai * bv[v];
        }
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < P; ++i)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) *reinterpret_cast<V*>(tile + (i0 + i) * 2 * N + v * N) = acc[i][v];
  }
}

// tiles[mb] = the panel's output rows of filter block mb (A of block mb at A + mb astride): the
// channels in chunks of about KC reduction rows, so a chunk's B rows stay in L1 across the blocks.
template <int NV, class T>
PYECCV_INLINE void gemm_panel_chan(int64_t n, int64_t kk, int64_t mblocks, const T* A, int64_t astride,
                                   const int64_t* aoff, const T* B, int64_t bstride, const int64_t* toff, T* tiles) {
  constexpr int64_t nr = NR<T>;
  const int64_t cc = std::max<int64_t>(1, KC / kk);
  for (int64_t c0 = 0; c0 < n; c0 += cc) {
    const int64_t c1 = std::min(n, c0 + cc);
    for (int64_t mb = 0; mb < mblocks; ++mb)
      micro_chan<NV>(c0, c1, kk, A + mb * astride, aoff, B, bstride, toff, tiles + mb * MR * nr, c0 > 0);
  }
  if (n == 0) std::fill(tiles, tiles + mblocks * MR * nr, T(0));
}

// Small-map forward, output channels in the vector lanes: tt[p][v N + j] (+)= sum_{ci in [c0, c1)}
// sum_{r < kk} B_ci[toff[r] + p] Wc[aoff[ci] + r co_t + v N + j] for p < PR pixels, v < 2. At 16
// pixels the pixel-lane kernel has one vector of columns, 8 broadcasts of filters per 8 FMAs (load-
// bound, 8 accumulators); here a step is 2 filter-vector loads and PR pixel broadcasts for 2 PR FMAs.
template <int PR, class T>
PYECCV_INLINE void micro_cv(int64_t c0, int64_t c1, int64_t kk, const T* Wc, const int64_t* aoff, int64_t co_t,
                            const T* B, int64_t bstride, const int64_t* toff, const int64_t* poff, T* tt,
                            bool accumulate) {
  using V = typename Vec<T>::v;
  constexpr int N = Vec<T>::N;
  int64_t po[PR];
#pragma GCC unroll 8
  for (int p = 0; p < PR; ++p) po[p] = poff[p];
  V acc[PR][2];
#pragma GCC unroll 8
  for (int p = 0; p < PR; ++p)
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) acc[p][v] = accumulate ? *reinterpret_cast<const V*>(tt + p * co_t + v * N) : V{};
  for (int64_t ci = c0; ci < c1; ++ci) {
    const T* a = Wc + aoff[ci];
    const T* bc = B + ci * bstride;
#pragma GCC unroll 3
    for (int64_t r = 0; r < kk; ++r) {
      const T* b = bc + toff[r];
      const V w0 = *reinterpret_cast<const V*>(a + r * co_t), w1 = *reinterpret_cast<const V*>(a + r * co_t + N);
#pragma GCC unroll 8
      for (int p = 0; p < PR; ++p) {
        const T bp = b[po[p]];
        acc[p][0] += bp * w0;
        acc[p][1] += bp * w1;
      }
    }
  }
#pragma GCC unroll 8
  for (int p = 0; p < PR; ++p)
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) *reinterpret_cast<V*>(tt + p * co_t + v * N) = acc[p][v];
}

// micro_cv for R output rows of Q consecutive pixels at unit horizontal stride (pixel i Q + j at
// offset off0 + i rstride + j): the broadcasts address one row pointer with constant displacements,
// where the generic kernel keeps PR pixel offsets (more than the 16 general registers: GCC reloads
// some from the stack, and adds each to the tap offset with an lea per broadcast).
template <int R, int Q, class T>
PYECCV_INLINE void micro_cv_rows(int64_t c0, int64_t c1, int64_t kk, const T* Wc, const int64_t* aoff,
                                 int64_t co_t, const T* B, int64_t bstride, const int64_t* toff, int64_t off0,
                                 int64_t rstride, T* tt, bool accumulate) {
  using V = typename Vec<T>::v;
  constexpr int N = Vec<T>::N;
  constexpr int PR = R * Q;
  V acc[PR][2];
#pragma GCC unroll 8
  for (int p = 0; p < PR; ++p)
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) acc[p][v] = accumulate ? *reinterpret_cast<const V*>(tt + p * co_t + v * N) : V{};
  for (int64_t ci = c0; ci < c1; ++ci) {
    const T* a = Wc + aoff[ci];
    const T* bc = B + ci * bstride + off0;
#pragma GCC unroll 3
    for (int64_t r = 0; r < kk; ++r) {
      const T* b = bc + toff[r];
      const V w0 = *reinterpret_cast<const V*>(a + r * co_t), w1 = *reinterpret_cast<const V*>(a + r * co_t + N);
#pragma GCC unroll 2
      for (int i = 0; i < R; ++i) {
        const T* bi = b + i * rstride;
#pragma GCC unroll 8
        for (int j = 0; j < Q; ++j) {
          const T bp = bi[j];
          acc[i * Q + j][0] += bp * w0;
          acc[i * Q + j][1] += bp * w1;
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int p = 0; p < PR; ++p)
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) *reinterpret_cast<V*>(tt + p * co_t + v * N) = acc[p][v];
}

// The variant's pixel block: 8 (32 vector registers: 16 accumulators) or 4 (16 registers).
constexpr int kCvPR = PYECCV_VEC_REGS >= 32 ? 8 : 4;

// tt[p][m] = output pixel p (< P), channel m (< co_t) of one (b, h): per 2-vector channel block, the
// kept channels in chunks of about KC reduction rows (the chunk's filter rows stay in L1 across the
// pixel blocks), pixels in blocks of kCvPR, then 4, 2, 1 (no reads past the last pixel).
// rows4: output rows of exactly 4 pixels at unit horizontal stride, rstride elements apart (row
// blocks of micro_cv_rows: 4 x 4 maps on AVX-512, 1..2 x 4 on AVX2).
template <class T>
PYECCV_INLINE void gemm_cv(int64_t n, int64_t kk, int64_t P, int64_t co_t, const T* W, const int64_t* aoff,
                           const T* B, int64_t bstride, const int64_t* toff, const int64_t* poff, int64_t mlo,
                           int64_t mhi, T* tt, bool rows4, int64_t rstride) {
  constexpr int64_t cw = 2 * Vec<T>::N;
  const int64_t cc = std::max<int64_t>(1, KC / kk);
  if (n == 0) {
    std::fill(tt, tt + P * co_t, T(0));
    return;
  }
  for (int64_t m0 = mlo; m0 < mhi; m0 += cw)
    for (int64_t c0 = 0; c0 < n; c0 += cc) {
      const int64_t c1 = std::min(n, c0 + cc);
      const bool acc = c0 > 0;
      int64_t p = 0;
      if (rows4) {
        constexpr int RB = kCvPR / 4;  // rows a block
        for (; p + 4 * RB <= P; p += 4 * RB)
          micro_cv_rows<RB, 4>(c0, c1, kk, W + m0, aoff, co_t, B, bstride, toff, poff[p], rstride,
                               tt + p * co_t + m0, acc);
        for (; p + 4 <= P; p += 4)
          micro_cv_rows<1, 4>(c0, c1, kk, W + m0, aoff, co_t, B, bstride, toff, poff[p], rstride,
                              tt + p * co_t + m0, acc);
      }
      for (; p + kCvPR <= P; p += kCvPR)
        micro_cv<kCvPR>(c0, c1, kk, W + m0, aoff, co_t, B, bstride, toff, poff + p, tt + p * co_t + m0, acc);
      if (kCvPR > 4 && p + 4 <= P)
        micro_cv<4>(c0, c1, kk, W + m0, aoff, co_t, B, bstride, toff, poff + p, tt + p * co_t + m0, acc), p += 4;
      if (p + 2 <= P) micro_cv<2>(c0, c1, kk, W + m0, aoff, co_t, B, bstride, toff, poff + p, tt + p * co_t + m0, acc), p += 2;
      if (p < P) micro_cv<1>(c0, c1, kk, W + m0, aoff, co_t, B, bstride, toff, poff + p, tt + p * co_t + m0, acc);
    }
}

// tile[i][j] = sum_l A_i[l] B[l * ldb + j] with A_i = A + arow[i] (rows contiguous in l).
template <class T>
PYECCV_INLINE void micro_cols(int64_t L, const T* A, const int64_t* arow, const T* B, int64_t ldb, T* tile) {
  using V = typename Vec<T>::v;
  constexpr int N = Vec<T>::N;
  constexpr int P = rows_per_pass<2>();
  for (int i0 = 0; i0 < MR; i0 += P) {
    V acc[P][2];
    const T* a[P];
#pragma GCC unroll 8
    for (int i = 0; i < P; ++i) {
      acc[i][0] = acc[i][1] = V{};
      a[i] = A + arow[i0 + i];
    }
    for (int64_t l = 0; l < L; ++l) {
      const T* b = B + l * ldb;
      const V b0 = *reinterpret_cast<const V*>(b), b1 = *reinterpret_cast<const V*>(b + N);
#pragma GCC unroll 8
      for (int i = 0; i < P; ++i) {
        const T ai = a[i][l];
        acc[i][0] += ai * b0;
        acc[i][1] += ai * b1;
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < P; ++i) {
      *reinterpret_cast<V*>(tile + (i0 + i) * 2 * N) = acc[i][0];
      *reinterpret_cast<V*>(tile + (i0 + i) * 2 * N + N) = acc[i][1];
    }
  }
}

struct Geo {
  int64_t B, C, H, W, Co, heads, co, kh, kw, kk, keep, sh, sw, ph, pw, dh, dw, Ho, Wo, HW, HoWo;
  int64_t Hp, Wp;     // zero-padded input plane
  int64_t plane;      // elements per padded plane buffer (with read-over slack)
  int64_t fplane;     // stride-1 forward: elements per column-shifted plane (Hp x Wo, with slack)
  int64_t co_a;       // co rounded up to MR (rows of the packed weight panels)
  int64_t co_b;       // co rounded up to NR (columns of the weight-gradient tiles)
  int64_t co_t;       // co rounded up to two vectors (small-map forward: output channels in lanes)
  bool direct;        // stride 1: B rows are contiguous rows of column-shifted planes
  int64_t P, panels;  // forward GEMM pixels (Ho * Wo) and 32-pixel panels
  // backward: stride-1 grid of the zero-inserted output gradient
  int64_t G1h, lead, gplane, L1;
};

template <class T>
Geo make_geo(const DynGroupConvProblem& p) {
  Geo g{};
  g.B = p.batch, g.C = p.in_channels, g.H = p.height, g.W = p.width, g.Co = p.out_channels;
  g.heads = p.heads, g.co = p.out_channels / p.heads, g.kh = p.kh, g.kw = p.kw, g.kk = p.kh * p.kw;
  g.keep = p.keep, g.sh = p.stride_h, g.sw = p.stride_w, g.ph = p.pad_h, g.pw = p.pad_w;
  g.dh = p.dil_h, g.dw = p.dil_w;
  g.Ho = dgc_out_size(g.H, g.kh, g.sh, g.ph, g.dh);
  g.Wo = dgc_out_size(g.W, g.kw, g.sw, g.pw, g.dw);
  g.HW = g.H * g.W, g.HoWo = g.Ho * g.Wo;
  g.Hp = g.H + 2 * g.ph, g.Wp = g.W + 2 * g.pw;
  const int64_t nr = NR<T>;
  g.plane = round_up(g.Hp * g.Wp + (g.kw - 1) * g.dw + nr, 16);
  g.fplane = round_up(g.Hp * g.Wo + nr, 16);
  g.co_a = round_up(g.co, MR);
  g.co_b = round_up(g.co, nr);
  g.co_t = round_up(g.co, 2 * Vec<T>::N);
  g.direct = g.sh == 1 && g.sw == 1;
  g.P = g.Ho * g.Wo;
  g.panels = (g.P + nr - 1) / nr;
  g.G1h = g.Hp - (g.kh - 1) * g.dh;
  g.lead = round_up((g.kh - 1) * g.dh * g.Wp + (g.kw - 1) * g.dw, 16);
  g.gplane = round_up(g.lead + std::max(g.G1h, g.ph + g.H) * g.Wp + nr, 16);
  g.L1 = g.G1h * g.Wp;
  return g;
}

template <class T>
struct Ctx {
  Geo g;
  const T* x;
  const T* w;
  const T* s;
  const int64_t* goff;   // strided forward: padded-plane offset of output pixel p (Ho * Wo)
  const T* wpan;         // forward, large batches: filters in panel-major order (see pack_filters)
  const T* wcv;          // forward, large batches, small maps: wcv[((h C + c) kk + r) co_t + m] (see pack_filters_cv)
  const T* wtr;          // backward, large batches: per (head, channel) its co x kk filters (see transpose_filters)
  T* out;
  const T* gout;
  T* gx;                 // backward: s * d_plane per (b, h, slot) (B * heads * keep * HW)
  int32_t* slot;         // backward: slot of channel c in head (b, h), or -1 (B * heads * C)
  T* ds;
};

// Per-thread scratch storage kept between calls (grow-only, one slot per buffer): fresh vectors
// of a few hundred KB per call went to mmap / munmap and page-faulted on every call (6% of a B = 1
// forward). A thread keeps at most its largest call's scratch (a few MB at C = 512).
template <class E>
E* pooled(int slot, int64_t n) {
  static thread_local std::vector<E> pool[8];
  std::vector<E>& v = pool[slot];
  if (static_cast<int64_t>(v.size()) < n) {
    std::vector<E>().swap(v);
    v.resize(static_cast<size_t>(n));
  }
  return v.data();
}

template <class T>
struct Scratch {
  T *tmp, *planes, *bpack = nullptr, *tile, *gbuf = nullptr, *gt = nullptr, *apack;
  // weight-gradient partial: blocks (h, c) of kk x co_b, zeroed when a task first touches them
  std::shared_ptr<T[]> dwt;
  std::shared_ptr<uint8_t[]> touched;
  int32_t* idx;
  const T** arows = nullptr;  // backward: A row pointers of the input gradient (large batches)
  int64_t *aoff = nullptr, *boff, *dst = nullptr, *roff;  // aoff, dst: backward only
  Scratch(const Geo& g, bool backward) {
    const int64_t nr = NR<T>, K = g.keep * g.kk;
    tmp = pooled<T>(0, std::max(g.C, g.Wp));  // selection scratch, then a padded row (stride-1 forward)
    idx = pooled<int32_t>(0, g.C);
    planes = pooled<T>(1, g.direct && !backward ? g.keep * std::max(g.kw * g.fplane, g.plane) : g.keep * g.plane);
    // a panel's tiles (all row blocks); small maps: the P x co_t transposed tile
    tile = pooled<T>(2, std::max(std::max(g.co_a, round_up(g.keep, MR)) * nr, Vec<T>::N * g.co_t));
    boff = pooled<int64_t>(1, std::max(K, g.co * g.kk) + MR);
    roff = pooled<int64_t>(3, 2 * g.kk);  // the second half: forward tap offsets when kk > 64
    for (int64_t r = 0; r < g.kk; ++r) roff[r] = (r / g.kw) * g.dh * g.Wp + (r % g.kw) * g.dw;
    if (!backward) {
      if (!g.direct) bpack = pooled<T>(3, K * nr + 64 / sizeof(T));
      apack = pooled<T>(4, g.co_a * K);
    } else {
      aoff = pooled<int64_t>(0, round_up(std::max(K, g.co * g.kk), MR));  // rows (c, r), then (m, r)
      dst = pooled<int64_t>(2, 3 * nr);  // up to nr runs of (column, pixel, length)
      gbuf = pooled<T>(5, g.co * g.gplane);
      gt = pooled<T>(6, g.L1 * g.co_b);
      apack = pooled<T>(4, round_up(g.keep, MR) * g.co * g.kk);
      arows = reinterpret_cast<const T**>(pooled<uintptr_t>(0, round_up(g.keep, MR)));
      dwt.reset(new T[g.heads * g.C * g.kk * g.co_b]);
      touched.reset(new uint8_t[g.heads * g.C]());
    }
  }
};

// The kept channels of one (b, h) row, ascending; returns their count.
template <class T>
int64_t select(const T* s, int64_t C, int64_t keep, T* tmp, int32_t* idx) {
  if (keep >= C) {
    for (int64_t c = 0; c < C; ++c) idx[c] = static_cast<int32_t>(c);
    return C;
  }
  std::copy(s, s + C, tmp);
  const int64_t d = C - keep;
  std::nth_element(tmp, tmp + (d - 1), tmp + C);
  const T t = tmp[d - 1];
  int64_t n = 0;
  for (int64_t c = 0; c < C; ++c)
    if (s[c] > t) idx[n++] = static_cast<int32_t>(c);
  return n;
}

// planes[i] = saliency * x[b][idx[i]], zero-padded to Hp x Wp (and zero slack after).
template <class T>
PYECCV_INLINE void fill_planes(const Geo& g, const T* xb, const T* sb, const int32_t* idx, int64_t n, T* planes,
                               int64_t stride) {
  for (int64_t i = 0; i < n; ++i) {
    T* pl = planes + i * stride;
    std::fill(pl, pl + stride, T(0));
    const T sc = sb[idx[i]];
    const T* src = xb + idx[i] * g.HW;
    for (int64_t y = 0; y < g.H; ++y) {
      T* d = pl + (y + g.ph) * g.Wp + g.pw;
      const T* q = src + y * g.W;
#pragma omp simd
      for (int64_t v = 0; v < g.W; ++v) d[v] = sc * q[v];
    }
  }
}

// Stride-1 forward: planes[i kw + dx] (Hp x Wo, row stride Wo) = column dx * dw onwards of the
// zero-padded plane of saliency * x[b][idx[i]], zero slack after. Tap (dy, dx) of output pixel
// p = oh Wo + ow then reads planes[i kw + dx][p + dy dh Wo]: contiguous in p, and only the Ho x Wo
// output pixels are computed (Wp-wide output rows wasted 2 pw / Wp of the FMAs: 12.5% at 14 x 14).
template <class T>
PYECCV_INLINE void fill_shifted_planes(const Geo& g, const T* xb, const T* sb, const int32_t* idx, int64_t n,
                                       T* planes, T* row) {
  for (int64_t i = 0; i < n; ++i) {
    const T sc = sb[idx[i]];
    const T* src = xb + idx[i] * g.HW;
    for (int64_t dx = 0; dx < g.kw; ++dx) {
      T* pl = planes + (i * g.kw + dx) * g.fplane;
      std::fill(pl, pl + g.ph * g.Wo, T(0));
      std::fill(pl + (g.ph + g.H) * g.Wo, pl + g.fplane, T(0));
    }
    std::fill(row, row + g.Wp, T(0));
    for (int64_t y = 0; y < g.H; ++y) {
      const T* q = src + y * g.W;
#pragma omp simd
      for (int64_t v = 0; v < g.W; ++v) row[g.pw + v] = sc * q[v];
      for (int64_t dx = 0; dx < g.kw; ++dx)
        copy_short(row + dx * g.dw, g.Wo, planes + (i * g.kw + dx) * g.fplane + (y + g.ph) * g.Wo);
    }
  }
}

template <class T>
PYECCV_INLINE void task_forward(const Ctx<T>& c, int64_t bh, int64_t pan0, int64_t pan1, Scratch<T>& w) {
  const Geo& g = c.g;
  constexpr int64_t nr = NR<T>;
  const int64_t b = bh / g.heads, h = bh % g.heads;
  const T* sb = c.s + bh * g.C;
  const int64_t n = select(sb, g.C, g.keep, w.tmp, w.idx);
  const int64_t K = n * g.kk;
  if (g.direct)
    fill_shifted_planes(g, c.x + b * g.C * g.HW, sb, w.idx, n, w.planes, w.tmp);
  else
    fill_planes(g, c.x + b * g.C * g.HW, sb, w.idx, n, w.planes, g.plane);
  // A: per (filter block mb, kept channel) one kk x MR block. Large batches read them in place from
  // the panel-major filters of the call; small ones gather them into the task's panel
  // ap[(mb n + ci) kk MR + r MR + i] = W[h co + mb MR + i][idx[ci]][r].
  const int64_t mblocks = g.co_a / MR, kkm = g.kk * MR;
  int64_t* aoff = w.boff;  // per kept channel: offset of its block within a filter block's A
  const T* A;
  int64_t astride;
  if (c.wpan) {
    A = c.wpan + h * mblocks * g.C * kkm, astride = g.C * kkm;
    for (int64_t ci = 0; ci < n; ++ci) aoff[ci] = w.idx[ci] * kkm;
  } else {  // gather from the 8 filter rows of each block, 8 taps at a time by an 8 x 8 transpose in
            // registers (scalar strided stores cost ~2 cycles an element)
    T* ap = w.apack;
    for (int64_t mb = 0; mb < mblocks; ++mb) {
      const T* rows[MR];  // a partial block repeats its last row: those tile rows are never stored
      for (int64_t i = 0; i < MR; ++i) rows[i] = c.w + (h * g.co + std::min(mb * MR + i, g.co - 1)) * g.C * g.kk;
      T* d0 = ap + mb * K * MR;
      for (int64_t ci = 0; ci < n; ++ci) {
        const int64_t off = w.idx[ci] * g.kk;
        T* dc = d0 + ci * kkm;
        int64_t r = 0;
        for (; r + MR <= g.kk; r += MR) transpose8(rows, off + r, dc + r * MR);
        for (; r < g.kk; ++r)
          for (int64_t i = 0; i < MR; ++i) dc[r * MR + i] = rows[i][off + r];
      }
    }
    A = ap, astride = K * MR;
    for (int64_t ci = 0; ci < n; ++ci) aoff[ci] = ci * kkm;
  }
  // B rows of kept channel ci, tap r: stride 1: row dx of its shifted planes, dy rows down (read
  // in place); strided: row ci kk + r of the panel's gathered block
  int64_t toff[64];
  int64_t* tap = g.kk <= 64 ? toff : w.roff + g.kk;
  for (int64_t r = 0; r < g.kk; ++r)
    tap[r] = g.direct ? (r % g.kw) * g.fplane + (r / g.kw) * g.dh * g.Wo : r * nr;
  T* outb = c.out + b * g.Co * g.HoWo;
  T* tile = w.tile;
  for (int64_t pan = pan0; pan < pan1; ++pan) {
    const int64_t n0 = pan * nr, nv = std::min(nr, g.P - n0);  // output pixels n0 .. n0 + nv - 1
    const T* Bb = w.planes + n0;
    int64_t bstride = g.kw * g.fplane;
    if (!g.direct) {  // strided: gather the panel's B rows into a sequential K x NR block
      T* bp = align64(w.bpack);
      const int64_t* go = c.goff + n0;
      for (int64_t ci = 0, k = 0; ci < n; ++ci)
        for (int64_t r = 0; r < g.kk; ++r, ++k) {
          const T* pl = w.planes + ci * g.plane + w.roff[r];
          T* row = bp + k * nr;
          for (int64_t j = 0; j < nv; ++j) row[j] = pl[go[j]];
          for (int64_t j = nv; j < nr; ++j) row[j] = T(0);
        }
      Bb = bp, bstride = g.kk * nr;
    }
    if (nv > Vec<T>::N)
      gemm_panel_chan<2>(n, g.kk, mblocks, A, astride, aoff, Bb, bstride, tap, tile);
    else  // a panel of at most one vector of pixels: half the tile
      gemm_panel_chan<1>(n, g.kk, mblocks, A, astride, aoff, Bb, bstride, tap, tile);
    for (int64_t m = 0; m < g.co; ++m) copy_short(tile + m * nr, nv, outb + (m * g.heads + h) * g.HoWo + n0);
  }
}

// Small-map forward of one (b, h) (large batch: the call's wcv filters; any stride), all P pixels,
// output channels [mlo, mhi) of co_t. B reads are scalar broadcasts at pixel offsets goff of compact
// zero-padded planes (Hp x Wp each): no shifted copies, no slack.
template <class T>
PYECCV_INLINE void task_forward_cv(const Ctx<T>& c, int64_t bh, int64_t mlo, int64_t mhi, Scratch<T>& w) {
  const Geo& g = c.g;
  const int64_t b = bh / g.heads, h = bh % g.heads;
  const T* sb = c.s + bh * g.C;
  const int64_t n = select(sb, g.C, g.keep, w.tmp, w.idx);
  const int64_t stride = g.Hp * g.Wp;  // compact zero-padded planes: the kernel reads no slack
  fill_planes(g, c.x + b * g.C * g.HW, sb, w.idx, n, w.planes, stride);
  int64_t* aoff = w.boff;
  for (int64_t ci = 0; ci < n; ++ci) aoff[ci] = (h * g.C + w.idx[ci]) * g.kk * g.co_t;
  T* tt = w.tile;
  gemm_cv(n, g.kk, g.P, g.co_t, c.wcv, aoff, w.planes, stride, w.roff, c.goff, mlo, mhi, tt,
          g.Wo == 4 && g.sw == 1, g.sh * g.Wp);
  T* outb = c.out + b * g.Co * g.HoWo;
  for (int64_t m = mlo; m < std::min(mhi, g.co); ++m) {
    T* d = outb + (m * g.heads + h) * g.HoWo;
    for (int64_t p = 0; p < g.P; ++p) d[p] = tt[p * g.co_t + m];
  }
}

template <class T>
PYECCV_INLINE void task_backward(const Ctx<T>& c, int64_t bh, Scratch<T>& w) {
  const Geo& g = c.g;
  constexpr int64_t nr = NR<T>;
  const int64_t b = bh / g.heads, h = bh % g.heads;
  const T* sb = c.s + bh * g.C;
  T* dsb = c.ds + bh * g.C;
  int32_t* slot = c.slot + bh * g.C;
  std::fill(dsb, dsb + g.C, T(0));
  std::fill(slot, slot + g.C, -1);
  const int32_t* idx = w.idx;
  const int64_t n = select(sb, g.C, g.keep, w.tmp, w.idx);
  if (n == 0) return;
  const int64_t K = n * g.kk, CK = g.co * g.kk;
  const T* xb = c.x + b * g.C * g.HW;
  fill_planes(g, xb, sb, idx, n, w.planes, g.plane);
  for (int64_t ci = 0; ci < n; ++ci) {
    const int64_t hc = h * g.C + idx[ci];
    if (!w.touched[hc]) {
      std::fill(w.dwt.get() + hc * g.kk * g.co_b, w.dwt.get() + (hc + 1) * g.kk * g.co_b, T(0));
      w.touched[hc] = 1;
    }
  }
  // g_h in the stride-1 padded grid: g1_m[lead + (oh sh) Wp + ow sw] = g[b][m heads + h][oh][ow]
  T* gbuf = w.gbuf;
  std::fill(gbuf, gbuf + g.co * g.gplane, T(0));
  for (int64_t m = 0; m < g.co; ++m) {
    const T* src = c.gout + (b * g.Co + m * g.heads + h) * g.HoWo;
    T* d = gbuf + m * g.gplane + g.lead;
    if (g.direct)
      for (int64_t oh = 0; oh < g.Ho; ++oh) copy_short(src + oh * g.Wo, g.Wo, d + oh * g.Wp);
    else
      for (int64_t oh = 0; oh < g.Ho; ++oh)
        for (int64_t ow = 0; ow < g.Wo; ++ow) d[oh * g.sh * g.Wp + ow * g.sw] = src[oh * g.Wo + ow];
  }
  // weight gradient: rows (c, r), columns m, reduction over the grid l < L1
  T* gt = w.gt;
  for (int64_t l = 0; l < g.L1; ++l) {
    T* row = gt + l * g.co_b;
    for (int64_t m = 0; m < g.co; ++m) row[m] = gbuf[m * g.gplane + g.lead + l];
    for (int64_t m = g.co; m < g.co_b; ++m) row[m] = T(0);
  }
  int64_t* arow = w.aoff;
  for (int64_t k = 0; k < round_up(K, MR); ++k) {  // rows past K repeat the last one (never stored)
    const int64_t kc = std::min(k, K - 1);
    arow[k] = (kc / g.kk) * g.plane + w.roff[kc % g.kk];
  }
  T* tile = w.tile;
  for (int64_t k0 = 0; k0 < K; k0 += MR) {
    const int64_t kv = std::min<int64_t>(MR, K - k0);
    for (int64_t m0 = 0; m0 < g.co_b; m0 += nr) {
      micro_cols(g.L1, w.planes, arow + k0, gt + m0, g.co_b, tile);
      for (int64_t i = 0; i < kv; ++i) {
        const int64_t k = k0 + i;
        T* d = w.dwt.get() + ((h * g.C + idx[k / g.kk]) * g.kk + k % g.kk) * g.co_b + m0;
        const T* t = tile + i * nr;
#pragma omp simd
        for (int64_t j = 0; j < nr; ++j) d[j] += t[j];
      }
    }
  }
  // input gradient: rows = kept channels, reduction (m, r), columns q over the interior rows
  T* ap = w.apack;
  const int64_t cpanels = (n + MR - 1) / MR;
  // large batches: A rows read in place from the call's transposed filters (row of kept channel
  // ci: wtr[(h C + idx[ci]) CK + m kk + r]); a partial panel repeats its last channel
  const T** arows = w.arows;
  if (c.wtr)
    for (int64_t k = 0; k < cpanels * MR; ++k) arows[k] = c.wtr + (h * g.C + idx[std::min(k, n - 1)]) * CK;
  // ap[(cp CK + m kk + r) MR + i] = W[h co + m][idx[cp MR + i]][r]: row m of the head's filters is
  // walked once, in channel order (the reads stream; the panel stays in cache); 8 channels x 8
  // taps at a time by an 8 x 8 transpose in registers (scalar strided stores: ~2 cycles an
  // element, as much as the GEMM at 4 x 4 maps). A partial panel repeats its last channel: those
  // tile rows are never stored.
  for (int64_t m = 0; m < g.co && !c.wtr; ++m) {
    const T* row = c.w + (h * g.co + m) * g.C * g.kk;
    for (int64_t cp = 0; cp < cpanels; ++cp) {
      const T* rows[MR];
      for (int64_t i = 0; i < MR; ++i) rows[i] = row + idx[std::min(cp * MR + i, n - 1)] * g.kk;
      T* d = ap + (cp * CK + m * g.kk) * MR;
      int64_t r = 0;
      for (; r + MR <= g.kk; r += MR) transpose8(rows, r, d + r * MR);
      for (; r < g.kk; ++r)
        for (int64_t i = 0; i < MR; ++i) d[r * MR + i] = rows[i][r];
    }
  }
  int64_t* boff = arow;  // B row (m, r): g1_m shifted back by the tap offset (table reused)
  for (int64_t m = 0, l = 0; m < g.co; ++m)
    for (int64_t r = 0; r < g.kk; ++r, ++l) boff[l] = m * g.gplane + g.lead - w.roff[r];
  T* gxb = c.gx + bh * g.keep * g.HW;
  const int64_t q0 = g.ph * g.Wp, qn = g.H * g.Wp;
  int64_t* dst = w.dst;
  for (int64_t n0 = 0, y0 = 0, x0 = 0; n0 < qn; n0 += nr) {
    // the panel's interior pixels as runs (column j0, input pixel d0, length) within padded rows
    int64_t runs = 0;
    for (int64_t j = 0, y = y0, xq = x0; j < nr && y < g.H;) {
      const int64_t len = std::min(nr - j, g.Wp - xq), xw = xq - g.pw;
      const int64_t a = std::max<int64_t>(xw, 0), e = std::min<int64_t>(xw + len, g.W);
      if (a < e) {
        dst[3 * runs] = j + (a - xw), dst[3 * runs + 1] = y * g.W + a, dst[3 * runs + 2] = e - a;
        ++runs;
      }
      j += len, xq += len;
      if (xq == g.Wp) xq = 0, ++y;
    }
    x0 += nr, y0 += x0 / g.Wp, x0 %= g.Wp;  // the next panel's start (one division a panel)
    if (c.wtr)
      gemm_panel(CK, cpanels, RowPtrA<T>{arows, 0}, gbuf + q0 + n0, boff, tile);
    else
      gemm_panel(CK, cpanels, PackedA<T>{ap}, gbuf + q0 + n0, boff, tile);
    for (int64_t cp = 0; cp < cpanels; ++cp) {
      const int64_t cv = std::min<int64_t>(MR, n - cp * MR);
      for (int64_t i = 0; i < cv; ++i) {
        T* d = gxb + (cp * MR + i) * g.HW;
        const T* t = tile + (cp * MR + i) * nr;
        for (int64_t u = 0; u < runs; ++u) copy_short(t + dst[3 * u], dst[3 * u + 2], d + dst[3 * u + 1]);
      }
    }
  }
  // saliency gradient (unscaled x . d_plane), then the slot holds s * d_plane for d_x
  for (int64_t i = 0; i < n; ++i) {
    T* d = gxb + i * g.HW;
    const T* xc = xb + idx[i] * g.HW;
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t v = 0; v < g.HW; ++v) acc += xc[v] * d[v];
    dsb[idx[i]] = acc;
    const T sc = sb[idx[i]];
#pragma omp simd
    for (int64_t v = 0; v < g.HW; ++v) d[v] *= sc;
    slot[idx[i]] = static_cast<int32_t>(i);
  }
}

void fwd_f32(const Ctx<float>& c, int64_t bh, int64_t p0, int64_t p1, Scratch<float>& w) {
  if (c.wcv) task_forward_cv(c, bh, p0, p1, w);
  else task_forward(c, bh, p0, p1, w);
}
void bwd_f32(const Ctx<float>& c, int64_t bh, Scratch<float>& w) { task_backward(c, bh, w); }
void fwd_f64(const Ctx<double>& c, int64_t bh, int64_t p0, int64_t p1, Scratch<double>& w) {
  if (c.wcv) task_forward_cv(c, bh, p0, p1, w);
  else task_forward(c, bh, p0, p1, w);
}
void bwd_f64(const Ctx<double>& c, int64_t bh, Scratch<double>& w) { task_backward(c, bh, w); }
PYECCV_INLINE void fwd(const Ctx<float>& c, int64_t bh, int64_t p0, int64_t p1, Scratch<float>& w) {
  fwd_f32(c, bh, p0, p1, w);
}
PYECCV_INLINE void fwd(const Ctx<double>& c, int64_t bh, int64_t p0, int64_t p1, Scratch<double>& w) {
  fwd_f64(c, bh, p0, p1, w);
}
PYECCV_INLINE void bwd(const Ctx<float>& c, int64_t bh, Scratch<float>& w) { bwd_f32(c, bh, w); }
PYECCV_INLINE void bwd(const Ctx<double>& c, int64_t bh, Scratch<double>& w) { bwd_f64(c, bh, w); }

void check(const DynGroupConvProblem& p) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("dyn_group_conv: " + m); };
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat64) fail("dtype must be float32 or float64 on CPU");
  if (p.batch < 0 || p.in_channels < 1 || p.height < 1 || p.width < 1 || p.out_channels < 1)
    fail("sizes must be positive (batch >= 0)");
  if (p.heads < 1 || p.out_channels % p.heads != 0) fail("out_channels must be divisible by heads >= 1");
  if (p.keep < 1 || p.keep > p.in_channels) fail("keep must be in [1, in_channels]");
  if (p.kh < 1 || p.kw < 1 || p.stride_h < 1 || p.stride_w < 1 || p.dil_h < 1 || p.dil_w < 1 || p.pad_h < 0 ||
      p.pad_w < 0)
    fail("kernel, stride and dilation must be >= 1, padding >= 0");
  if (dgc_out_size(p.height, p.kh, p.stride_h, p.pad_h, p.dil_h) < 1 ||
      dgc_out_size(p.width, p.kw, p.stride_w, p.pad_w, p.dil_w) < 1)
    fail("the output would be empty");
}

template <class T>
void check_saliency(const DynGroupConvProblem& p) {
  const T* s = static_cast<const T*>(p.saliency);
  const int64_t n = p.batch * p.heads * p.in_channels;
  for (int64_t i = 0; i < n; ++i)
    if (!(s[i] >= T(0))) throw std::invalid_argument("dyn_group_conv: saliency must be non-negative and not NaN");
}

int threads_for(int num_threads, int64_t tasks, double work) {
  int nt = 1;
#ifdef PYECCV_HAS_OPENMP
  nt = num_threads > 0 ? num_threads : omp_get_max_threads();
  if (work < 2e5) nt = 1;
  nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, tasks)));
#else
  (void)num_threads, (void)tasks, (void)work;
#endif
  return nt;
}

inline int thread_id() {
#ifdef PYECCV_HAS_OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

template <class T>
Ctx<T> make_ctx(const DynGroupConvProblem& p) {
  Ctx<T> c{};
  c.g = make_geo<T>(p);
  c.x = static_cast<const T*>(p.x);
  c.w = static_cast<const T*>(p.weight);
  c.s = static_cast<const T*>(p.saliency);
  return c;
}

// wpan[((h mblocks + mb) C + c) kk MR + r MR + i] = W[h co + mb MR + i][c][r] (0 for rows >= co):
// every (head, 8-row block, channel) a contiguous kk x MR block, so a task packs its kept channels'
// filter panels with contiguous copies. One pass over the filters per call: used when the tasks'
// packing (B x keep / C of the filters) outweighs it.
template <class T>
void pack_filters(const Geo& g, const T* w, T* wpan, int nt) {
  const int64_t mblocks = g.co_a / MR, kkm = g.kk * MR;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t hm = 0; hm < g.heads * mblocks; ++hm) {
    const int64_t h = hm / mblocks, mb = hm % mblocks;
    const int64_t mv = std::min<int64_t>(MR, g.co - mb * MR);
    T* d = wpan + hm * g.C * kkm;
    for (int64_t i = 0; i < MR; ++i) {
      if (i >= mv) {
        for (int64_t e = 0; e < g.C * g.kk; ++e) d[e * MR + i] = T(0);
        continue;
      }
      const T* src = w + (h * g.co + mb * MR + i) * g.C * g.kk;
      for (int64_t e = 0; e < g.C * g.kk; ++e) d[e * MR + i] = src[e];
    }
  }
}

// wcv[((h C + c) kk + r) co_t + m] = W[h co + m][c][r] (0 for m >= co): per (head, channel, tap)
// the head's output channels contiguous (the small-map forward's vector lanes).
template <class T>
void pack_filters_cv(const Geo& g, const T* w, T* wcv, int nt) {
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t hc = 0; hc < g.heads * g.C; ++hc) {
    const int64_t h = hc / g.C, ch = hc % g.C;
    T* d = wcv + hc * g.kk * g.co_t;
    for (int64_t m = 0; m < g.co_t; ++m) {
      const T* src = w + ((h * g.co + std::min(m, g.co - 1)) * g.C + ch) * g.kk;
      for (int64_t r = 0; r < g.kk; ++r) d[r * g.co_t + m] = m < g.co ? src[r] : T(0);
    }
  }
}

template <class T>
void run_forward(const DynGroupConvProblem& p, void* out, int num_threads) {
  check(p);
  if (p.batch == 0) return;
  check_saliency<T>(p);
  Ctx<T> c = make_ctx<T>(p);
  const Geo& g = c.g;
  c.out = static_cast<T*>(out);
  // small maps (at most one vector of output pixels, where the pixel-lane kernel runs a half tile:
  // 4 x 4 on AVX-512), large batches: output channels in the vector lanes (task_forward_cv)
  const bool cv = g.P <= Vec<T>::N && g.B * g.keep >= 4 * g.C;
  std::vector<int64_t> goff;
  if (!g.direct || cv) {
    goff.resize(g.P);
    for (int64_t oh = 0; oh < g.Ho; ++oh)
      for (int64_t ow = 0; ow < g.Wo; ++ow) goff[oh * g.Wo + ow] = oh * g.sh * g.Wp + ow * g.sw;
    c.goff = goff.data();
  }
  const int64_t bh_tasks = g.B * g.heads;
  int nt = threads_for(num_threads, bh_tasks * g.panels,
                       static_cast<double>(g.B) * g.Co * g.keep * g.kk * g.HoWo);
  // fewer than two (b, h) tasks per thread: split the pixel panels into chunks
  const int64_t chunks =
      cv ? 1 : std::min<int64_t>(g.panels, std::max<int64_t>(1, (2 * nt + bh_tasks - 1) / bh_tasks));
  if (g.B * g.keep >= 4 * g.C) {  // the calling thread's pool (slot 7: not used by Scratch)
    if (cv) {
      T* wcv = pooled<T>(7, g.heads * g.C * g.kk * g.co_t);
      pack_filters_cv(g, c.w, wcv, nt);
      c.wcv = wcv;
    } else {
      T* wpan = pooled<T>(7, g.heads * g.co_a * g.C * g.kk);
      pack_filters(g, c.w, wpan, nt);
      c.wpan = wpan;
    }
  }
  if (cv) {  // one (b, h) per task, all its pixels and output channels
    // (tasks of one block of output channels over the samples, so that the block's filters stay in
    // L2, measured slower: 12 vs 8 ms at B = 64, C = 512, 4 x 4, keep 128 on AVX-512)
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
      Scratch<T> w(g, false);
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < bh_tasks; ++t) {
        const int64_t bh = (t % g.B) * g.heads + t / g.B;  // head-major, as below
        fwd(c, bh, 0, g.co_t, w);
      }
    }
    return;
  }
  const int64_t per = (g.panels + chunks - 1) / chunks;
  const int64_t tasks = bh_tasks * chunks;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    Scratch<T> w(g, false);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      // head-major: consecutive tasks share a head's filters (C co kk of them), which then stay
      // in L2 instead of cycling through all heads' from L3
      const int64_t hb = t / chunks, ch = t % chunks;
      const int64_t bh = (hb % g.B) * g.heads + hb / g.B;
      const int64_t p0 = ch * per, p1 = std::min(g.panels, p0 + per);
      if (p0 < p1) fwd(c, bh, p0, p1, w);
    }
  }
}

// wtr[(h C + c) co kk + m kk + r] = W[h co + m][c][r]: per (head, input channel) its co x kk
// filters contiguous, so the input gradient reads a kept channel's GEMM row in place. One pass over
// the filters per call: used when the tasks' packing (B x keep / C of the filters) outweighs it.
template <class T>
void transpose_filters(const Geo& g, const T* w, T* wtr, int nt) {
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t hc = 0; hc < g.heads * g.C; ++hc) {
    const int64_t h = hc / g.C, ch = hc % g.C;
    T* d = wtr + hc * g.co * g.kk;
    for (int64_t m = 0; m < g.co; ++m) copy_short(w + ((h * g.co + m) * g.C + ch) * g.kk, g.kk, d + m * g.kk);
  }
}

template <class T>
void run_backward(const DynGroupConvProblem& p, const void* g_out, void* d_x, void* d_weight, void* d_saliency,
                  int num_threads) {
  check(p);
  T* dw = static_cast<T*>(d_weight);
  const int64_t wn = p.out_channels * p.in_channels * p.kh * p.kw;
  if (p.batch == 0) {
    std::fill(dw, dw + wn, T(0));
    return;
  }
  check_saliency<T>(p);
  Ctx<T> c = make_ctx<T>(p);
  const Geo& g = c.g;
  c.gout = static_cast<const T*>(g_out);
  c.ds = static_cast<T*>(d_saliency);
  std::vector<T> gx(g.B * g.heads * g.keep * g.HW);
  std::vector<int32_t> slot(g.B * g.heads * g.C);
  c.gx = gx.data();
  c.slot = slot.data();
  const int64_t tasks = g.B * g.heads;
  const int nt = threads_for(num_threads, tasks, 3.0 * g.B * g.Co * g.keep * g.kk * g.HoWo);
  std::vector<std::pair<std::shared_ptr<T[]>, std::shared_ptr<uint8_t[]>>> partials(static_cast<size_t>(nt));
  T* dx = static_cast<T*>(d_x);
  if (g.B * g.keep >= 4 * g.C) {  // the calling thread's pool (slot 7: not used by Scratch)
    T* wtr = pooled<T>(7, g.heads * g.co * g.C * g.kk);
    transpose_filters(g, c.w, wtr, nt);
    c.wtr = wtr;
  }
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    Scratch<T> w(g, true);
    // static round-robin: the same tasks go to the same thread every call (deterministic sums)
#pragma omp for schedule(static, 1)
    for (int64_t t = 0; t < tasks; ++t) bwd(c, t, w);
    partials[static_cast<size_t>(thread_id())] = {w.dwt, w.touched};
    // d_x[b][c] = sum over heads (in order) of the heads' slots
#pragma omp for schedule(static)
    for (int64_t bc = 0; bc < g.B * g.C; ++bc) {
      const int64_t b = bc / g.C, ch = bc % g.C;
      T* d = dx + bc * g.HW;
      std::fill(d, d + g.HW, T(0));
      for (int64_t h = 0; h < g.heads; ++h) {
        const int32_t s = slot[(b * g.heads + h) * g.C + ch];
        if (s < 0) continue;
        const T* src = gx.data() + ((b * g.heads + h) * g.keep + s) * g.HW;
#pragma omp simd
        for (int64_t v = 0; v < g.HW; ++v) d[v] += src[v];
      }
    }
    // d_weight: partials in thread order, transposed back ((h, c) per step: kk * co contiguous
    // reads per partial, co runs of kk contiguous writes)
    std::vector<T> acc(g.kk * g.co_b);
#pragma omp for schedule(static)
    for (int64_t hc = 0; hc < g.heads * g.C; ++hc) {
      const int64_t h = hc / g.C, ch = hc % g.C;
      std::fill(acc.begin(), acc.end(), T(0));
      for (const auto& part : partials) {
        if (!part.second[hc]) continue;
        const T* src = part.first.get() + hc * g.kk * g.co_b;
#pragma omp simd
        for (int64_t e = 0; e < g.kk * g.co_b; ++e) acc[e] += src[e];
      }
      for (int64_t m = 0; m < g.co; ++m) {
        T* d = dw + ((h * g.co + m) * g.C + ch) * g.kk;
        for (int64_t r = 0; r < g.kk; ++r) d[r] = acc[r * g.co_b + m];
      }
    }
  }
}

}  // namespace

int64_t dgc_out_size(int64_t size, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
  if (stride < 1) return 0;
  const int64_t span = size + 2 * pad - dil * (k - 1) - 1;
  return span < 0 ? 0 : span / stride + 1;
}

void dgc_forward_cpu(const DynGroupConvProblem& p, void* out, int num_threads) {
  if (p.dtype == DType::kFloat64) run_forward<double>(p, out, num_threads);
  else run_forward<float>(p, out, num_threads);
}

void dgc_backward_cpu(const DynGroupConvProblem& p, const void* g_out, void* d_x, void* d_weight,
                      void* d_saliency, int num_threads) {
  if (p.dtype == DType::kFloat64) run_backward<double>(p, g_out, d_x, d_weight, d_saliency, num_threads);
  else run_backward<float>(p, g_out, d_x, d_weight, d_saliency, num_threads);
}

PYECCV_ISA_END
