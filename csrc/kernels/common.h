// Shared by the CPU (g++) and CUDA (nvcc) builds. Nothing here may include torch:
// the .cu files that use it compile in about a second that way.
#pragma once

#if defined(__CUDACC__)
#define FASTDIFF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTDIFF_HOST_DEVICE inline
#endif

namespace fastdiff {

// Accumulation type: float for float/half/bfloat16 storage, double for double.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

}  // namespace fastdiff
