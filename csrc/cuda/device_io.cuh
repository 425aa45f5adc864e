// Device-side loads and stores of the sample dtypes, shared by the CUDA kernels: half
// types are accumulated in float and rounded to nearest even on store.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../kernels/common.h"

namespace fastdiff {
namespace cuda {

template <typename T>
__device__ __forceinline__ acc_t<T> load(const T* p, int64_t i) {
  return p[i];
}
template <>
__device__ __forceinline__ float load(const __half* p, int64_t i) {
  return __half2float(p[i]);
}
template <>
__device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}

template <typename T>
__device__ __forceinline__ void store(T* p, int64_t i, acc_t<T> v) {
  p[i] = v;
}
template <>
__device__ __forceinline__ void store(__half* p, int64_t i, float v) {
  p[i] = __float2half_rn(v);
}
template <>
__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float v) {
  p[i] = __float2bfloat16_rn(v);
}

}  // namespace cuda
}  // namespace fastdiff
