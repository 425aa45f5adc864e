// C entry points of the emulated CUDA kernels for the Python tests (ctypes): the same
// launchers the torch registrations in csrc/cuda/*.cpp call, on host buffers.
#include "launchers.h"

using fastdiff::cuda::DType;

extern "C" {

int emu_sampler_step(const void* x, const void* x_base, const void* m, const void* m_cond,
                     const void* noise, const void* const* hist, int64_t n_hist,
                     void* const* out, int64_t n_out, const void* coeffs, int64_t coeff_rows,
                     int64_t B, int64_t S, int clamp, int dtype) {
  fastdiff::cuda::StepLaunch a{};
  a.x = x;
  a.x_base = x_base;
  a.model_out = m;
  a.model_out_cond = m_cond;
  a.noise = noise;
  if (n_hist > fastdiff::cuda::kStepMaxHistory || n_out > fastdiff::cuda::kStepMaxOut) return -1;
  for (int64_t k = 0; k < n_hist; ++k) a.history[k] = hist[k];
  a.n_history = n_hist;
  for (int64_t o = 0; o < n_out; ++o) a.out[o] = out[o];
  a.n_out = n_out;
  a.coeffs = coeffs;
  a.coeff_rows = coeff_rows;
  a.B = B;
  a.S = S;
  a.clamp = clamp != 0;
  a.dtype = (DType)dtype;
  return (int)fastdiff::cuda::launch_sampler_step(a, nullptr);
}

int emu_diff_norm(const void* a, const void* b, int dtype, int64_t B, int64_t S,
                  double* workspace, void* out) {
  return (int)fastdiff::cuda::launch_diff_norm(a, b, (DType)dtype, B, S, workspace, out, nullptr);
}

int emu_timestep_embedding(const void* t, int t_type, const void* freqs, const void* table,
                           int64_t rows, int64_t B, int64_t dim, int flip, double scale,
                           double width, double end, int derivative, void* out, int out_type) {
  return (int)fastdiff::cuda::launch_timestep_embedding(
      t, (DType)t_type, freqs, table, rows, B, dim, flip != 0, scale, width, end,
      derivative != 0, out, (DType)out_type, nullptr);
}

// Grid clamp (grid-stride coverage) and scheduling order; counters since the last call.
void emu_configure(unsigned gx, unsigned gy, unsigned gz, int reverse) {
  emu::max_grid[0] = gx;
  emu::max_grid[1] = gy;
  emu::max_grid[2] = gz;
  emu::reverse_order = reverse != 0;
}

void emu_counters(int64_t* out) {
  out[0] = emu::launches;
  out[1] = emu::barriers;
  out[2] = emu::shuffles;
  emu::launches = emu::barriers = emu::shuffles = 0;
}
}
