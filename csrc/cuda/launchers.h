// Torch-free interface between the CUDA kernels (csrc/cuda/*_kernel.cu, compiled by nvcc
// without torch headers: about a second each) and their registrations
// (csrc/cuda/*.cpp, compiled by the host compiler with torch). Pointers are raw, types
// are passed as DType, work runs on the given stream.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

namespace fastdiff {
namespace cuda {

enum class DType : int { kI64, kI32, kI16, kI8, kU8, kU16, kU32, kU64, kF16, kBF16, kF32, kF64 };

// fastdiff::timestep_embedding. t: [B] of t_type; freqs: [dim/2] and out: [B, dim] of
// out_type (kF32 or kF64); table: [rows, dim] of out_type or null.
cudaError_t launch_timestep_embedding(const void* t, DType t_type, const void* freqs,
                                      const void* table, int64_t rows, int64_t B, int64_t dim,
                                      bool flip, double scale, double width, double end,
                                      bool derivative, void* out, DType out_type,
                                      cudaStream_t stream);

}  // namespace cuda
}  // namespace fastdiff

namespace fastdiff {
namespace cuda {

// fastdiff::sampler_step (semantics: fastdiff._ops.step_ref). All sample tensors are
// contiguous [B, S] of `dtype`; optional ones are null when absent. coeffs: contiguous
// [coeff_rows (1 or B), n_coeffs] float (double for kF64).
constexpr int kStepMaxHistory = 16;
constexpr int kStepMaxOut = 8;
struct StepLaunch {
  const void* x;
  const void* x_base;
  const void* model_out;
  const void* model_out_cond;
  const void* noise;
  const void* history[kStepMaxHistory];
  int64_t n_history;
  void* out[kStepMaxOut];
  int64_t n_out;
  const void* coeffs;
  int64_t coeff_rows;
  int64_t B, S;
  bool clamp;
  DType dtype;  // kF32, kF16, kBF16 or kF64
};
cudaError_t launch_sampler_step(const StepLaunch& args, cudaStream_t stream);

// fastdiff::diff_norm: a, b contiguous [B, S] of dtype (kF32/kF16/kBF16/kF64); out [B]
// float (double for kF64); workspace: B * ceil(S / reduce::kBlock) doubles.
cudaError_t launch_diff_norm(const void* a, const void* b, DType dtype, int64_t B, int64_t S,
                             double* workspace, void* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastdiff
