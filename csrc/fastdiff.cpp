// Op schemas: the one place every fastdiff op is declared. Backends register
// implementations with TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and csrc/cuda/*.cpp; fake
// kernels, autograd and forward-AD rules live in fastdiff/_ops.py and fastdiff/embedding.py.
// fastdiff/_ops.py holds the same strings for the no-extension fallback. The Python module
// itself (PyInit__C) is defined in csrc/program.cpp.
#include <torch/library.h>

TORCH_LIBRARY(fastdiff, m) {
  m.def(
      "timestep_embedding(Tensor t, Tensor freqs, Tensor? table, int dim, bool flip_sin_to_cos, "
      "float scale, float share_width, float share_end, bool derivative) -> Tensor");
  m.def(
      "sampler_step(Tensor x, Tensor? x_base, Tensor model_out, Tensor? model_out_cond, "
      "Tensor[] history, Tensor? noise, Tensor coeffs, bool clamp, int n_out) -> Tensor[]");
  // The same step written into given outputs (fastdiff._ops.step_out_ref: each may be one
  // of the inputs exactly, so a sampler can update its state and history in place).
  m.def(
      "sampler_step.out(Tensor x, Tensor? x_base, Tensor model_out, Tensor? model_out_cond, "
      "Tensor[] history, Tensor? noise, Tensor coeffs, bool clamp, *, Tensor(a!)[] out) -> ()");
  m.def("diff_norm(Tensor a, Tensor b) -> Tensor");
  // softmax(q k^T * scale) v and its tangent along (dq, dk, dv), in one pass over keys.
  m.def(
      "sdpa_jvp(Tensor q, Tensor k, Tensor v, Tensor dq, Tensor dk, Tensor dv, float scale) "
      "-> (Tensor, Tensor)");
  // The forward-mode tangent of group_norm along dx (weight and bias constant), from the
  // per-group mean and rstd that native_group_norm returns with the primal.
  m.def(
      "group_norm_tangent(Tensor x, Tensor dx, Tensor mean, Tensor rstd, Tensor? weight, "
      "int groups) -> Tensor");
}
