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
#include "convert.h"

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

// float16 is widened in pieces by the CPU's conversion instructions first (its scalar
// conversion does not vectorize well); pieces are whole multiples of kLanes, so every lane
// sums the same values in the same order (widening is exact).
constexpr int64_t kPiece = 512;

// sum_i (a_i - b_i)^2 over n <= kBlock elements.
template <typename T, typename acc>
FASTDIFF_REDUCE_CLONES double block_sum(const T* __restrict a, const T* __restrict b, int64_t n) {
  acc lane[kLanes] = {};
  if constexpr (std::is_same<T, c10::Half>::value) {
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
