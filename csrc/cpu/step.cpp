// CPU kernel of fastdiff::sampler_step (semantics: fastdiff._ops.step_ref; per-element
// math: csrc/kernels/step.h, shared with the CUDA kernel).
//
// One pass over memory: at::parallel_for splits the flat [B * S] element range; each
// piece is walked sample by sample (the coefficient row hoisted), in chunks of kChunk
// elements where d needs a buffer (guidance, clamp), else in one go. A chunk goes through
// short branch-free loops: the direction d into an L1-resident buffer (specialised on
// guidance / clamp), then the outputs, two at a time in one loop where possible
// (specialised on x_base / noise / up to 4 history terms).
// So every input is read from memory once, every output written once, and the loops
// vectorize (built for x86-64-v4 (AVX-512), v3 (AVX2) and baseline, picked at load
// time); float16 / bfloat16 through AVX-512 loops where the CPU has it (see v512).
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>
#include <type_traits>
#include <vector>

#include "../checks.h"
// The AVX-512 loops below instantiate step.h's helpers on vectors, always inlined, so no
// vector crosses a call (GCC would warn about the ABI of those helpers).
#pragma GCC diagnostic ignored "-Wpsabi"
#include "../kernels/step.h"
#include "convert.h"

namespace fastdiff {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTDIFF_STEP_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define FASTDIFF_INLINE inline __attribute__((always_inline))
#else
#define FASTDIFF_STEP_CLONES
#define FASTDIFF_INLINE inline
#endif

using step::Head;

// Elements per chunk: up to ~10 streams x 512 x 4 B = 20 KiB stays in L1.
constexpr int64_t kChunk = 512;
// History terms folded into the specialised output loop; more are added in extra passes.
constexpr int kMaxFusedHist = 4;
// Outputs computed together in one pass over the inputs (x_next and the stored d or x0 of
// multistep samplers); more go one pass each, as do float64's (build time: every
// specialisation is compiled three times, once per instruction set).
template <typename acc>
constexpr int64_t kMaxJointOut = std::is_same<acc, double>::value ? 1 : 2;

template <typename T>
struct StepPtrs {
  const T* x;
  const T* x_base;  // null when absent
  const T* m;
  const T* m_cond;  // null when absent
  const T* noise;   // null when absent
  const T* const* hist;
  int64_t n_hist;
  T* const* out;
  int64_t n_out;
  bool alias;  // some output is one of the inputs (sampler_step.out)
};

template <typename T, typename acc>
FASTDIFF_INLINE void widen(const T* __restrict src, int64_t n, acc* __restrict dst) {
  if constexpr (std::is_same<T, c10::Half>::value) {
    cpu::widen_half(src, n, dst);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = cpu::to_acc(src[i]);
  }
}

template <typename T, typename acc>
FASTDIFF_INLINE void narrow(const acc* __restrict src, int64_t n, T* __restrict dst) {
  if constexpr (std::is_same<T, c10::Half>::value) {
    cpu::narrow_half(src, n, dst);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = cpu::from_acc<T>(src[i]);
  }
}

// Elements [c0, c0 + n) of an input in acc: widened into buf; null for an absent input.
template <typename T, typename acc>
FASTDIFF_INLINE const acc* widened(const T* src, int64_t c0, int64_t n, acc* buf) {
  if (src == nullptr) return nullptr;
  widen<T, acc>(src + c0, n, buf);
  return buf;
}

// Coefficients of one output row (hoisted out of the element loop).
template <typename acc>
struct OutCoeffs {
  acc x, xb, d, nz, h[kMaxFusedHist];
};

// AVX-512 loops for float16 / bfloat16 storage (GCC can vectorize neither conversion
// well by itself: float16 has no vector conversion without AVX512-FP16, and the bfloat16
// rounding it vectorizes only partly). The same per-element math as the loops below
// (csrc/kernels/step.h on float vectors; no FMA contraction) on blocks of values held as
// two vectors (see Bf16Block / HalfBlock), converted in registers, the last partial block
// through masked loads and stores, so the results are the same bits: bfloat16 rounds to
// nearest even exactly as cpu::float_to_bf16_bits (NaN -> 0x7FC0, subnormals kept),
// float16 with the F16C instruction the whole-array path uses (round to nearest even).
// Compiled for AVX-512 only here; used where the CPU has it (have_avx512_half(), checked
// once at run time). The loops are bound by instruction throughput, not memory, for data
// that fits in the last-level cache, so every conversion step counts.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTDIFF_STEP_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c")
// GCC 12 warns that the intrinsics' internal "undefined" vector is used uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace v512 {

// __m512 / __m256 without their may_alias attribute (which a template argument would drop).
typedef float V16 __attribute__((vector_size(64)));
typedef float V8 __attribute__((vector_size(32)));

template <typename Vec> FASTDIFF_INLINE Vec splat(float s);
template <> FASTDIFF_INLINE V16 splat<V16>(float s) { return _mm512_set1_ps(s); }
template <> FASTDIFF_INLINE V8 splat<V8>(float s) { return _mm256_set1_ps(s); }

// Whether the CPU has AVX512_BF16 (VCVTNE2PS2BF16: 32 floats -> bfloat16 in one
// instruction), checked once.
inline bool have_bf16_convert() {
  static const bool ok = __builtin_cpu_supports("avx512bf16");
  return ok;
}

// A block of bfloat16 storage: 32 values as two 16-float vectors, v[0] the even-indexed
// elements (0, 2, ..., 30), v[1] the odd ones. Widening is then a shift and a mask of the
// 32-bit words (no shuffle, 1 instruction per 16 values); every stream of a block is read
// in this order (a float buffer too: v[0] at p, v[1] at p + 16) and the store restores
// the element order with one word permutation.
struct Bf16Block {
  using Vec = V16;
  static constexpr int kN = 32;
  const bool hw = have_bf16_convert();
  // Word permutations that interleave the two halves back into element order: `pair`
  // after VCVTNE2PS2BF16 (evens in words 0..15, odds in 16..31), `high` picks the high
  // words of two vectors of 32-bit rounding results.
  const __m512i pair = _mm512_load_si512(kPair), high = _mm512_load_si512(kHigh);
  alignas(64) static constexpr uint16_t kPair[32] = {
      0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  alignas(64) static constexpr uint16_t kHigh[32] = {
      1,  33, 3,  35, 5,  37, 7,  39, 9,  41, 11, 43, 13, 45, 15, 47,
      17, 49, 19, 51, 21, 53, 23, 55, 25, 57, 27, 59, 29, 61, 31, 63};
  static FASTDIFF_INLINE __mmask32 words(int r) { return __mmask32((1ull << r) - 1u); }
  static FASTDIFF_INLINE __mmask16 evens(int r) { return __mmask16((1u << ((r + 1) / 2)) - 1u); }
  static FASTDIFF_INLINE __mmask16 odds(int r) { return __mmask16((1u << (r / 2)) - 1u); }
  // float -> bfloat16 as cpu::float_to_bf16_bits, result in the high 16 bits of each lane:
  // u + 0x7fff + lsb (round to nearest even; exact for subnormals too), NaN -> 0x7FC0.
  static FASTDIFF_INLINE __m512i round_bits(V16 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __m512i t = _mm512_mask_add_epi32(_mm512_set1_epi32(0x7fc00000), __mmask16(~nan), u,
                                            _mm512_set1_epi32(0x7fff));
    const __mmask16 lsb = _mm512_test_epi32_mask(u, _mm512_set1_epi32(0x10000));
    return _mm512_mask_add_epi32(t, lsb, t, _mm512_set1_epi32(1));
  }
  // 32 values in element order. VCVTNE2PS2BF16 rounds to nearest even like round_bits
  // except on NaN (it keeps the payload) and subnormal inputs (it flushes them to zero);
  // blocks with such a value take round_bits (checked exhaustively on an AMD EPYC, Zen 4:
  // the same 16 bits for every other float).
  FASTDIFF_INLINE __m512i narrow(const V16 v[2]) const {
    constexpr int kNanOrSubnormal = 0x01 | 0x20 | 0x80;  // QNaN, denormal, SNaN
    if (hw && _kortestz_mask16_u8(_mm512_fpclass_ps_mask(v[0], kNanOrSubnormal),
                                  _mm512_fpclass_ps_mask(v[1], kNanOrSubnormal)))
      return _mm512_permutexvar_epi16(pair, (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]));
    return _mm512_permutex2var_epi16(round_bits(v[0]), high, round_bits(v[1]));
  }
};

// r: the number of valid values in the block (kN but in the last, partial one). Masked
// accesses are only for that one: on some CPUs (AMD Zen 4) masked stores are several
// times slower than plain ones.
template <bool kTail>
FASTDIFF_INLINE void load(const Bf16Block&, const c10::BFloat16* p, int r, V16 v[2]) {
  const __m512i w =
      kTail ? _mm512_maskz_loadu_epi16(Bf16Block::words(r), p) : _mm512_loadu_si512(p);
  v[0] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  v[1] = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(int(0xffff0000u))));
}
template <bool kTail>
FASTDIFF_INLINE void store(const Bf16Block& b, c10::BFloat16* p, int r, const V16 v[2]) {
  const __m512i w = b.narrow(v);
  if (kTail) _mm512_mask_storeu_epi16(p, Bf16Block::words(r), w);
  else _mm512_storeu_si512(p, w);
}
template <bool kTail>
FASTDIFF_INLINE void load(const Bf16Block&, const float* p, int r, V16 v[2]) {
  v[0] = kTail ? _mm512_maskz_loadu_ps(Bf16Block::evens(r), p) : _mm512_loadu_ps(p);
  v[1] = kTail ? _mm512_maskz_loadu_ps(Bf16Block::odds(r), p + 16) : _mm512_loadu_ps(p + 16);
}
template <bool kTail>
FASTDIFF_INLINE void store(const Bf16Block&, float* p, int r, const V16 v[2]) {
  if (kTail) {
    _mm512_mask_storeu_ps(p, Bf16Block::evens(r), v[0]);
    _mm512_mask_storeu_ps(p + 16, Bf16Block::odds(r), v[1]);
  } else {
    _mm512_storeu_ps(p, v[0]);
    _mm512_storeu_ps(p + 16, v[1]);
  }
}

// A block of float16 storage: 16 values as two 8-float vectors in element order. The
// 256-bit conversion instructions: on AMD Zen 4 the 512-bit VCVTPH2PS / VCVTPS2PH are
// slower per value (this step's loop ran ~20% slower with them).
struct HalfBlock {
  using Vec = V8;
  static constexpr int kN = 16;
  static FASTDIFF_INLINE __mmask16 words(int r) { return __mmask16((1u << r) - 1u); }
};
template <bool kTail>
FASTDIFF_INLINE void load(const HalfBlock&, const c10::Half* p, int r, V8 v[2]) {
  if (kTail) {
    const __m256i w = _mm256_maskz_loadu_epi16(HalfBlock::words(r), p);
    v[0] = _mm256_cvtph_ps(_mm256_castsi256_si128(w));
    v[1] = _mm256_cvtph_ps(_mm256_extracti128_si256(w, 1));
  } else {
    v[0] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
    v[1] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p + 1));
  }
}
template <bool kTail>
FASTDIFF_INLINE void store(const HalfBlock&, c10::Half* p, int r, const V8 v[2]) {
  const __m128i a = _mm256_cvtps_ph(v[0], _MM_FROUND_TO_NEAREST_INT);
  const __m128i b = _mm256_cvtps_ph(v[1], _MM_FROUND_TO_NEAREST_INT);
  if (kTail) {
    _mm256_mask_storeu_epi16(p, HalfBlock::words(r), _mm256_set_m128i(b, a));
  } else {
    _mm_storeu_si128((__m128i*)p, a);
    _mm_storeu_si128((__m128i*)p + 1, b);
  }
}
template <bool kTail>
FASTDIFF_INLINE void load(const HalfBlock&, const float* p, int r, V8 v[2]) {
  const __mmask16 k = HalfBlock::words(r);
  v[0] = kTail ? _mm256_maskz_loadu_ps(__mmask8(k), p) : _mm256_loadu_ps(p);
  v[1] = kTail ? _mm256_maskz_loadu_ps(__mmask8(k >> 8), p + 8) : _mm256_loadu_ps(p + 8);
}
template <bool kTail>
FASTDIFF_INLINE void store(const HalfBlock&, float* p, int r, const V8 v[2]) {
  const __mmask16 k = HalfBlock::words(r);
  if (kTail) {
    _mm256_mask_storeu_ps(p, __mmask8(k), v[0]);
    _mm256_mask_storeu_ps(p + 8, __mmask8(k >> 8), v[1]);
  } else {
    _mm256_storeu_ps(p, v[0]);
    _mm256_storeu_ps(p + 8, v[1]);
  }
}

template <typename T> struct BlockOf;
template <> struct BlockOf<c10::BFloat16> { using type = Bf16Block; };
template <> struct BlockOf<c10::Half> { using type = HalfBlock; };

// body(std::integral_constant<bool, kTail>, i, r) over [0, n) in blocks of kN values.
template <int kN, typename Body>
FASTDIFF_INLINE void for_blocks(int64_t n, Body&& body) {
  int64_t i = 0;
  for (; i + kN <= n; i += kN) body(std::false_type(), i, kN);
  if (i < n) body(std::true_type(), i, int(n - i));
}

template <typename Vec>
FASTDIFF_INLINE Head<Vec> broadcast(const Head<float>& h) {
  const Vec r[8] = {splat<Vec>(h.g),   splat<Vec>(h.p_x), splat<Vec>(h.p_m),
                    splat<Vec>(h.s),   splat<Vec>(h.s_div), splat<Vec>(h.w_x),
                    splat<Vec>(h.w_m), splat<Vec>(h.w_c)};
  return Head<Vec>(r);
}

// d into a float buffer, in the block's lane order (read back only by output_kernel).
template <typename T, bool kCond, bool kClamp>
__attribute__((noinline)) void direction_loop(const T* x, const T* mu, const T* mc,
                                              const Head<float> h, int64_t n, float* d) {
  using Block = typename BlockOf<T>::type;
  using Vec = typename Block::Vec;
  const Block blk{};
  const Head<Vec> hv = broadcast<Vec>(h);
  for_blocks<Block::kN>(n, [&](auto tail, int64_t i, int r) {
    constexpr bool kT = decltype(tail)::value;
    Vec xv[2], mv[2], cv[2], dv[2];
    load<kT>(blk, x + i, r, xv);
    load<kT>(blk, mu + i, r, mv);
    if (kCond) load<kT>(blk, mc + i, r, cv);
    for (int j = 0; j < 2; ++j) {
      const Vec m = kCond ? step::guide<Vec>(mv[j], cv[j], hv.g) : mv[j];
      dv[j] = kClamp ? step::direction_clamped<Vec>(xv[j], m, hv)
                     : step::direction<Vec>(xv[j], m, hv);
    }
    store<kT>(blk, d + i, r, dv);
  });
}

// Every input value of a block is loaded before any output value of it is stored (an
// output may be one of the inputs, at the same index: sampler_step.out).
// kDLast: the last output (of one or two) is d itself (step::selects_d), stored without a
// sum.
template <typename T, int kOut, bool kInlineD, bool kXBase, bool kNoise, int kHist, bool kDLast>
__attribute__((noinline)) void output_kernel(const T* x, const T* m, const Head<float> hd,
                                             const float* d, const T* xb, const T* nz,
                                             const T* h0, const T* h1, const T* h2,
                                             const T* h3, const OutCoeffs<float>* k, int64_t n,
                                             T* y0, T* y1) {
  using Block = typename BlockOf<T>::type;
  using Vec = typename Block::Vec;
  const Block blk{};
  const Head<Vec> hv = broadcast<Vec>(hd);
  Vec c[kOut][4 + kMaxFusedHist];
  for (int o = 0; o < kOut; ++o) {
    c[o][0] = splat<Vec>(k[o].x);
    c[o][1] = splat<Vec>(k[o].xb);
    c[o][2] = splat<Vec>(k[o].d);
    c[o][3] = splat<Vec>(k[o].nz);
    for (int j = 0; j < kMaxFusedHist; ++j) c[o][4 + j] = splat<Vec>(k[o].h[j]);
  }
  const T* const hp[kMaxFusedHist] = {h0, h1, h2, h3};
  for_blocks<Block::kN>(n, [&](auto tail, int64_t i, int r) {
    constexpr bool kT = decltype(tail)::value;
    Vec xv[2], dv[2], xbv[2], nzv[2], hs[kMaxFusedHist][2];
    load<kT>(blk, x + i, r, xv);
    if (kInlineD) {
      Vec mv[2];
      load<kT>(blk, m + i, r, mv);
      for (int j = 0; j < 2; ++j) dv[j] = step::direction<Vec>(xv[j], mv[j], hv);
    } else {
      load<kT>(blk, d + i, r, dv);
    }
    if (kXBase) load<kT>(blk, xb + i, r, xbv);
    if (kNoise) load<kT>(blk, nz + i, r, nzv);
    for (int q = 0; q < kHist; ++q) load<kT>(blk, hp[q] + i, r, hs[q]);
    Vec v[kOut][2];
    for (int o = 0; o < (kDLast ? kOut - 1 : kOut); ++o) {
      for (int j = 0; j < 2; ++j) {
        Vec t = c[o][0] * xv[j];
        if (kXBase) t = step::axpy<Vec>(t, c[o][1], xbv[j]);
        t = step::axpy<Vec>(t, c[o][2], dv[j]);
        if (kNoise) t = step::axpy<Vec>(t, c[o][3], nzv[j]);
        for (int q = 0; q < kHist; ++q) t = step::axpy<Vec>(t, c[o][4 + q], hs[q][j]);
        v[o][j] = t;
      }
    }
    store<kT>(blk, y0 + i, r, kDLast && kOut == 1 ? dv : v[0]);
    if (kOut > 1) store<kT>(blk, y1 + i, r, kDLast ? dv : v[kOut - 1]);
  });
}

// An output that is d itself, from the chunk's d buffer (in the block's lane order).
template <typename T>
__attribute__((noinline)) void store_d(const float* d, int64_t n, T* y) {
  using Block = typename BlockOf<T>::type;
  const Block blk{};
  for_blocks<Block::kN>(n, [&](auto tail, int64_t i, int r) {
    constexpr bool kT = decltype(tail)::value;
    typename Block::Vec v[2];
    load<kT>(blk, d + i, r, v);
    store<kT>(blk, y + i, r, v);
  });
}

}  // namespace v512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

// Whether the AVX-512 half-type loops can run on this CPU (checked once).
inline bool have_avx512_half() {
#ifdef FASTDIFF_STEP_AVX512
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

// The vector loops take over from the ones below when the storage is a half type read and
// written directly (In == Out) and the CPU has them.
template <typename In, typename Out>
constexpr bool kVecHalf = std::is_same<In, Out>::value &&
                          (std::is_same<In, c10::BFloat16>::value ||
                           std::is_same<In, c10::Half>::value);

// The loops below read inputs of type In (the storage type, or acc after widening) and
// convert each value to acc as they load it (a no-op for acc, a shift for bfloat16).

// d for one chunk.
template <typename In, typename acc, bool kCond, bool kClamp>
FASTDIFF_INLINE void direction_loop(const In* __restrict x, const In* __restrict mu,
                                    const In* __restrict mc, const Head<acc> h, int64_t n,
                                    acc* __restrict d) {
#ifdef FASTDIFF_STEP_AVX512
  if constexpr (kVecHalf<In, In>) {
    if (have_avx512_half()) return v512::direction_loop<In, kCond, kClamp>(x, mu, mc, h, n, d);
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    const acc xv = cpu::to_acc(x[i]);
    const acc m = kCond ? step::guide<acc>(cpu::to_acc(mu[i]), cpu::to_acc(mc[i]), h.g)
                        : cpu::to_acc(mu[i]);
    d[i] = kClamp ? step::direction_clamped(xv, m, h) : step::direction(xv, m, h);
  }
}


// kOut (1 or 2) outputs for one chunk, each y_o = c_o0 x (+ c_o1 x_base) + c_o2 d
// (+ c_o3 noise) + sum_k c_o,4+k h_k over the first kHist history terms, accumulated in
// basis order like the reference and stored as Out (the outputs' storage type, or acc for
// more passes). Every input element is loaded once for all outputs, before any output
// element with that index is stored: an output may be one of the inputs (sampler_step.out),
// so those pointers are not restrict; `ivdep` states what is true either way (iteration i
// touches index i only), so GCC vectorizes without a run-time alias check. kInlineD: d is
// formed here from x and the model output m (no guidance, no clamp: the common case, one
// loop instead of two), else read from the chunk's d buffer.
template <typename In, typename Out, typename acc, int kOut, bool kInlineD, bool kXBase,
          bool kNoise, int kHist, bool kDLast>
FASTDIFF_INLINE void output_kernel(const In* x, const In* m, const Head<acc> hd,
                                   const acc* __restrict d, const In* xb, const In* nz,
                                   const In* h0, const In* h1, const In* h2, const In* h3,
                                   const OutCoeffs<acc>* k, int64_t n, Out* y0, Out* y1) {
#ifdef FASTDIFF_STEP_AVX512
  if constexpr (kVecHalf<In, Out>) {
    if (have_avx512_half())
      return v512::output_kernel<In, kOut, kInlineD, kXBase, kNoise, kHist, kDLast>(
          x, m, hd, d, xb, nz, h0, h1, h2, h3, k, n, y0, y1);
  }
#endif
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    const acc xv = cpu::to_acc(x[i]);
    const acc dv = kInlineD ? step::direction(xv, cpu::to_acc(m[i]), hd) : d[i];
    const acc xbv = kXBase ? cpu::to_acc(xb[i]) : acc(0);
    const acc nzv = kNoise ? cpu::to_acc(nz[i]) : acc(0);
    const acc hv0 = kHist > 0 ? cpu::to_acc(h0[i]) : acc(0);
    const acc hv1 = kHist > 1 ? cpu::to_acc(h1[i]) : acc(0);
    const acc hv2 = kHist > 2 ? cpu::to_acc(h2[i]) : acc(0);
    const acc hv3 = kHist > 3 ? cpu::to_acc(h3[i]) : acc(0);
    acc v[kOut];
    for (int o = 0; o < (kDLast ? kOut - 1 : kOut); ++o) {
      acc t = k[o].x * xv;
      if (kXBase) t = step::axpy(t, k[o].xb, xbv);
      t = step::axpy(t, k[o].d, dv);
      if (kNoise) t = step::axpy(t, k[o].nz, nzv);
      if (kHist > 0) t = step::axpy(t, k[o].h[0], hv0);
      if (kHist > 1) t = step::axpy(t, k[o].h[1], hv1);
      if (kHist > 2) t = step::axpy(t, k[o].h[2], hv2);
      if (kHist > 3) t = step::axpy(t, k[o].h[3], hv3);
      v[o] = t;
    }
    y0[i] = cpu::from_acc<Out>(kDLast && kOut == 1 ? dv : v[0]);
    if (kOut > 1) y1[i] = cpu::from_acc<Out>(kDLast ? dv : v[kOut - 1]);
  }
}

// c: output 0's coefficient row; rows nb apart. d_last: the last output is d itself (only
// for the pass that Route::kInlineDLast names; see route()).
template <typename In, typename Out, typename acc, int kOut, bool kInlineD, bool kXBase,
          bool kNoise, int kHist>
FASTDIFF_INLINE void output_loop(const In* x, const In* m, const Head<acc>& hd, const acc* d,
                                 const In* xb, const In* nz, const In* const* hs, const acc* c,
                                 int64_t nb, int64_t n, Out* const* ys, bool d_last) {
  static_assert(kOut == 1 || kOut == 2, "one or two outputs per pass");
  OutCoeffs<acc> k[kOut];
  for (int o = 0; o < kOut; ++o) {
    const acc* r = c + o * nb;
    k[o].x = r[step::kBasisX];
    k[o].xb = r[step::kBasisXBase];
    k[o].d = r[step::kBasisD];
    k[o].nz = r[step::kBasisNoise];
    for (int j = 0; j < kMaxFusedHist; ++j)
      k[o].h[j] = j < kHist ? r[step::kBasisHist + j] : acc(0);
  }
  // No lambda here: it would be compiled outside step_segment's target clones (baseline
  // x86-64, unvectorized).
#define FASTDIFF_OUT_KERNEL(D_LAST)                                                           \
  output_kernel<In, Out, acc, kOut, kInlineD, kXBase, kNoise, kHist, D_LAST>(                 \
      x, m, hd, d, xb, nz, kHist > 0 ? hs[0] : nullptr, kHist > 1 ? hs[1] : nullptr,          \
      kHist > 2 ? hs[2] : nullptr, kHist > 3 ? hs[3] : nullptr, k, n, ys[0],                  \
      kOut > 1 ? ys[1] : nullptr)
  // d_last is instantiated only for the combination route() sends here (build time).
  if constexpr (kInlineD && !kXBase && !kNoise) {
    if (d_last) {
      FASTDIFF_OUT_KERNEL(true);
      return;
    }
  }
  FASTDIFF_OUT_KERNEL(false);
#undef FASTDIFF_OUT_KERNEL
}

// History terms past kMaxFusedHist, one pass each over an acc output (keeps the order).
template <typename acc>
FASTDIFF_INLINE void axpy_loop(const acc* __restrict h, acc c, int64_t n, acc* __restrict y) {
  for (int64_t i = 0; i < n; ++i) y[i] = step::axpy(y[i], c, h[i]);
}

// An output that is d itself (step::selects_d): the chunk's d buffer, as direction_loop
// wrote it, stored as Out.
template <typename In, typename Out, typename acc>
FASTDIFF_INLINE void store_d(const acc* __restrict d, int64_t n, Out* __restrict y) {
#ifdef FASTDIFF_STEP_AVX512
  if constexpr (kVecHalf<In, Out>) {
    if (have_avx512_half()) return v512::store_d<Out>(d, n, y);
  }
#endif
  for (int64_t i = 0; i < n; ++i) y[i] = cpu::from_acc<Out>(d[i]);
}

// Runtime (x_base?, noise?, history count) -> the specialised loop.
template <typename In, typename Out, typename acc, int kOut, bool kInlineD>
FASTDIFF_INLINE void output_any(int nh, const In* x, const In* m, const Head<acc>& hd,
                                const acc* d, const In* xb, const In* nz, const In* const* hs,
                                const acc* c, int64_t nb, int64_t n, Out* const* ys,
                                bool d_last = false) {
#define FASTDIFF_OUT_H(XB, NZ, H)                                                        \
  output_loop<In, Out, acc, kOut, kInlineD, XB, NZ, H>(x, m, hd, d, xb, nz, hs, c, nb, n, ys, \
                                                       d_last)
#define FASTDIFF_OUT(XB, NZ)                             \
  switch (nh) {                                          \
    case 0: FASTDIFF_OUT_H(XB, NZ, 0); break;            \
    case 1: FASTDIFF_OUT_H(XB, NZ, 1); break;            \
    case 2: FASTDIFF_OUT_H(XB, NZ, 2); break;            \
    case 3: FASTDIFF_OUT_H(XB, NZ, 3); break;            \
    default: FASTDIFF_OUT_H(XB, NZ, 4); break;           \
  }
  if (xb != nullptr) {
    if (nz != nullptr) { FASTDIFF_OUT(true, true) } else { FASTDIFF_OUT(true, false) }
  } else {
    if (nz != nullptr) { FASTDIFF_OUT(false, true) } else { FASTDIFF_OUT(false, false) }
  }
#undef FASTDIFF_OUT
#undef FASTDIFF_OUT_H
}

// How chunk() forms one sample's outputs. kInline: d inside the output loop (no guidance,
// no clamp, every output in one pass); kInlineDLast: the same where the last output (of
// one or two) is d itself and the other is not (multistep samplers: x_next and the stored
// data estimate; deterministic DDIM: x_next = d; compiled without x_base and noise only);
// kBuffered: d into the chunk's buffer first, then the outputs, those that are d itself
// last (they read no input, so an output that is an input is still read before it is
// written).
enum class Route { kInline, kInlineDLast, kBuffered };

template <typename acc>
FASTDIFF_INLINE bool selects_d(const acc* row, int64_t o, int64_t n_hist, bool xb, bool nz) {
  return step::selects_d(row + step::kHead + o * step::n_basis(n_hist), n_hist, xb, nz);
}

template <typename acc>
FASTDIFF_INLINE Route route(const acc* row, bool cond, bool clamp, bool xb, bool nz,
                            int64_t n_hist, int64_t n_out) {
  bool any_d = false;
  for (int64_t o = 0; o < n_out; ++o) any_d = any_d || selects_d(row, o, n_hist, xb, nz);
  const bool joint = n_out == 1 || (n_out == 2 && kMaxJointOut<acc> > 1);
  if (cond || clamp || n_hist > kMaxFusedHist || !joint) return Route::kBuffered;
  if (!any_d) return Route::kInline;
  if (!xb && !nz && (n_out == 1 || !selects_d(row, 0, n_hist, xb, nz))) return Route::kInlineDLast;
  return Route::kBuffered;
}

// One chunk: d, then the outputs (two in one pass where kMaxJointOut allows; on the inline
// routes d is formed in that same pass). With more than kMaxFusedHist history terms, Out
// must be acc (the remaining terms are added in further passes over y).
template <typename In, typename Out, typename acc>
FASTDIFF_INLINE void chunk(Route how, const In* x, const In* xb, const In* m, const In* mc,
                           const In* nz, const In* const* hs, int64_t n_hist, const acc* row,
                           bool clamp, int64_t n_out, int64_t n, acc* d, Out* const* ys) {
  const Head<acc> h(row);
  const int nh = (int)std::min<int64_t>(n_hist, kMaxFusedHist);
  const int64_t nb = step::n_basis(n_hist);
  const acc* c = row + step::kHead;
  if (how != Route::kBuffered) {
    if (n_out == 1) {
      output_any<In, Out, acc, 1, true>(nh, x, m, h, d, xb, nz, hs, c, nb, n, ys,
                                        how == Route::kInlineDLast);
    } else if constexpr (kMaxJointOut<acc> > 1) {
      output_any<In, Out, acc, 2, true>(nh, x, m, h, d, xb, nz, hs, c, nb, n, ys,
                                        how == Route::kInlineDLast);
    }
    return;
  }
  if (mc != nullptr) {
    if (clamp) direction_loop<In, acc, true, true>(x, m, mc, h, n, d);
    else direction_loop<In, acc, true, false>(x, m, mc, h, n, d);
  } else {
    if (clamp) direction_loop<In, acc, false, true>(x, m, mc, h, n, d);
    else direction_loop<In, acc, false, false>(x, m, mc, h, n, d);
  }
  bool any_d = false;
  for (int64_t o = 0; o < n_out; ++o) any_d = any_d || selects_d(row, o, n_hist, xb, nz);
  if constexpr (kMaxJointOut<acc> > 1) {
    if (!any_d && n_hist <= kMaxFusedHist && n_out == 2) {
      output_any<In, Out, acc, 2, false>(nh, x, m, h, d, xb, nz, hs, c, nb, n, ys);
      return;
    }
  }
  for (int64_t o = 0; o < n_out; ++o) {
    if (selects_d(row, o, n_hist, xb, nz)) continue;
    output_any<In, Out, acc, 1, false>(nh, x, m, h, d, xb, nz, hs, c + o * nb, nb, n, ys + o);
    if constexpr (std::is_same<In, acc>::value && std::is_same<Out, acc>::value) {
      for (int64_t k = kMaxFusedHist; k < n_hist; ++k)
        axpy_loop<acc>(hs[k], c[o * nb + step::kBasisHist + k], n, ys[o]);
    }
  }
  for (int64_t o = 0; o < n_out; ++o)
    if (selects_d(row, o, n_hist, xb, nz)) store_d<In, Out, acc>(d, n, ys[o]);
}

// Elements [i0, i1) of an input, as acc values: the tensor itself when it is stored in
// acc, else widened into buf; null for an absent input.
template <typename T, typename acc>
FASTDIFF_INLINE const acc* as_acc(const T* src, int64_t c0, int64_t n, acc* buf) {
  if constexpr (std::is_same<T, acc>::value) {
    return src == nullptr ? nullptr : src + c0;
  } else {
    return widened<T, acc>(src, c0, n, buf);
  }
}

// Elements [i0, i1) of one sample, whose coefficient row is `row`. float32/float64, and
// the half types with up to kMaxFusedHist history terms, run the loops on the tensors
// themselves (converting as they load and store, cheaper than extra passes; float16 only
// with the AVX-512 loops: its scalar conversion is slow, and without AVX-512 it is cheap
// only as a whole-array F16C pass). Other half-type cases go through float buffers per
// chunk instead, and
// so does every type when an output is an input and the chunk's outputs are not formed in
// one pass (each later pass would read an input an earlier one overwrote): the outputs
// are then completed in buffers and stored last.
template <typename T, typename acc>
FASTDIFF_STEP_CLONES void step_segment(const StepPtrs<T>& p, const acc* row, bool clamp,
                                       int64_t i0, int64_t i1) {
  alignas(64) acc dbuf[kChunk];
  constexpr bool kSame = std::is_same<T, acc>::value;
  constexpr bool kHalfType = std::is_same<T, c10::BFloat16>::value ||
                             std::is_same<T, c10::Half>::value;
  const bool one_pass = p.n_hist <= kMaxFusedHist &&
                        (p.n_out == 1 || (p.n_out == 2 && kMaxJointOut<acc> > 1));
  const Route how = route(row, p.m_cond != nullptr, clamp, p.x_base != nullptr,
                          p.noise != nullptr, p.n_hist, p.n_out);
  if constexpr (kSame || kHalfType) {
    // float16 directly only with the vector loops (its scalar conversion is slow).
    const bool direct = kSame || (p.n_hist <= kMaxFusedHist &&
                                  (std::is_same<T, c10::BFloat16>::value || have_avx512_half()));
    if (direct && (one_pass || !p.alias)) {
      std::vector<const T*> hs(std::max<int64_t>(p.n_hist, 1));
      std::vector<T*> ys(p.n_out);
      // On the inline routes d is formed inside the output loop (chunk()): no buffer
      // to fill, so the whole segment is one piece (the per-chunk set-up of the
      // loops took 5-14% of the time at half precision in a profile).
      const int64_t piece = how != Route::kBuffered ? std::max<int64_t>(i1 - i0, 1) : kChunk;
      for (int64_t c0 = i0; c0 < i1; c0 += piece) {
        const int64_t n = std::min(piece, i1 - c0);
        for (int64_t k = 0; k < p.n_hist; ++k) hs[k] = p.hist[k] + c0;
        for (int64_t o = 0; o < p.n_out; ++o) ys[o] = p.out[o] + c0;
        chunk<T, T, acc>(how, p.x + c0, p.x_base ? p.x_base + c0 : nullptr, p.m + c0,
                         p.m_cond ? p.m_cond + c0 : nullptr, p.noise ? p.noise + c0 : nullptr,
                         hs.data(), p.n_hist, row, clamp, p.n_out, n, dbuf, ys.data());
      }
      return;
    }
  }
  alignas(64) acc xbuf[kChunk], mbuf[kChunk], mcbuf[kChunk], xbbuf[kChunk], nzbuf[kChunk];
  std::vector<acc> hbuf(kSame ? 0 : p.n_hist * kChunk), ybuf(p.n_out * kChunk);
  std::vector<const acc*> hs(std::max<int64_t>(p.n_hist, 1));
  std::vector<acc*> ys(p.n_out);
  for (int64_t o = 0; o < p.n_out; ++o) ys[o] = ybuf.data() + o * kChunk;
  for (int64_t c0 = i0; c0 < i1; c0 += kChunk) {
    const int64_t n = std::min(kChunk, i1 - c0);
    for (int64_t k = 0; k < p.n_hist; ++k)
      hs[k] = as_acc<T, acc>(p.hist[k], c0, n, kSame ? nullptr : hbuf.data() + k * kChunk);
    chunk<acc, acc, acc>(how, as_acc<T, acc>(p.x, c0, n, xbuf),
                         as_acc<T, acc>(p.x_base, c0, n, xbbuf), as_acc<T, acc>(p.m, c0, n, mbuf),
                         as_acc<T, acc>(p.m_cond, c0, n, mcbuf),
                         as_acc<T, acc>(p.noise, c0, n, nzbuf), hs.data(), p.n_hist, row, clamp,
                         p.n_out, n, dbuf, ys.data());
    for (int64_t o = 0; o < p.n_out; ++o) narrow<T, acc>(ys[o], n, p.out[o] + c0);
  }
}

// Elements per parallel task: below this a call stays on one thread (the OpenMP fork
// costs more than it saves for ~100 KiB of data).
constexpr int64_t kGrain = 32768;

template <typename T, typename acc>
void step_all(const StepPtrs<T>& p, const acc* coeffs, int64_t coeff_rows, int64_t ncols,
              bool clamp, int64_t B, int64_t S) {
  at::parallel_for(0, B * S, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t pos = begin; pos < end;) {
      const int64_t b = pos / S;
      const int64_t seg_end = std::min(end, (b + 1) * S);
      step_segment<T, acc>(p, coeffs + (coeff_rows == 1 ? 0 : b * ncols), clamp, pos, seg_end);
      pos = seg_end;
    }
  });
}

// Output memory. A sampler allocates the same few output sizes every step and drops the
// previous step's outputs. Fresh large blocks come from the OS (glibc maps or trims them)
// and each 4 KiB page then faults on its first write: measured on the development VM at
// several microseconds per page, more than the whole fused pass over a 16 MiB output.
// This allocator keeps up to kMaxBlocks freed output blocks (512 MiB in all by default;
// FASTDIFF_STEP_CACHE_MB sets the cap, 0 disables it) and hands them out again for the same
// byte size; tensors on it are ordinary (resizable) CPU tensors.
class RecyclingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    void* base = take(n);
    if (base == nullptr) base = c10::alloc_cpu(kHeader + n);
    *static_cast<size_t*>(base) = n;
    return {static_cast<char*>(base) + kHeader, base, &release, c10::Device(c10::kCPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  static constexpr size_t kHeader = 64;  // the block's size; keeps the data 64-byte aligned
  static constexpr size_t kMaxBlocks = 8;
  static size_t max_bytes() {
    static const size_t cap = [] {
      const char* env = std::getenv("FASTDIFF_STEP_CACHE_MB");
      return size_t(env != nullptr ? std::strtoull(env, nullptr, 10) : 512) << 20;
    }();
    return cap;
  }
  struct Pool {
    std::mutex mu;
    std::vector<void*> blocks;  // oldest first
    size_t bytes = 0;
  };
  // Never destroyed: tensors may be freed during interpreter shutdown, after statics.
  static Pool& pool() {
    static Pool* p = new Pool();
    return *p;
  }
  static size_t size_of(void* base) { return *static_cast<size_t*>(base); }
  static void* take(size_t n) {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mu);
    for (size_t i = p.blocks.size(); i-- > 0;) {
      void* base = p.blocks[i];
      if (size_of(base) == n) {
        p.blocks.erase(p.blocks.begin() + i);
        p.bytes -= n;
        return base;
      }
    }
    return nullptr;
  }
  static void release(void* base) {
    const size_t n = size_of(base);
    std::vector<void*> evicted;
    {
      Pool& p = pool();
      std::lock_guard<std::mutex> lock(p.mu);
      const size_t cap = max_bytes();
      if (n > cap) {
        evicted.push_back(base);
      } else {
        while (!p.blocks.empty() && (p.blocks.size() >= kMaxBlocks || p.bytes + n > cap)) {
          evicted.push_back(p.blocks.front());
          p.bytes -= size_of(p.blocks.front());
          p.blocks.erase(p.blocks.begin());
        }
        p.blocks.push_back(base);
        p.bytes += n;
      }
    }
    for (void* b : evicted) c10::free_cpu(b);
  }
};

at::Tensor new_output(const at::Tensor& like) {
  static RecyclingAllocator* allocator = new RecyclingAllocator();
  return at::detail::empty_generic(like.sizes(), allocator,
                                   c10::DispatchKeySet(c10::DispatchKey::CPU), like.scalar_type(),
                                   c10::nullopt);
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Writes the step into `outs` (contiguous, like x; checked by the callers).
void step_into(const at::Tensor& x, const c10::optional<at::Tensor>& x_base,
               const at::Tensor& model_out, const c10::optional<at::Tensor>& model_out_cond,
               at::TensorList history, const c10::optional<at::Tensor>& noise,
               const at::Tensor& coeffs, bool clamp, at::TensorList outs, bool alias) {
  const int64_t B = x.size(0);
  if (x.numel() == 0) return;
  const int64_t S = x.numel() / B;

  const at::Tensor xc = x.contiguous(), mc = model_out.contiguous(), cc = coeffs.contiguous();
  const at::Tensor xbc = opt_contig(x_base), mcc = opt_contig(model_out_cond),
                   nzc = opt_contig(noise);
  std::vector<at::Tensor> hc;
  hc.reserve(history.size());
  for (const auto& t : history) hc.push_back(t.contiguous());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sampler_step_cpu",
                                  [&] {
    using T = scalar_t;
    using acc = acc_t<T>;
    std::vector<const T*> hp;
    for (const auto& t : hc) hp.push_back(t.const_data_ptr<T>());
    std::vector<T*> op;
    for (const auto& t : outs) op.push_back(t.data_ptr<T>());
    const StepPtrs<T> p{xc.const_data_ptr<T>(), ptr_or_null<T>(xbc), mc.const_data_ptr<T>(),
                        ptr_or_null<T>(mcc), ptr_or_null<T>(nzc), hp.data(),
                        (int64_t)hp.size(), op.data(), (int64_t)op.size(), alias};
    step_all<T, acc>(p, cc.const_data_ptr<acc>(), cc.size(0), cc.size(1), clamp, B, S);
  });
}

std::vector<at::Tensor> sampler_step_cpu(const at::Tensor& x,
                                         const c10::optional<at::Tensor>& x_base,
                                         const at::Tensor& model_out,
                                         const c10::optional<at::Tensor>& model_out_cond,
                                         at::TensorList history,
                                         const c10::optional<at::Tensor>& noise,
                                         const at::Tensor& coeffs, bool clamp, int64_t n_out) {
  check_step_args(x, x_base, model_out, model_out_cond, history, noise, coeffs, n_out);
  std::vector<at::Tensor> outs;
  outs.reserve(n_out);
  for (int64_t o = 0; o < n_out; ++o) outs.push_back(new_output(x));
  step_into(x, x_base, model_out, model_out_cond, history, noise, coeffs, clamp, outs, false);
  return outs;
}

void sampler_step_out_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& x_base,
                          const at::Tensor& model_out,
                          const c10::optional<at::Tensor>& model_out_cond, at::TensorList history,
                          const c10::optional<at::Tensor>& noise, const at::Tensor& coeffs,
                          bool clamp, at::TensorList out) {
  check_step_args(x, x_base, model_out, model_out_cond, history, noise, coeffs,
                  (int64_t)out.size());
  const bool alias =
      check_step_out(x, x_base, model_out, model_out_cond, history, noise, coeffs, out);
  step_into(x, x_base, model_out, model_out_cond, history, noise, coeffs, clamp, out, alias);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("sampler_step", &sampler_step_cpu);
  m.impl("sampler_step.out", &sampler_step_out_cpu);
}

// The sampler step is not differentiable (samplers run under no_grad; a gradient through
// it is not something fastdiff offers). Without a kernel at the Autograd key, the
// dispatcher's default fallback would let `backward()` pass through the op with only a
// warning and silently produce no gradient for its inputs. PyTorch's
// autogradNotImplementedFallback is the registration for exactly this case: the forward
// runs normally (also with inputs that require grad) and the outputs carry a grad_fn whose
// backward raises "derivative for fastdiff::sampler_step is not implemented". It is also
// what opcheck's test_autograd_registration expects of a non-differentiable op.
TORCH_LIBRARY_IMPL(fastdiff, Autograd, m) {
  m.impl("sampler_step", torch::autograd::autogradNotImplementedFallback());
  m.impl("sampler_step.out", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace fastdiff
