// CUDA registration of fastdiff::timestep_embedding: checks, then the torch-free launcher
// of csrc/cuda/embedding_kernel.cu on the current stream.
#include <torch/library.h>

#include "../checks.h"
#include "common.h"

namespace fastdiff {
namespace cuda {
namespace {

at::Tensor timestep_embedding_cuda(const at::Tensor& t, const at::Tensor& freqs,
                                   const c10::optional<at::Tensor>& table, int64_t dim,
                                   bool flip, double scale, double width, double end,
                                   bool derivative) {
  check_embedding_args(t, freqs, table, dim, width, end);
  const c10::cuda::CUDAGuard guard(t.device());
  auto tc = t.contiguous();
  auto fc = freqs.contiguous();
  auto out = at::empty({tc.size(0), dim}, freqs.options());
  at::Tensor tab;
  if (table.has_value() && table->defined()) tab = table->contiguous();
  check_launch(launch_timestep_embedding(tc.data_ptr(), to_dtype(tc.scalar_type()), fc.data_ptr(),
                                         tab.defined() ? tab.data_ptr() : nullptr,
                                         tab.defined() ? tab.size(0) : 0, tc.size(0), dim, flip,
                                         scale, width, end, derivative, out.data_ptr(),
                                         to_dtype(out.scalar_type()), current_stream()),
               "timestep_embedding");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) { m.impl("timestep_embedding", &timestep_embedding_cuda); }

}  // namespace cuda
}  // namespace fastdiff
