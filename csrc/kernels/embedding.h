// Per-element math of fastdiff::timestep_embedding, used verbatim by the CPU kernel
// (csrc/cpu/embedding.cpp) and the CUDA kernel (csrc/cuda/embedding.cu), so the CPU
// tests check the formulas the GPU runs.
#pragma once
#include <cmath>
#include <cstdint>

#include "common.h"

namespace fastdiff {
namespace embedding {

// E-TSDM sharing map f(t) (docs/etsdm.md): left end of t's sub-interval of
// [0, end); identity at and beyond end, and when sharing is off (end <= 0).
template <typename acc>
FASTDIFF_HOST_DEVICE bool is_shared(acc t, acc end) {
  return end > acc(0) && t < end;
}

template <typename acc>
FASTDIFF_HOST_DEVICE acc share(acc t, acc width, acc end) {
  return is_shared(t, end) ? floor(t / width) * width : t;
}

// d f / d t: 0 inside shared sub-intervals, 1 elsewhere.
template <typename acc>
FASTDIFF_HOST_DEVICE acc share_slope(acc t, acc end) {
  return is_shared(t, end) ? acc(0) : acc(1);
}

// Below this |x| the fast range reduction of sincos_f32_fast is exact to well under an
// ulp: j = round(x * 2/pi) stays below 2^20, so j * kPio2Hi (33 bits) is exact.
constexpr float kFastSincosMax = 1048576.0f;  // 2^20

// sin and cos of one float32 argument |x| < kFastSincosMax, sharing one range reduction.
// Branch-free so that the compiler vectorizes the CPU loop; about 1 ulp. The reduction
// x - j * pi/2 is done in double to stay accurate for the large arguments timestep
// embeddings see (t * freq up to ~1e3 or more).
FASTDIFF_HOST_DEVICE void sincos_f32_fast(float x, float* s_out, float* c_out) {
  const double xd = (double)x;
  const double kShift = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to integer
  const double jd = (xd * 0.63661977236758134308 + kShift) - kShift;
  const float r = (float)((xd - jd * 1.5707963267341256e+00) - jd * 6.0771005065061922e-11);
  const int q = (int)(long long)jd;
  const float z = r * r;
  // Cephes sinf/cosf minimax polynomials on |r| <= pi/4.
  const float sp = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
  const float cp = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z +
                    4.166664568298827e-2f) * z * z - 0.5f * z + 1.0f;
  const bool swap = (q & 1) != 0;
  const float s0 = swap ? cp : sp;
  const float c0 = swap ? sp : cp;
  *s_out = ((q + 0) & 2) ? -s0 : s0;
  *c_out = ((q + 1) & 2) ? -c0 : c0;
}

// sin and cos of any float32: large, infinite and NaN arguments go to the double libm
// (a full range reduction on host and device; a float is exact in double, so the
// result is the correctly reduced value rounded once), as torch.sin / torch.cos give.
FASTDIFF_HOST_DEVICE void sincos_f32(float x, float* s_out, float* c_out) {
  if (fabsf(x) < kFastSincosMax) {
    sincos_f32_fast(x, s_out, c_out);
  } else {
    const double xd = (double)x;
    *s_out = (float)sin(xd);
    *c_out = (float)cos(xd);
  }
}

// kFast: the caller guarantees |x| < kFastSincosMax (the vectorizable CPU path).
template <bool kFast>
FASTDIFF_HOST_DEVICE void sincos_acc(float x, float* s, float* c) {
  if (kFast) sincos_f32_fast(x, s, c);
  else sincos_f32(x, s, c);
}
template <bool kFast>
FASTDIFF_HOST_DEVICE void sincos_acc(double x, double* s, double* c) {
  *s = sin(x);
  *c = cos(x);
}

// One frequency k of one row: writes the sin column and the cos column.
// value mode:      sin(a), cos(a)                       with a = scale * (ts * freq)
// derivative mode: cos(a) * kf, -sin(a) * kf            with kf = scale * freq * slope
// kFast: |a| < kFastSincosMax is known (see sincos_acc).
template <typename acc, bool kFast = false>
FASTDIFF_HOST_DEVICE void pair(acc ts, acc slope, acc freq, acc scale, bool derivative,
                               acc* sin_col, acc* cos_col) {
  const acc a = scale * (ts * freq);
  acc s, c;
  sincos_acc<kFast>(a, &s, &c);
  if (derivative) {
    const acc kf = (scale * freq) * slope;
    *sin_col = c * kf;
    *cos_col = -s * kf;
  } else {
    *sin_col = s;
    *cos_col = c;
  }
}

// Column layout: [sin | cos] (or [cos | sin] when flipped), then one zero column for
// odd dim, exactly as diffusers' get_timestep_embedding.
struct Layout {
  int64_t dim, half, sin_off, cos_off;
  FASTDIFF_HOST_DEVICE Layout(int64_t dim_, bool flip)
      : dim(dim_), half(dim_ / 2), sin_off(flip ? dim_ / 2 : 0), cos_off(flip ? 0 : dim_ / 2) {}
};

}  // namespace embedding
}  // namespace fastdiff
