// Argument checks shared by the CPU and CUDA registrations (torch side only): every op
// validates at the boundary with TORCH_CHECK so bad input is a clear Python error.
#pragma once
// Light headers only: <torch/torch.h> costs minutes of compile time per file.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace fastdiff {

// Contiguous view of an optional input (undefined when absent; a no-op when contiguous).
inline at::Tensor opt_contig(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->contiguous() : at::Tensor();
}

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

namespace fastdiff {

// fastdiff::sampler_step (semantics: fastdiff._ops.step_ref). Every optional / history
// tensor must be like x (shape, dtype, device); coeffs [B or 1, 8 + n_out * (4 + H)] in
// the accumulation dtype (float64 for float64 x, else float32).
inline void check_step_args(const at::Tensor& x, const c10::optional<at::Tensor>& x_base,
                            const at::Tensor& model_out,
                            const c10::optional<at::Tensor>& model_out_cond,
                            at::TensorList history, const c10::optional<at::Tensor>& noise,
                            const at::Tensor& coeffs, int64_t n_out) {
  TORCH_CHECK(x.dim() >= 1, "sampler_step: x must have shape [B, ...], got a 0-dim tensor");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              "sampler_step: x must be float32, float16, bfloat16 or float64, got ", st);
  auto like_x = [&](const at::Tensor& t, const char* name, int64_t k) {
    const std::string label = k < 0 ? std::string(name) : std::string(name) + "[" +
                                                              std::to_string(k) + "]";
    TORCH_CHECK(t.sizes() == x.sizes(), "sampler_step: ", label, " has shape ", t.sizes(),
                ", expected x's shape ", x.sizes());
    TORCH_CHECK(t.scalar_type() == st, "sampler_step: ", label, " has dtype ", t.scalar_type(),
                ", expected x's dtype ", st);
    TORCH_CHECK(t.device() == x.device(), "sampler_step: ", label, " is on ", t.device(),
                ", expected x's device ", x.device());
  };
  like_x(model_out, "model_out", -1);
  if (x_base.has_value() && x_base->defined()) like_x(*x_base, "x_base", -1);
  if (model_out_cond.has_value() && model_out_cond->defined())
    like_x(*model_out_cond, "model_out_cond", -1);
  if (noise.has_value() && noise->defined()) like_x(*noise, "noise", -1);
  for (size_t k = 0; k < history.size(); ++k) like_x(history[k], "history", (int64_t)k);
  TORCH_CHECK(n_out >= 1, "sampler_step: n_out must be >= 1, got ", n_out);
  const int64_t B = x.size(0);
  const int64_t want = 8 + n_out * (4 + (int64_t)history.size());
  TORCH_CHECK(coeffs.dim() == 2 && (coeffs.size(0) == 1 || coeffs.size(0) == B) &&
                  coeffs.size(1) == want,
              "sampler_step: coeffs must have shape [", B, " or 1, ", want, "] for n_out=", n_out,
              " and ", history.size(), " history tensors, got ", coeffs.sizes());
  const auto acc = st == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(coeffs.scalar_type() == acc, "sampler_step: coeffs must be ", acc, " for ", st,
              " samples, got ", coeffs.scalar_type());
  TORCH_CHECK(coeffs.device() == x.device(), "sampler_step: coeffs is on ", coeffs.device(),
              ", expected x's device ", x.device());
}

// Outputs of fastdiff::sampler_step.out. Each is a contiguous tensor like x that shares no
// memory with the other outputs and either shares none with the inputs or is exactly one
// of them (the same contiguous memory: every backend reads element i of all inputs before
// it writes element i of any output, for up to kStepMaxAliasOut outputs; more outputs take
// several passes over the inputs). Returns whether some output is an input.
constexpr int64_t kStepMaxAliasOut = 4;

// The bytes [begin, end) a strided tensor can touch (empty for numel() == 0).
inline std::pair<uintptr_t, uintptr_t> byte_extent(const at::Tensor& t) {
  const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  if (t.numel() == 0) return {begin, begin};
  int64_t last = 0;  // offset of the last element, in elements (strides are >= 0)
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return {begin, begin + (uintptr_t)((last + 1) * (int64_t)t.element_size())};
}

inline bool check_step_out(const at::Tensor& x, const c10::optional<at::Tensor>& x_base,
                           const at::Tensor& model_out,
                           const c10::optional<at::Tensor>& model_out_cond,
                           at::TensorList history, const c10::optional<at::Tensor>& noise,
                           const at::Tensor& coeffs, at::TensorList out) {
  TORCH_CHECK(!out.empty(), "sampler_step.out: out must hold at least one tensor");
  std::vector<std::pair<at::Tensor, std::string>> inputs = {{x, "x"}, {model_out, "model_out"},
                                                            {coeffs, "coeffs"}};
  for (const auto* o : {&x_base, &model_out_cond, &noise}) {
    if (o->has_value() && (*o)->defined())
      inputs.emplace_back(**o, o == &x_base ? "x_base" : o == &noise ? "noise" : "model_out_cond");
  }
  for (size_t k = 0; k < history.size(); ++k)
    inputs.emplace_back(history[k], "history[" + std::to_string(k) + "]");
  bool alias = false;
  for (size_t o = 0; o < out.size(); ++o) {
    const at::Tensor& y = out[o];
    TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type() &&
                    y.device() == x.device(),
                "sampler_step.out: out[", o, "] must be like x (shape ", x.sizes(), ", ",
                x.scalar_type(), ", ", x.device(), "), got ", y.sizes(), ", ", y.scalar_type(),
                ", ", y.device());
    TORCH_CHECK(y.is_contiguous(), "sampler_step.out: out[", o, "] must be contiguous");
    if (y.numel() == 0) continue;
    const auto ey = byte_extent(y);
    auto overlaps = [&](const at::Tensor& t) {
      const auto et = byte_extent(t);
      return et.first < ey.second && ey.first < et.second;
    };
    for (size_t p = 0; p < o; ++p)
      TORCH_CHECK(!overlaps(out[p]), "sampler_step.out: out[", o, "] overlaps out[", p, "]");
    for (const auto& [t, name] : inputs) {
      if (!overlaps(t)) continue;
      const bool exact = t.const_data_ptr() == y.const_data_ptr() && t.sizes() == y.sizes() &&
                         t.scalar_type() == y.scalar_type() && t.is_contiguous();
      TORCH_CHECK(exact, "sampler_step.out: out[", o, "] partially overlaps ", name,
                  " (an output may be an input exactly, or share no memory with it)");
      alias = true;
    }
  }
  TORCH_CHECK(!alias || (int64_t)out.size() <= kStepMaxAliasOut, "sampler_step.out: outputs "
              "that are inputs need n_out <= ", kStepMaxAliasOut, ", got ", out.size());
  return alias;
}

// fastdiff::diff_norm: a and b [B, ...] of the same shape, floating dtype and device.
inline void check_diff_norm_args(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() >= 1, "diff_norm: a must have shape [B, ...], got a 0-dim tensor");
  TORCH_CHECK(a.sizes() == b.sizes(), "diff_norm: a has shape ", a.sizes(), " but b has shape ",
              b.sizes());
  const auto st = a.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              "diff_norm: a must be float32, float16, bfloat16 or float64, got ", st);
  TORCH_CHECK(b.scalar_type() == st, "diff_norm: a has dtype ", st, " but b has dtype ",
              b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), "diff_norm: a is on ", a.device(), " but b is on ",
              b.device());
}

}  // namespace fastdiff
