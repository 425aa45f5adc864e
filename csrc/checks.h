// Argument checks shared by the CPU and CUDA registrations (torch side only): every op
// validates at the boundary with TORCH_CHECK so bad input is a clear Python error.
#pragma once
#include <torch/torch.h>

namespace fastdiff {

inline void check_embedding_args(const at::Tensor& t, const at::Tensor& freqs,
                                 const c10::optional<at::Tensor>& table, int64_t dim,
                                 double width, double end) {
  TORCH_CHECK(t.dim() == 1, "timestep_embedding: t must have shape [B], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() != at::kBool && !t.is_complex(),
              "timestep_embedding: t must be an integer or floating tensor, got ", t.scalar_type());
  TORCH_CHECK(dim >= 1, "timestep_embedding: dim must be >= 1, got ", dim);
  TORCH_CHECK(freqs.dim() == 1 && freqs.size(0) == dim / 2,
              "timestep_embedding: freqs must have shape [dim // 2] = [", dim / 2, "], got ",
              freqs.sizes());
  TORCH_CHECK(freqs.scalar_type() == at::kFloat || freqs.scalar_type() == at::kDouble,
              "timestep_embedding: freqs must be float32 or float64, got ", freqs.scalar_type());
  TORCH_CHECK(t.device() == freqs.device(), "timestep_embedding: t is on ", t.device(),
              " but freqs is on ", freqs.device());
  TORCH_CHECK(!(end > 0) || width > 0, "timestep_embedding: share_width must be > 0 when "
              "share_end > 0, got ", width);
  if (table.has_value() && table->defined()) {
    TORCH_CHECK(table->dim() == 2 && table->size(1) == dim,
                "timestep_embedding: table must have shape [R, ", dim, "], got ", table->sizes());
    TORCH_CHECK(table->scalar_type() == freqs.scalar_type(),
                "timestep_embedding: table dtype ", table->scalar_type(), " != freqs dtype ",
                freqs.scalar_type());
    TORCH_CHECK(table->device() == t.device(), "timestep_embedding: table is on ",
                table->device(), " but t is on ", t.device());
  }
}

}  // namespace fastdiff
