// CPU kernel of fastdiff::diff_norm: per-row ||a - b||_2 (reference:
// fastdiff._ops.diff_norm_ref; per-element math and accuracy scheme: csrc/kernels/reduce.h).
//
// Work is split into (row, block of kBlock elements) tasks run by at::parallel_for, so a
// single long row uses every thread too. A block sums squares in the accumulation type
// over kLanes independent partial sums (vector registers: the loop vectorizes without
// reassociation flags); block sums are added in double per row, in block order, so the
// result does not depend on the thread count.
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../kernels/reduce.h"
#include "convert.h"  // and <immintrin.h> on x86

namespace fastdiff {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTDIFF_REDUCE_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define FASTDIFF_REDUCE_INLINE inline __attribute__((always_inline))
#else
#define FASTDIFF_REDUCE_CLONES
#define FASTDIFF_REDUCE_INLINE inline
#endif

constexpr int64_t kLanes = 32;
constexpr int64_t kBlocksPerTask = 8;  // 32K elements: below that, one thread

// Adds (a_i - b_i)^2 into lane[i % kLanes], in order of i.
template <typename In, typename acc>
FASTDIFF_REDUCE_INLINE void accumulate(const In* __restrict a, const In* __restrict b, int64_t n,
                                       acc* __restrict lane) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j)
      lane[j] += reduce::sq_diff<acc>(cpu::to_acc(a[i + j]), cpu::to_acc(b[i + j]));
  for (int64_t j = 0; i < n; ++i, ++j)
    lane[j] += reduce::sq_diff<acc>(cpu::to_acc(a[i]), cpu::to_acc(b[i]));
}

// Half types with the conversion done in registers as the values are loaded (x86 with
// F16C for float16, AVX-512BW for bfloat16; checked once at run time). Each vector
// accumulator holds fixed lanes of `lane`, so every lane sums the same values in the same
// order as accumulate() (the same bits); the loads and conversions are what bounds these
// loops, not memory, for data in cache.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTDIFF_REDUCE_X86 1
// GCC 12 warns that the intrinsics' internal "undefined" vector is used uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// float16: 32 values a step as four 8-float F16C conversions (on AMD Zen 4 the 512-bit
// conversion costs more than two 256-bit ones); s[q] holds lanes 8q..8q+7.
__attribute__((target("avx2,f16c"))) void accumulate_f16c(const c10::Half* a,
                                                           const c10::Half* b, int64_t n,
                                                           float* lane) {
  static_assert(kLanes == 32, "four 8-float accumulators");
  __m256 s[4];
  for (int q = 0; q < 4; ++q) s[q] = _mm256_loadu_ps(lane + 8 * q);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int q = 0; q < 4; ++q) {
      const __m256 d = _mm256_sub_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(a + i) + q)),
                                     _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(b + i) + q)));
      s[q] = _mm256_add_ps(s[q], _mm256_mul_ps(d, d));
    }
  for (int q = 0; q < 4; ++q) _mm256_storeu_ps(lane + 8 * q, s[q]);
  accumulate<c10::Half, float>(a + i, b + i, n - i, lane);
}
// bfloat16: 32 values a step from one 64-byte load, widened by a shift (even-indexed
// values) and a mask (odd ones) of the 32-bit words, as in the sampler step's kernel:
// e holds lanes 0, 2, ..., 30 and o lanes 1, 3, ..., 31.
__attribute__((target("avx512f,avx512bw"))) void accumulate_bf16_avx512(
    const c10::BFloat16* a, const c10::BFloat16* b, int64_t n, float* lane) {
  static_assert(kLanes == 32, "two 16-float accumulators");
  alignas(64) float ev[16], od[16];
  for (int k = 0; k < 16; ++k) ev[k] = lane[2 * k], od[k] = lane[2 * k + 1];
  __m512 e = _mm512_load_ps(ev), o = _mm512_load_ps(od);
  const __m512i high = _mm512_set1_epi32(int(0xffff0000u));
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const __m512i wa = _mm512_loadu_si512(a + i), wb = _mm512_loadu_si512(b + i);
    const __m512 de = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_slli_epi32(wa, 16)),
                                    _mm512_castsi512_ps(_mm512_slli_epi32(wb, 16)));
    const __m512 dd = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_and_si512(wa, high)),
                                    _mm512_castsi512_ps(_mm512_and_si512(wb, high)));
    e = _mm512_add_ps(e, _mm512_mul_ps(de, de));
    o = _mm512_add_ps(o, _mm512_mul_ps(dd, dd));
  }
  _mm512_store_ps(ev, e);
  _mm512_store_ps(od, o);
  for (int k = 0; k < 16; ++k) lane[2 * k] = ev[k], lane[2 * k + 1] = od[k];
  accumulate<c10::BFloat16, float>(a + i, b + i, n - i, lane);
}
#pragma GCC diagnostic pop
#endif

// The fused loop for T where this CPU has one, else null (checked once).
template <typename T>
using FusedFn = void (*)(const T*, const T*, int64_t, float*);
template <typename T>
FusedFn<T> fused_accumulate() {
#ifdef FASTDIFF_REDUCE_X86
  if constexpr (std::is_same<T, c10::Half>::value) {
    static const FusedFn<T> fn = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")
                                     ? &accumulate_f16c : nullptr;
    return fn;
  } else if constexpr (std::is_same<T, c10::BFloat16>::value) {
    static const FusedFn<T> fn =
        __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
            ? &accumulate_bf16_avx512 : nullptr;
    return fn;
  }
#endif
  return nullptr;
}

// Without a fused loop, float16 is widened in pieces by the CPU's conversion instructions
// first (its scalar conversion does not vectorize well); pieces are whole multiples of
// kLanes, so every lane sums the same values in the same order (widening is exact).
constexpr int64_t kPiece = 512;

// sum_i (a_i - b_i)^2 over n <= kBlock elements.
template <typename T, typename acc>
FASTDIFF_REDUCE_CLONES double block_sum(const T* __restrict a, const T* __restrict b, int64_t n) {
  acc lane[kLanes] = {};
  constexpr bool kHalf = std::is_same<T, c10::Half>::value;
  if constexpr (kHalf || std::is_same<T, c10::BFloat16>::value) {
    if (const FusedFn<T> fused = fused_accumulate<T>()) {
      fused(a, b, n, lane);
    } else if constexpr (kHalf) {
      alignas(64) float wa[kPiece], wb[kPiece];
      for (int64_t p = 0; p < n; p += kPiece) {
        const int64_t m = std::min(kPiece, n - p);
        cpu::widen_half(a + p, m, wa);
        cpu::widen_half(b + p, m, wb);
        accumulate<float, acc>(wa, wb, m, lane);
      }
    } else {
      accumulate<T, acc>(a, b, n, lane);
    }
  } else {
    accumulate<T, acc>(a, b, n, lane);
  }
  for (int64_t w = kLanes / 2; w > 0; w /= 2)  // pairwise fold of the lanes
    for (int64_t j = 0; j < w; ++j) lane[j] += lane[j + w];
  return static_cast<double>(lane[0]);
}

template <typename T, typename acc>
void diff_norm_rows(const T* a, const T* b, int64_t B, int64_t S, acc* out) {
  const int64_t nblk = (S + reduce::kBlock - 1) / reduce::kBlock;
  std::vector<double> part(B * nblk);
  at::parallel_for(0, B * nblk, kBlocksPerTask, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / nblk, k = t % nblk;
      const int64_t i0 = r * S + k * reduce::kBlock;
      const int64_t n = std::min(reduce::kBlock, S - k * reduce::kBlock);
      part[t] = block_sum<T, acc>(a + i0, b + i0, n);
    }
  });
  for (int64_t r = 0; r < B; ++r) {
    double s = 0.0;
    for (int64_t k = 0; k < nblk; ++k) s += part[r * nblk + k];
    out[r] = static_cast<acc>(std::sqrt(s));
  }
}

at::Tensor diff_norm_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_diff_norm_args(a, b);
  const auto acc_type = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = a.size(0);
  auto out = at::empty({B}, a.options().dtype(acc_type));
  if (B == 0) return out;
  const int64_t S = a.numel() / B;
  if (S == 0) return out.zero_();
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "diff_norm_cpu", [&] {
    using acc = acc_t<scalar_t>;
    diff_norm_rows<scalar_t, acc>(ac.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(), B,
                                  S, out.data_ptr<acc>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) { m.impl("diff_norm", &diff_norm_cpu); }

// Not differentiable (a measurement used by the probes); see csrc/cpu/step.cpp for why
// the not-implemented fallback is registered rather than nothing.
TORCH_LIBRARY_IMPL(fastdiff, Autograd, m) {
  m.impl("diff_norm", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace fastdiff
