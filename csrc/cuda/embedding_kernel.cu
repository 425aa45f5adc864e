// CUDA kernel of fastdiff::timestep_embedding. The math is csrc/kernels/embedding.h, the
// same code the tested CPU kernel runs; no torch headers here (fast nvcc builds).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../kernels/embedding.h"
#include "launchers.h"

namespace fastdiff {
namespace cuda {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> __device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Rounds the shared time back to t's own type, as fastdiff.TimeSharing returns it.
template <typename T, typename M> __device__ __forceinline__ M round_to(M v) { return static_cast<M>(static_cast<T>(v)); }
template <> __device__ __forceinline__ float round_to<__half, float>(float v) { return __half2float(__float2half(v)); }
template <> __device__ __forceinline__ float round_to<__nv_bfloat16, float>(float v) { return __bfloat162float(__float2bfloat16(v)); }

// One thread per (row, frequency): writes that frequency's sin and cos columns (and the
// odd-dim zero pad on the row's last thread).
template <typename T, typename acc>
__global__ void embedding_kernel(const T* __restrict__ t, const acc* __restrict__ freqs,
                                 const acc* __restrict__ table, int64_t rows, int64_t B,
                                 int64_t dim, bool flip, acc scale, double width, double end,
                                 bool derivative, acc* __restrict__ out) {
  const embedding::Layout L(dim, flip);
  const int64_t per_row = L.half + (dim % 2);
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= B * per_row) return;
  const int64_t b = idx / per_row, k = idx % per_row;
  acc* row = out + b * dim;
  if (k == L.half) {  // odd dim: zero pad column
    row[dim - 1] = acc(0);
    return;
  }
  constexpr bool kInt = !std::is_same<T, float>::value && !std::is_same<T, double>::value &&
                        !std::is_same<T, __half>::value && !std::is_same<T, __nv_bfloat16>::value;
  using map_t = typename std::conditional<kInt, double, typename Acc<T>::type>::type;
  map_t tv;
  if constexpr (kInt || std::is_same<T, double>::value) {
    tv = static_cast<map_t>(t[b]);
  } else {
    tv = to_float(t[b]);
  }
  if constexpr (kInt) {
    const int64_t ti = static_cast<int64_t>(t[b]);  // a uint64 t > INT64_MAX turns negative
    if (table != nullptr && !derivative && ti >= 0 && ti < rows) {
      row[L.sin_off + k] = table[ti * dim + L.sin_off + k];
      row[L.cos_off + k] = table[ti * dim + L.cos_off + k];
      return;
    }
  }
  const bool shared = embedding::is_shared<map_t>(tv, (map_t)end);
  // Unshared t converts straight to acc (like torch's .to(float32)): going through double
  // would round int64 t twice, and back to T would overflow at INT64_MAX.
  acc ts;
  if constexpr (kInt) {
    ts = shared ? (acc)round_to<T, map_t>(embedding::share<map_t>(tv, (map_t)width, (map_t)end))
                : (acc)t[b];
  } else {
    ts = shared ? (acc)round_to<T, map_t>(embedding::share<map_t>(tv, (map_t)width, (map_t)end))
                : (acc)tv;
  }
  const acc slope = shared ? acc(0) : acc(1);
  embedding::pair<acc>((acc)ts, slope, freqs[k], scale, derivative, row + L.sin_off + k,
                       row + L.cos_off + k);
}

template <typename acc>
cudaError_t launch_typed(const void* t, DType tt, const acc* freqs, const acc* table,
                         int64_t rows, int64_t B, int64_t dim, bool flip, double scale,
                         double width, double end, bool derivative, acc* out, cudaStream_t s) {
  const int64_t n = B * (dim / 2 + dim % 2);
  if (n == 0) return cudaSuccess;
  const int threads = 256;
  const unsigned blocks = (unsigned)((n + threads - 1) / threads);
#define FASTDIFF_LAUNCH(T)                                                                 \
  embedding_kernel<T, acc><<<blocks, threads, 0, s>>>((const T*)t, freqs, table, rows, B, dim, \
                                                      flip, (acc)scale, width, end,         \
                                                      derivative, out)
  switch (tt) {
    case DType::kI64: FASTDIFF_LAUNCH(int64_t); break;
    case DType::kI32: FASTDIFF_LAUNCH(int32_t); break;
    case DType::kI16: FASTDIFF_LAUNCH(int16_t); break;
    case DType::kI8: FASTDIFF_LAUNCH(int8_t); break;
    case DType::kU8: FASTDIFF_LAUNCH(uint8_t); break;
    case DType::kU16: FASTDIFF_LAUNCH(uint16_t); break;
    case DType::kU32: FASTDIFF_LAUNCH(uint32_t); break;
    case DType::kU64: FASTDIFF_LAUNCH(uint64_t); break;
    case DType::kF16: FASTDIFF_LAUNCH(__half); break;
    case DType::kBF16: FASTDIFF_LAUNCH(__nv_bfloat16); break;
    case DType::kF32: FASTDIFF_LAUNCH(float); break;
    case DType::kF64: FASTDIFF_LAUNCH(double); break;
  }
#undef FASTDIFF_LAUNCH
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_timestep_embedding(const void* t, DType t_type, const void* freqs,
                                      const void* table, int64_t rows, int64_t B, int64_t dim,
                                      bool flip, double scale, double width, double end,
                                      bool derivative, void* out, DType out_type,
                                      cudaStream_t stream) {
  if (out_type == DType::kF64)
    return launch_typed<double>(t, t_type, (const double*)freqs, (const double*)table, rows, B,
                                dim, flip, scale, width, end, derivative, (double*)out, stream);
  return launch_typed<float>(t, t_type, (const float*)freqs, (const float*)table, rows, B, dim,
                             flip, scale, width, end, derivative, (float*)out, stream);
}

}  // namespace cuda
}  // namespace fastdiff
