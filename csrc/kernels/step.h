// Per-element math of fastdiff::sampler_step, used verbatim by the CPU kernel
// (csrc/cpu/step.cpp) and the CUDA kernel (csrc/cuda/step_kernel.cu), so the CPU tests
// check the formulas the GPU runs. The exact semantics are fastdiff._ops.step_ref; every
// helper here rounds in the same order as that reference (both builds disable FMA
// contraction), so float32 results agree with it to the last bit or so.
#pragma once
#include <cstdint>

#include "common.h"

// Forced inlining on the host too: the CPU kernel instantiates these in very large
// functions, where GCC's inliner would otherwise give up and the loops stop vectorizing.
#if !defined(__CUDACC__) && defined(__GNUC__)
#define FASTDIFF_STEP_FN FASTDIFF_HOST_DEVICE __attribute__((always_inline))
#else
#define FASTDIFF_STEP_FN FASTDIFF_HOST_DEVICE
#endif

namespace fastdiff {
namespace step {

// Coefficient columns before the output matrix (fastdiff._ops.STEP_HEAD).
constexpr int64_t kHead = 8;
// Basis order of every output row: [x, x_base, d, noise, history_0, ...].
constexpr int64_t kBasisX = 0, kBasisXBase = 1, kBasisD = 2, kBasisNoise = 3, kBasisHist = 4;

FASTDIFF_STEP_FN int64_t n_basis(int64_t n_history) { return 4 + n_history; }
FASTDIFF_STEP_FN int64_t n_coeffs(int64_t n_out, int64_t n_history) {
  return kHead + n_out * n_basis(n_history);
}

// The per-sample head of a coefficient row: guidance, prediction -> data conversion,
// clamp and the direction d.
template <typename acc>
struct Head {
  acc g, p_x, p_m, s, s_div, w_x, w_m, w_c;
  FASTDIFF_STEP_FN explicit Head(const acc* row)
      : g(row[0]), p_x(row[1]), p_m(row[2]), s(row[3]), s_div(row[4]), w_x(row[5]),
        w_m(row[6]), w_c(row[7]) {}
};

// Classifier-free guidance: m = mu + g * (mc - mu).
template <typename acc>
FASTDIFF_STEP_FN acc guide(acc mu, acc mc, acc g) {
  return mu + g * (mc - mu);
}

// max(min(v, s), -s) that propagates a NaN v like torch.minimum/maximum (a comparison
// with NaN is false, so v passes through); branch-free (a select), so it vectorizes.
template <typename acc>
FASTDIFF_STEP_FN acc clamp_sym(acc v, acc s) {
  const acc hi = v > s ? s : v;
  return hi < -s ? -s : hi;
}

// d = w_x * x + w_m * m  (no clamp).
template <typename acc>
FASTDIFF_STEP_FN acc direction(acc x, acc m, const Head<acc>& h) {
  return h.w_x * x + h.w_m * m;
}

// d = w_x * x + w_m * m + w_c * clamp(p_x * x + p_m * m, -s, s) / s_div.
template <typename acc>
FASTDIFF_STEP_FN acc direction_clamped(acc x, acc m, const Head<acc>& h) {
  const acc x0 = h.p_x * x + h.p_m * m;
  return direction(x, m, h) + h.w_c * (clamp_sym(x0, h.s) / h.s_div);
}

// One basis term of an output: y + c * v (outputs accumulate in basis order).
template <typename acc>
FASTDIFF_STEP_FN acc axpy(acc y, acc c, acc v) {
  return y + c * v;
}

// Whether an output's row selects d alone: 1 on d and 0 on x and on every other term
// present (an absent x_base / noise contributes nothing either way). Such an output is d
// itself, bit for bit, in every backend and in the reference; the full sum would give the
// same values but for the sign of a zero d and where another term is Inf or NaN (0 * Inf).
// Multistep samplers store their data estimate so; skipping the sum saves 5 of the 13
// flops per value of a DPM-Solver++(2M) step, which at half precision on a CPU is bound
// by arithmetic.
template <typename acc>
FASTDIFF_STEP_FN bool selects_d(const acc* c, int64_t n_hist, bool x_base, bool noise) {
  bool only = c[kBasisD] == acc(1) && c[kBasisX] == acc(0);
  if (x_base) only = only && c[kBasisXBase] == acc(0);
  if (noise) only = only && c[kBasisNoise] == acc(0);
  for (int64_t k = 0; k < n_hist; ++k) only = only && c[kBasisHist + k] == acc(0);
  return only;
}

}  // namespace step
}  // namespace fastdiff
