// CUDA registration of fastdiff::diff_norm: checks, contiguous inputs, the block-sum
// workspace, then the torch-free launcher of csrc/cuda/reduce_kernel.cu on the current
// stream.
#include <torch/library.h>

#include "../checks.h"
#include "../kernels/reduce.h"
#include "common.h"

namespace fastdiff {
namespace cuda {
namespace {

at::Tensor diff_norm_cuda(const at::Tensor& a, const at::Tensor& b) {
  check_diff_norm_args(a, b);
  const c10::cuda::CUDAGuard guard(a.device());
  const auto acc_type = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = a.size(0);
  auto out = at::empty({B}, a.options().dtype(acc_type));
  if (B == 0) return out;
  const int64_t S = a.numel() / B;
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const int64_t nblk = (S + reduce::kBlock - 1) / reduce::kBlock;
  auto part = at::empty({std::max<int64_t>(B * nblk, 1)}, a.options().dtype(at::kDouble));
  check_launch(launch_diff_norm(ac.const_data_ptr(), bc.const_data_ptr(),
                                to_dtype(a.scalar_type()), B, S, part.data_ptr<double>(),
                                out.data_ptr(), current_stream()),
               "diff_norm");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) { m.impl("diff_norm", &diff_norm_cuda); }

}  // namespace cuda
}  // namespace fastdiff
