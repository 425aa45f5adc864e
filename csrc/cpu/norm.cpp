// CPU kernel of fastdiff::group_norm_tangent: the forward-mode tangent of group_norm along
// dx, given the per-group mean and r = (var + eps)^-1/2 that the primal's kernel already
// returned (reference: fastdiff._ops.group_norm_tangent_ref).
//
// Per group g of sample n, over its L = (C / G) * HxW elements, with xc = x - mean:
//   d[(x - mean) r] = r (dx - mean(dx) - xc r^2 mean(xc dx)),  then times the weight.
// Two passes over x and dx per group (the two sums, then the output), the sums' chunks
// added in double;
// torch's own forward-AD rule builds the same from ~30 elementwise ops, each allocating
// a full-size tensor.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

namespace fastdiff {
namespace {

template <typename T, typename acc>
void tangent_group(const T* __restrict x, const T* __restrict dx, T* __restrict out, acc mean,
                   acc rstd, const acc* __restrict w, int64_t cpg, int64_t hw) {
  // the two sums: in acc over chunks of kChunk elements, the chunks added in double
  constexpr int64_t kChunk = 256;
  double s_dx = 0.0, s_xdx = 0.0;
  const int64_t L = cpg * hw;
  for (int64_t i0 = 0; i0 < L; i0 += kChunk) {
    const int64_t i1 = std::min(L, i0 + kChunk);
    acc a = 0, b = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const acc d = static_cast<acc>(dx[i]);
      a += d;
      b += (static_cast<acc>(x[i]) - mean) * d;
    }
    s_dx += a;
    s_xdx += b;
  }
  const acc mt = static_cast<acc>(s_dx / static_cast<double>(L));
  const acc k = static_cast<acc>(static_cast<double>(rstd) * rstd * s_xdx / static_cast<double>(L));
  for (int64_t c = 0; c < cpg; ++c) {
    const T* xp = x + c * hw;
    const T* dp = dx + c * hw;
    T* op = out + c * hw;
    const acc a = w ? w[c] * rstd : rstd;
    for (int64_t i = 0; i < hw; ++i)
      op[i] = static_cast<T>(
          a * ((static_cast<acc>(dp[i]) - mt) - (static_cast<acc>(xp[i]) - mean) * k));
  }
}

at::Tensor group_norm_tangent_cpu(const at::Tensor& x, const at::Tensor& dx,
                                  const at::Tensor& mean, const at::Tensor& rstd,
                                  const std::optional<at::Tensor>& weight, int64_t groups) {
  TORCH_CHECK_VALUE(x.dim() >= 2, "group_norm_tangent: x must have shape [N, C, ...], got ",
                    x.sizes());
  TORCH_CHECK_VALUE(dx.sizes() == x.sizes(), "group_norm_tangent: dx must have x's shape ",
                    x.sizes(), ", got ", dx.sizes());
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK_VALUE(groups > 0 && C % groups == 0, "group_norm_tangent: groups (", groups,
                    ") must be positive and divide the ", C, " channels");
  TORCH_CHECK_VALUE(mean.numel() == N * groups && rstd.numel() == N * groups,
                    "group_norm_tangent: mean and rstd must have N * groups = ", N * groups,
                    " elements, got ", mean.numel(), " and ", rstd.numel());
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
                   "group_norm_tangent: x must be float32, float16, bfloat16 or float64, got ", st);
  TORCH_CHECK_TYPE(dx.scalar_type() == st, "group_norm_tangent: dx must have x's dtype ", st,
                   ", got ", dx.scalar_type());
  if (weight.has_value())
    TORCH_CHECK_VALUE(weight->numel() == C, "group_norm_tangent: weight must have ", C,
                      " elements, got ", weight->numel());
  const at::Tensor xc = x.contiguous(), dxc = dx.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  const int64_t cpg = C / groups, hw = x.numel() / (N * C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "group_norm_tangent_cpu", [&] {
    using acc = at::opmath_type<scalar_t>;
    const auto opts = x.options().dtype(c10::CppTypeToScalarType<acc>::value);
    const at::Tensor m = mean.to(opts).contiguous(), r = rstd.to(opts).contiguous();
    const at::Tensor w = weight.has_value() ? weight->to(opts).contiguous() : at::Tensor();
    const scalar_t* X = xc.const_data_ptr<scalar_t>();
    const scalar_t* dX = dxc.const_data_ptr<scalar_t>();
    scalar_t* O = out.data_ptr<scalar_t>();
    const acc* M = m.const_data_ptr<acc>();
    const acc* R = r.const_data_ptr<acc>();
    const acc* W = w.defined() ? w.const_data_ptr<acc>() : nullptr;
    const int64_t per = cpg * hw;
    at::parallel_for(0, N * groups, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t ng = g0; ng < g1; ++ng) {
        const int64_t off = ng * per;
        tangent_group<scalar_t, acc>(X + off, dX + off, O + off, M[ng], R[ng],
                                     W ? W + (ng % groups) * cpg : nullptr, cpg, hw);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) { m.impl("group_norm_tangent", &group_norm_tangent_cpu); }

// A forward-AD rule's kernel: differentiating it again raises.
TORCH_LIBRARY_IMPL(fastdiff, Autograd, m) {
  m.impl("group_norm_tangent", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace fastdiff
