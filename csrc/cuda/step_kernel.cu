// CUDA kernel of fastdiff::sampler_step. The per-element math is csrc/kernels/step.h, the
// same code the tested CPU kernel runs; no torch headers here (fast nvcc builds).
//
// Grid-stride over one sample's elements (blockIdx.y strides over samples, so the
// coefficient row is loaded once per block and sample). Each thread reads every input of
// its element once: the outputs are held in registers (output count specialised up to
// 4) while the history terms stream in; more outputs fall back to re-reading history
// per output (served by the caches).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../kernels/step.h"
#include "device_io.cuh"
#include "launchers.h"

namespace fastdiff {
namespace cuda {
namespace {

// The sample pointers are not restrict: an output may be one of the inputs
// (sampler_step.out), which is safe because a thread loads every input of its element
// before it stores any output of it (the register path, n_out <= 4, is the only one that
// sampler_step.out allows then).
template <typename T>
struct Params {
  const T* x;
  const T* x_base;
  const T* m;
  const T* m_cond;
  const T* noise;
  const T* hist[kStepMaxHistory];
  int64_t n_hist;
  T* out[kStepMaxOut];
  int64_t n_out;
  const acc_t<T>* __restrict__ coeffs;
  int64_t coeff_rows, ncols, B, S;
  bool clamp;
};

// kOut in 1..4: that many outputs, in registers; 0: p.n_out outputs, one at a time.
template <typename T, int kOut>
__global__ void step_kernel(const Params<T> p) {
  using acc = acc_t<T>;
  const int64_t nb = step::n_basis(p.n_hist);
  for (int64_t b = blockIdx.y; b < p.B; b += gridDim.y) {
    const acc* __restrict__ row = p.coeffs + (p.coeff_rows == 1 ? 0 : b * p.ncols);
    const step::Head<acc> h(row);
    const acc* __restrict__ C = row + step::kHead;
    const bool xb_in = p.x_base != nullptr, nz_in = p.noise != nullptr;
    bool only_d[kOut > 0 ? kOut : 1];  // outputs that are d itself (step::selects_d)
#pragma unroll
    for (int o = 0; o < (kOut > 0 ? kOut : 1); ++o)
      only_d[o] = kOut > 0 && step::selects_d(C + o * nb, p.n_hist, xb_in, nz_in);
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.S;
         i += (int64_t)gridDim.x * blockDim.x) {
      const int64_t e = b * p.S + i;
      const acc x = load(p.x, e);
      acc m = load(p.m, e);
      if (p.m_cond != nullptr) m = step::guide(m, load(p.m_cond, e), h.g);
      const acc d = p.clamp ? step::direction_clamped(x, m, h) : step::direction(x, m, h);
      const acc xb = p.x_base != nullptr ? load(p.x_base, e) : acc(0);
      const acc nz = p.noise != nullptr ? load(p.noise, e) : acc(0);
      // The output's terms up to the history, in basis order.
      auto head = [&](const acc* c) {
        acc v = c[step::kBasisX] * x;
        if (p.x_base != nullptr) v = step::axpy(v, c[step::kBasisXBase], xb);
        v = step::axpy(v, c[step::kBasisD], d);
        if (p.noise != nullptr) v = step::axpy(v, c[step::kBasisNoise], nz);
        return v;
      };
      if constexpr (kOut > 0) {
        acc y[kOut];
#pragma unroll
        for (int o = 0; o < kOut; ++o) y[o] = head(C + o * nb);
        for (int64_t k = 0; k < p.n_hist; ++k) {
          const acc hv = load(p.hist[k], e);
#pragma unroll
          for (int o = 0; o < kOut; ++o)
            y[o] = step::axpy(y[o], C[o * nb + step::kBasisHist + k], hv);
        }
#pragma unroll
        for (int o = 0; o < kOut; ++o) store(p.out[o], e, only_d[o] ? d : y[o]);
      } else {
        for (int64_t o = 0; o < p.n_out; ++o) {
          const acc* c = C + o * nb;
          acc v = head(c);
          for (int64_t k = 0; k < p.n_hist; ++k)
            v = step::axpy(v, c[step::kBasisHist + k], load(p.hist[k], e));
          store(p.out[o], e, step::selects_d(c, p.n_hist, xb_in, nz_in) ? d : v);
        }
      }
    }
  }
}

template <typename T>
cudaError_t launch_typed(const StepLaunch& a, cudaStream_t stream) {
  if (a.n_history > kStepMaxHistory || a.n_out > kStepMaxOut || a.n_out < 1)
    return cudaErrorInvalidValue;
  Params<T> p{};
  p.x = (const T*)a.x;
  p.x_base = (const T*)a.x_base;
  p.m = (const T*)a.model_out;
  p.m_cond = (const T*)a.model_out_cond;
  p.noise = (const T*)a.noise;
  for (int64_t k = 0; k < a.n_history; ++k) p.hist[k] = (const T*)a.history[k];
  p.n_hist = a.n_history;
  for (int64_t o = 0; o < a.n_out; ++o) p.out[o] = (T*)a.out[o];
  p.n_out = a.n_out;
  p.coeffs = (const acc_t<T>*)a.coeffs;
  p.coeff_rows = a.coeff_rows;
  p.ncols = step::n_coeffs(a.n_out, a.n_history);
  p.B = a.B;
  p.S = a.S;
  p.clamp = a.clamp;
  if (a.B == 0 || a.S == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t per_sample = (a.S + threads - 1) / threads;
  const int64_t gy = a.B < 65535 ? a.B : 65535;
  // At most ~64K blocks in all; the grid-stride loops cover the rest.
  const int64_t per_sample_cap = ((int64_t)1 << 16) / gy > 0 ? ((int64_t)1 << 16) / gy : 1;
  const int64_t gx = per_sample < per_sample_cap ? per_sample : per_sample_cap;
  const dim3 grid((unsigned)gx, (unsigned)gy);
  switch (a.n_out) {
    case 1: step_kernel<T, 1><<<grid, threads, 0, stream>>>(p); break;
    case 2: step_kernel<T, 2><<<grid, threads, 0, stream>>>(p); break;
    case 3: step_kernel<T, 3><<<grid, threads, 0, stream>>>(p); break;
    case 4: step_kernel<T, 4><<<grid, threads, 0, stream>>>(p); break;
    default: step_kernel<T, 0><<<grid, threads, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_sampler_step(const StepLaunch& args, cudaStream_t stream) {
  switch (args.dtype) {
    case DType::kF32: return launch_typed<float>(args, stream);
    case DType::kF64: return launch_typed<double>(args, stream);
    case DType::kF16: return launch_typed<__half>(args, stream);
    case DType::kBF16: return launch_typed<__nv_bfloat16>(args, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace fastdiff
