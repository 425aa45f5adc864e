// CUDA kernels of fastdiff::diff_norm (per-row ||a - b||_2). Accuracy scheme and per-element
// math: csrc/kernels/reduce.h, shared with the CPU kernel; no torch headers here.
//
// Pass 1, grid (blocks of kBlock elements, rows): a thread block sums the squares of one
// block of one row in the accumulation type (per-thread partial sums, then a tree over
// warps) and writes the sum as a double. Pass 2, one thread block per row: adds that row's
// block sums in double (fixed tree order, so results are deterministic) and takes the
// square root. Two passes keep a GPU busy when there are few, long rows.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../kernels/reduce.h"
#include "device_io.cuh"
#include "launchers.h"

namespace fastdiff {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// Sum of v over the thread block (kThreads threads); the result is valid in thread 0.
template <typename acc>
__device__ __forceinline__ acc block_sum(acc v) {
  __shared__ acc warp_sums[kThreads / 32];
  for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : acc(0);
  if (warp == 0)
    for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

template <typename T>
__global__ void block_sq_kernel(const T* __restrict__ a, const T* __restrict__ b, int64_t B,
                                int64_t S, int64_t nblk, double* __restrict__ part) {
  using acc = acc_t<T>;
  const int64_t k = blockIdx.x;
  const int64_t begin = k * reduce::kBlock;
  const int64_t n = S - begin < reduce::kBlock ? S - begin : reduce::kBlock;
  for (int64_t r = blockIdx.y; r < B; r += gridDim.y) {
    const int64_t base = r * S + begin;
    acc s = acc(0);
    for (int64_t i = threadIdx.x; i < n; i += kThreads)
      s += reduce::sq_diff<acc>(load(a, base + i), load(b, base + i));
    s = block_sum<acc>(s);
    if (threadIdx.x == 0) part[r * nblk + k] = static_cast<double>(s);
    __syncthreads();  // warp_sums is reused by the next row
  }
}

template <typename acc>
__global__ void finish_kernel(const double* __restrict__ part, int64_t B, int64_t nblk,
                              acc* __restrict__ out) {
  for (int64_t r = blockIdx.x; r < B; r += gridDim.x) {
    double s = 0.0;
    for (int64_t k = threadIdx.x; k < nblk; k += kThreads) s += part[r * nblk + k];
    s = block_sum<double>(s);
    if (threadIdx.x == 0) out[r] = static_cast<acc>(sqrt(s));
    __syncthreads();
  }
}

template <typename T>
cudaError_t launch_typed(const void* a, const void* b, int64_t B, int64_t S, double* part,
                         void* out, cudaStream_t stream) {
  using acc = acc_t<T>;
  if (B == 0) return cudaSuccess;
  const int64_t nblk = (S + reduce::kBlock - 1) / reduce::kBlock;
  if (nblk > 0x7fffffff) return cudaErrorInvalidValue;
  if (nblk == 0) {  // empty rows: norm 0
    return cudaMemsetAsync(out, 0, sizeof(acc) * B, stream);
  }
  const dim3 grid((unsigned)nblk, (unsigned)(B < 65535 ? B : 65535));
  block_sq_kernel<T><<<grid, kThreads, 0, stream>>>((const T*)a, (const T*)b, B, S, nblk, part);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const unsigned rows = (unsigned)(B < 65535 ? B : 65535);
  finish_kernel<acc><<<rows, kThreads, 0, stream>>>(part, B, nblk, (acc*)out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_diff_norm(const void* a, const void* b, DType dtype, int64_t B, int64_t S,
                             double* workspace, void* out, cudaStream_t stream) {
  switch (dtype) {
    case DType::kF32: return launch_typed<float>(a, b, B, S, workspace, out, stream);
    case DType::kF64: return launch_typed<double>(a, b, B, S, workspace, out, stream);
    case DType::kF16: return launch_typed<__half>(a, b, B, S, workspace, out, stream);
    case DType::kBF16: return launch_typed<__nv_bfloat16>(a, b, B, S, workspace, out, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace fastdiff
