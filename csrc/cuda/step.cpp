// CUDA registration of fastdiff::sampler_step and sampler_step.out: checks, contiguous
// inputs, fresh (or given) contiguous outputs, then the torch-free launcher of
// csrc/cuda/step_kernel.cu on the current stream.
#include <torch/library.h>

#include "../checks.h"
#include "common.h"

namespace fastdiff {
namespace cuda {
namespace {

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

// Writes the step into `outs` (contiguous, like x; checked by the callers).
void step_into(const at::Tensor& x, const c10::optional<at::Tensor>& x_base,
               const at::Tensor& model_out, const c10::optional<at::Tensor>& model_out_cond,
               at::TensorList history, const c10::optional<at::Tensor>& noise,
               const at::Tensor& coeffs, bool clamp, at::TensorList outs) {
  TORCH_CHECK((int64_t)history.size() <= kStepMaxHistory, "sampler_step (CUDA): at most ",
              kStepMaxHistory, " history tensors, got ", history.size());
  TORCH_CHECK((int64_t)outs.size() <= kStepMaxOut, "sampler_step (CUDA): n_out must be <= ",
              kStepMaxOut, ", got ", outs.size());
  if (x.numel() == 0) return;

  const at::Tensor xc = x.contiguous(), mc = model_out.contiguous(), cc = coeffs.contiguous();
  const at::Tensor xbc = opt_contig(x_base), mcc = opt_contig(model_out_cond),
                   nzc = opt_contig(noise);
  std::vector<at::Tensor> hc;
  for (const auto& t : history) hc.push_back(t.contiguous());

  StepLaunch a{};
  a.x = xc.const_data_ptr();
  a.x_base = ptr_or_null(xbc);
  a.model_out = mc.const_data_ptr();
  a.model_out_cond = ptr_or_null(mcc);
  a.noise = ptr_or_null(nzc);
  for (size_t k = 0; k < hc.size(); ++k) a.history[k] = hc[k].const_data_ptr();
  a.n_history = (int64_t)hc.size();
  for (size_t o = 0; o < outs.size(); ++o) a.out[o] = outs[o].data_ptr();
  a.n_out = (int64_t)outs.size();
  a.coeffs = cc.const_data_ptr();
  a.coeff_rows = cc.size(0);
  a.B = x.size(0);
  a.S = x.numel() / a.B;
  a.clamp = clamp;
  a.dtype = to_dtype(x.scalar_type());
  check_launch(launch_sampler_step(a, current_stream()), "sampler_step");
}

std::vector<at::Tensor> sampler_step_cuda(const at::Tensor& x,
                                          const c10::optional<at::Tensor>& x_base,
                                          const at::Tensor& model_out,
                                          const c10::optional<at::Tensor>& model_out_cond,
                                          at::TensorList history,
                                          const c10::optional<at::Tensor>& noise,
                                          const at::Tensor& coeffs, bool clamp, int64_t n_out) {
  check_step_args(x, x_base, model_out, model_out_cond, history, noise, coeffs, n_out);
  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<at::Tensor> outs;
  outs.reserve(n_out);
  for (int64_t o = 0; o < n_out; ++o) outs.push_back(at::empty(x.sizes(), x.options()));
  step_into(x, x_base, model_out, model_out_cond, history, noise, coeffs, clamp, outs);
  return outs;
}

void sampler_step_out_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& x_base,
                           const at::Tensor& model_out,
                           const c10::optional<at::Tensor>& model_out_cond,
                           at::TensorList history, const c10::optional<at::Tensor>& noise,
                           const at::Tensor& coeffs, bool clamp, at::TensorList out) {
  check_step_args(x, x_base, model_out, model_out_cond, history, noise, coeffs,
                  (int64_t)out.size());
  // The kernel forms up to 4 outputs in registers before storing any (kStepMaxAliasOut).
  check_step_out(x, x_base, model_out, model_out_cond, history, noise, coeffs, out);
  const c10::cuda::CUDAGuard guard(x.device());
  step_into(x, x_base, model_out, model_out_cond, history, noise, coeffs, clamp, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("sampler_step", &sampler_step_cuda);
  m.impl("sampler_step.out", &sampler_step_out_cuda);
}

}  // namespace cuda
}  // namespace fastdiff
