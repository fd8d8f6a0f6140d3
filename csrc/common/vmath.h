// Vectorisable elementary functions for the CPU kernels.
//
// glibc's expf is a scalar call, so loops that need one exponential per element run at ~5-8 ns
// an element. These versions are branch-free straight-line arithmetic (magic-number rounding,
// bit casts, a Cephes polynomial), so `#pragma omp simd` loops vectorise them. Accuracy: within
// 2 ulp of expf on the clamped range the kernels use; float64 keeps std::exp (tests, gradcheck).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__)
#define PYECCV_INLINE inline __attribute__((always_inline))
#else
#define PYECCV_INLINE inline
#endif

namespace pyeccv {
namespace vmath {

// A bit cast the vectoriser sees through (memcpy through locals can stop it).
template <class To, class From>
PYECCV_INLINE To bit_cast(From x) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast: sizes differ");
#if defined(__GNUC__)
  return __builtin_bit_cast(To, x);
#else
  To y;
  std::memcpy(&y, &x, sizeof(To));
  return y;
#endif
}
PYECCV_INLINE int32_t bits_of(float x) { return bit_cast<int32_t>(x); }
PYECCV_INLINE float float_of(int32_t i) { return bit_cast<float>(i); }

// exp(x) for x in [-87, 88] (callers clamp); float.
PYECCV_INLINE float exp_f32(float x) {
  const float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * 1.44269504088896341f + kMagic;
  const float n = t - kMagic;
  const int32_t ni = bits_of(t) - 0x4b400000;  // the integer sits in the low mantissa bits
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln2 (Cody-Waite)
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * float_of((ni + 127) << 23);
}

PYECCV_INLINE double exp_f64(double x) { return std::exp(x); }

// exp(x) - 1 for x in [-87, 88] (callers clamp); float. The same reduction as exp_f32, x = n ln2 + r
// and exp(x) = 2^n (1 + q) with q = r + r^2 P(r), rearranged as 2^n q + (2^n - 1): for |x| < ln2/2
// (n = 0) that is q itself, with no cancellation against the 1, so small x keeps full relative
// precision (1 - exp(-x) computed as written loses log2(1/x) bits: 1e-5 relative at x = 1e-3).
PYECCV_INLINE float expm1_f32(float x) {
  const float kMagic = 12582912.0f;
  const float t = x * 1.44269504088896341f + kMagic;
  const float n = t - kMagic;
  const int32_t ni = bits_of(t) - 0x4b400000;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float q = p * r * r + r;
  const float s = float_of((ni + 127) << 23);
  return s * q + (s - 1.0f);
}
PYECCV_INLINE double expm1_f64(double x) { return std::expm1(x); }

// log(x) for positive normal floats (Cephes logf: frexp, one polynomial); within 2 ulp.
PYECCV_INLINE float log_f32(float x) {
  const int32_t b = bits_of(x);
  int32_t e = ((b >> 23) & 0xff) - 126;               // x = m 2^e with m in [0.5, 1)
  float m = float_of((b & 0x007fffff) | 0x3f000000);
  const int32_t small = m < 0.707106781186547524f;     // keep m - 1 small: m in [sqrt(1/2), sqrt(2))
  e -= small;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return m + y + 0.693359375f * fe;
}
PYECCV_INLINE double log_f64(double x) { return std::log(x); }

// Overloads, not template specialisations: GCC did not inline the specialisations inside
// `omp simd` loops, and the call then stopped vectorisation.
PYECCV_INLINE float exp(float x) { return exp_f32(x); }
PYECCV_INLINE double exp(double x) { return exp_f64(x); }
PYECCV_INLINE float expm1(float x) { return expm1_f32(x); }
PYECCV_INLINE double expm1(double x) { return expm1_f64(x); }
PYECCV_INLINE float log(float x) { return log_f32(x); }
PYECCV_INLINE double log(double x) { return log_f64(x); }

}  // namespace vmath
}  // namespace pyeccv
