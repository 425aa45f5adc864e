// CPU kernel of fastdiff::timestep_embedding: rows in parallel (at::parallel_for), the
// per-row frequency loop vectorized by the compiler through the branch-free sincos of
// csrc/kernels/embedding.h (built for AVX-512, AVX2 and baseline; picked at load time).
#include <ATen/Dispatch.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "../kernels/embedding.h"
#include "../checks.h"

namespace fastdiff {
namespace {

using embedding::Layout;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTDIFF_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define FASTDIFF_CLONES
#endif

// One row's sin/cos columns; out has `dim` entries. kFast: every |scale * ts * freq| is
// below embedding::kFastSincosMax (the branch-free, vectorized loop).
template <typename acc, bool kFast>
FASTDIFF_CLONES void embed_row(acc ts, acc slope, const acc* __restrict freqs, acc scale,
                               bool derivative, const Layout L, acc* __restrict out) {
  acc* __restrict sin_col = out + L.sin_off;
  acc* __restrict cos_col = out + L.cos_off;
  if (derivative) {
    for (int64_t k = 0; k < L.half; ++k)
      embedding::pair<acc, kFast>(ts, slope, freqs[k], scale, true, sin_col + k, cos_col + k);
  } else {
    for (int64_t k = 0; k < L.half; ++k)
      embedding::pair<acc, kFast>(ts, slope, freqs[k], scale, false, sin_col + k, cos_col + k);
  }
  if (L.dim % 2) out[L.dim - 1] = acc(0);
}

template <typename T, typename acc>
void embed_rows(const T* t, const acc* freqs, const acc* table, int64_t rows, int64_t B,
                const Layout L, acc scale, double width, double end, bool derivative, acc* out) {
  constexpr bool kInt = std::is_integral<T>::value;
  // Mapping precision: double for integer t (exact), else t's accumulation type; the
  // shared time is rounded back to t's own type, as fastdiff.TimeSharing returns it.
  using map_t = typename std::conditional<kInt, double, acc_t<T>>::type;
  // Bounds |scale * ts * freq| per row, to pick the fast sin/cos loop for normal t.
  double max_freq = 0.0;
  for (int64_t k = 0; k < L.half; ++k) max_freq = std::max(max_freq, std::fabs((double)freqs[k]));
  const double fast_below = 0.5 * embedding::kFastSincosMax / (std::fabs((double)scale) * max_freq);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(L.dim, 1));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      acc* row = out + b * L.dim;
      if (kInt && table != nullptr && !derivative) {
        const int64_t ti = static_cast<int64_t>(t[b]);  // a uint64 t > INT64_MAX turns negative
        if (ti >= 0 && ti < rows) {
          std::memcpy(row, table + ti * L.dim, sizeof(acc) * L.dim);
          continue;
        }
      }
      const map_t tv = static_cast<map_t>(t[b]);
      const bool shared = embedding::is_shared<map_t>(tv, static_cast<map_t>(end));
      // Unshared t converts straight to acc (like torch's .to(float32)): going through
      // double would round int64 t twice, and back to T would overflow at INT64_MAX.
      const acc ts = shared ? static_cast<acc>(static_cast<T>(embedding::share<map_t>(
                                  tv, static_cast<map_t>(width), static_cast<map_t>(end))))
                            : static_cast<acc>(t[b]);
      const acc slope = shared ? acc(0) : acc(1);
      if (std::fabs((double)ts) < fast_below)
        embed_row<acc, true>(ts, slope, freqs, scale, derivative, L, row);
      else
        embed_row<acc, false>(ts, slope, freqs, scale, derivative, L, row);
    }
  });
}

at::Tensor timestep_embedding_cpu(const at::Tensor& t, const at::Tensor& freqs,
                                  const c10::optional<at::Tensor>& table, int64_t dim,
                                  bool flip, double scale, double width, double end,
                                  bool derivative) {
  check_embedding_args(t, freqs, table, dim, width, end);
  auto tc = t.contiguous();
  auto fc = freqs.contiguous();
  const int64_t B = tc.size(0);
  auto out = at::empty({B, dim}, freqs.options());
  at::Tensor tab;
  if (table.has_value() && table->defined()) tab = table->contiguous();
  const Layout L(dim, flip);
  AT_DISPATCH_FLOATING_TYPES(freqs.scalar_type(), "timestep_embedding_cpu_out", [&] {
    using acc = scalar_t;
    const acc* tab_ptr = tab.defined() ? tab.data_ptr<acc>() : nullptr;
    const int64_t rows = tab.defined() ? tab.size(0) : 0;
    AT_DISPATCH_V2(tc.scalar_type(), "timestep_embedding_cpu", AT_WRAP([&] {
      embed_rows<scalar_t, acc>(tc.data_ptr<scalar_t>(), fc.data_ptr<acc>(), tab_ptr, rows, B, L,
                                static_cast<acc>(scale), width, end, derivative,
                                out.data_ptr<acc>());
    }), AT_EXPAND(AT_ALL_TYPES), AT_EXPAND(AT_BAREBONES_UNSIGNED_TYPES), at::kHalf, at::kBFloat16);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("timestep_embedding", &timestep_embedding_cpu);
}

}  // namespace fastdiff
