// float16 / bfloat16 <-> float conversions for the CPU kernels (sampler_step, diff_norm),
// written so that GCC vectorizes the loops that use them: bit operations and selects
// only, no branches. c10's own float16 conversion is not vectorized unless the whole
// build targets F16C. Both directions are bit-identical to c10's (round to nearest even;
// checked exhaustively for float16 -> float and on a 2^32 / 101 sample of floats).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FASTDIFF_X86_F16C 1
#endif

#include "../kernels/common.h"

// Forced inlining: the kernels call these in very large functions, where GCC's inliner
// would otherwise give up and the loops stop vectorizing.
#if defined(__GNUC__)
#define FASTDIFF_CVT inline __attribute__((always_inline))
#else
#define FASTDIFF_CVT inline
#endif

namespace fastdiff {
namespace cpu {

FASTDIFF_CVT float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
FASTDIFF_CVT uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
// c ? a : b on bit patterns, as masks (vectorizes on AVX2 too, unlike a nested ?:).
FASTDIFF_CVT uint32_t pick(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - uint32_t(c);
  return (a & m) | (b & ~m);
}

// IEEE half -> float (F. Giesen's branch-free scheme: rebias the exponent; subnormals
// renormalised by one float subtraction; Inf/NaN keep an all-ones exponent).
FASTDIFF_CVT float half_bits_to_float(uint16_t h) {
  const uint32_t em = uint32_t(h & 0x7fffu) << 13;
  const uint32_t exp = em & 0x0f800000u;
  const uint32_t o = em + ((127u - 15u) << 23);
  const uint32_t inf_nan = o + ((128u - 16u) << 23);
  const uint32_t sub = float_to_bits(bits_to_float(o + (1u << 23)) - bits_to_float(113u << 23));
  const uint32_t r = pick(exp == 0x0f800000u, inf_nan, pick(exp == 0, sub, o));
  return bits_to_float(r | (uint32_t(h & 0x8000u) << 16));
}

// float -> IEEE half, round to nearest even (Giesen's float_to_half_fast3_rtne):
// overflow -> Inf, NaN -> quiet NaN, subnormals through one float addition.
FASTDIFF_CVT uint16_t float_to_half_bits(float x) {
  const uint32_t u = float_to_bits(x);
  const uint32_t sign = u & 0x80000000u;
  const uint32_t f = u ^ sign;
  const int32_t fi = (int32_t)f;  // sign cleared: signed compares (AVX2 has no unsigned ones)
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  const uint32_t big = pick(fi > (int32_t)(255u << 23), 0x7e00u, 0x7c00u);
  const uint32_t sub = float_to_bits(bits_to_float(f) + bits_to_float(denorm_magic)) - denorm_magic;
  const uint32_t norm = (f + ((15u - 127u) << 23) + 0xfffu + ((f >> 13) & 1u)) >> 13;
  const uint32_t o = pick(fi >= (int32_t)((127u + 16u) << 23), big,
                          pick(fi < (int32_t)(113u << 23), sub, norm));
  return uint16_t(o | (sign >> 16));
}

// float -> bfloat16, round to nearest even; NaN -> 0x7FC0 as c10.
FASTDIFF_CVT uint16_t float_to_bf16_bits(float x) {
  const uint32_t u = float_to_bits(x);
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return uint16_t(pick(x != x, 0x7fc0u, r));
}

// Storage -> accumulation type (float for float/half/bfloat16, double for double).
FASTDIFF_CVT float to_acc(float v) { return v; }
FASTDIFF_CVT double to_acc(double v) { return v; }
FASTDIFF_CVT float to_acc(c10::Half v) { return half_bits_to_float(v.x); }
FASTDIFF_CVT float to_acc(c10::BFloat16 v) { return bits_to_float(uint32_t(v.x) << 16); }

// Accumulation type -> storage.
template <typename T> FASTDIFF_CVT T from_acc(acc_t<T> v) { return v; }
template <> FASTDIFF_CVT c10::Half from_acc<c10::Half>(float v) {
  return c10::Half(float_to_half_bits(v), c10::Half::from_bits());
}
template <> FASTDIFF_CVT c10::BFloat16 from_acc<c10::BFloat16>(float v) {
  return c10::BFloat16(float_to_bf16_bits(v), c10::BFloat16::from_bits());
}

// Whole-array float16 conversions: the CPU's conversion instructions where it has them
// (AVX-512F: 16 values per instruction; F16C: 8), chosen once at first use; otherwise the
// portable functions above. Same rounding (to nearest even) either way.
namespace detail {
inline void widen_half_portable(const c10::Half* s, int64_t n, float* d) {
  for (int64_t i = 0; i < n; ++i) d[i] = to_acc(s[i]);
}
inline void narrow_half_portable(const float* s, int64_t n, c10::Half* d) {
  for (int64_t i = 0; i < n; ++i) d[i] = from_acc<c10::Half>(s[i]);
}
#ifdef FASTDIFF_X86_F16C
// GCC 12 warns that the intrinsics' internal "undefined" vector is used uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f"))) inline void widen_half_avx512(const c10::Half* s, int64_t n,
                                                                   float* d) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(d + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s + i))));
  widen_half_portable(s + i, n - i, d + i);
}
__attribute__((target("avx512f"))) inline void narrow_half_avx512(const float* s, int64_t n,
                                                                    c10::Half* d) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256((__m256i*)(d + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
  narrow_half_portable(s + i, n - i, d + i);
}
__attribute__((target("avx,f16c"))) inline void widen_half_f16c(const c10::Half* s, int64_t n,
                                                                  float* d) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + i))));
  widen_half_portable(s + i, n - i, d + i);
}
__attribute__((target("avx,f16c"))) inline void narrow_half_f16c(const float* s, int64_t n,
                                                                   c10::Half* d) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128((__m128i*)(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
  narrow_half_portable(s + i, n - i, d + i);
}
#pragma GCC diagnostic pop
#endif
}  // namespace detail

inline void widen_half(const c10::Half* s, int64_t n, float* d) {
  using Fn = void (*)(const c10::Half*, int64_t, float*);
  static const Fn fn = [] {
#ifdef FASTDIFF_X86_F16C
    if (__builtin_cpu_supports("avx512f")) return (Fn)&detail::widen_half_avx512;
    if (__builtin_cpu_supports("f16c")) return (Fn)&detail::widen_half_f16c;
#endif
    return (Fn)&detail::widen_half_portable;
  }();
  fn(s, n, d);
}

inline void narrow_half(const float* s, int64_t n, c10::Half* d) {
  using Fn = void (*)(const float*, int64_t, c10::Half*);
  static const Fn fn = [] {
#ifdef FASTDIFF_X86_F16C
    if (__builtin_cpu_supports("avx512f")) return (Fn)&detail::narrow_half_avx512;
    if (__builtin_cpu_supports("f16c")) return (Fn)&detail::narrow_half_f16c;
#endif
    return (Fn)&detail::narrow_half_portable;
  }();
  fn(s, n, d);
}

}  // namespace cpu
}  // namespace fastdiff
