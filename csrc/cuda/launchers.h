// Torch-free interface between the CUDA kernels (csrc/cuda/*_kernel.cu, compiled by nvcc
// without torch headers: about a second each) and their registrations
// (csrc/cuda/*.cpp, compiled by the host compiler with torch). Pointers are raw, types
// are passed as DType, work runs on the given stream.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

namespace fastdiff {
namespace cuda {

enum class DType : int { kI64, kI32, kI16, kI8, kU8, kF16, kBF16, kF32, kF64 };

// fastdiff::timestep_embedding. t: [B] of t_type; freqs: [dim/2] and out: [B, dim] of
// out_type (kF32 or kF64); table: [rows, dim] of out_type or null.
cudaError_t launch_timestep_embedding(const void* t, DType t_type, const void* freqs,
                                      const void* table, int64_t rows, int64_t B, int64_t dim,
                                      bool flip, double scale, double width, double end,
                                      bool derivative, void* out, DType out_type,
                                      cudaStream_t stream);

}  // namespace cuda
}  // namespace fastdiff
