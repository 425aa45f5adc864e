// CPU kernel of fastdiff::sdpa_jvp: softmax(q k^T * scale) v and its tangent along
// (dq, dk, dv) in one pass over key blocks (reference: fastdiff._ops.sdpa_jvp_ref).
//
// With s = q k^T * scale, ds = (dq k^T + q dk^T) * scale and p = softmax(s) row-wise:
//   out  = p v
//   dout = p dv + (p * (ds - rowsum(p * ds))) v
// Per query row an online softmax keeps the running max m and, relative to exp(s - m),
//   l = sum e,  c = sum e ds,  acc = sum e v,  acc_dv = sum e dv,  acc_dsv = sum e ds v
// (all rescaled by exp(m_old - m_new) when the max grows), so that at the end
//   out = acc / l,  dout = (acc_dv + acc_dsv) / l - (c / l) out.
// Nothing larger than a [kQBlock, kKBlock] tile of s and ds exists at any time; math in
// float32 (float64 for float64 inputs). Tasks are (batch*head, query block) pairs.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace fastdiff {
namespace {

constexpr int64_t kQBlock = 32;
constexpr int64_t kKBlock = 64;

struct Dims {
  int64_t BH, Lq, Lk, D, Dv;
};

// Copies rows [r0, r0 + n) of a [L, W] matrix into acc-typed dst[n * W].
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTDIFF_ATTN_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTDIFF_ATTN_CLONES
#endif
// The helpers below are inlined into each clone of sdpa_jvp_task, so that they, too, are
// compiled for its instruction set (called out of line they stay baseline SSE2).
#if defined(__GNUC__)
#define FASTDIFF_INLINE inline __attribute__((always_inline))
#else
#define FASTDIFF_INLINE inline
#endif

// A [L, W] matrix with unit column stride and row stride rs (diffusers' attention views
// [B, L, H, D] memory as [B, H, L, D]: read in place rather than copied).
template <typename T>
struct Mat {
  const T* p;
  int64_t rs;
};

// Copies rows [r0, r0 + n) into acc-typed dst[n * W].
template <typename T, typename acc>
FASTDIFF_INLINE void load_rows(Mat<T> src, int64_t r0, int64_t n, int64_t W, acc* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const T* p = src.p + (r0 + i) * src.rs;
    for (int64_t w = 0; w < W; ++w) dst[i * W + w] = static_cast<acc>(p[w]);
  }
}

// The same rows transposed: dst[w * kKBlock + i] (so that loops over keys are unit-stride).
template <typename T, typename acc>
FASTDIFF_INLINE void load_rows_t(Mat<T> src, int64_t r0, int64_t n, int64_t W, acc* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const T* p = src.p + (r0 + i) * src.rs;
    for (int64_t w = 0; w < W; ++w) dst[w * kKBlock + i] = static_cast<acc>(p[w]);
  }
}

// The inner loops run over keys (j) or value columns (x) with independent accumulators on
// restrict pointers, so they vectorize without reassociating a sum.

// s += a k_row, ds += b k_row, dsk += a dk_row over nk keys.
template <typename acc>
FASTDIFF_INLINE void qk_step(acc a, acc b, const acc* __restrict kr, const acc* __restrict dkr,
                    acc* __restrict s, acc* __restrict ds, acc* __restrict dsk, int64_t nk) {
  for (int64_t j = 0; j < nk; ++j) {
    s[j] += a * kr[j];
    ds[j] += b * kr[j];
    dsk[j] += a * dkr[j];
  }
}

// e_j = exp(s_j - mb) for s_j <= mb. float: a Cody-Waite reduction and a degree-7 Taylor
// polynomial (relative error ~1e-7, as expf) written without calls, so it vectorizes.
FASTDIFF_INLINE void exp_shifted(float* __restrict s, float mb, int64_t nk) {
  for (int64_t j = 0; j < nk; ++j) {
    const float x = std::max(s[j] - mb, -87.0f);  // exp(-87) ~ 1.6e-38: 0 next to exp(0)
    const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
    const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
    float two_n;
    std::memcpy(&two_n, &bits, sizeof two_n);
    s[j] = p * two_n;
  }
}

FASTDIFF_INLINE void exp_shifted(double* __restrict s, double mb, int64_t nk) {
  for (int64_t j = 0; j < nk; ++j) s[j] = std::exp(s[j] - mb);
}

// o += e_j v_j, odv += e_j dv_j, odsv += eds_j v_j over nk keys.
template <typename acc>
FASTDIFF_INLINE void pv_step(const acc* __restrict e, const acc* __restrict eds, const acc* __restrict va,
                    const acc* __restrict dva, acc* __restrict o, acc* __restrict odv,
                    acc* __restrict odsv, int64_t nk, int64_t Dv) {
  for (int64_t j = 0; j < nk; ++j) {
    const acc ej = e[j], edsj = eds[j];
    const acc* __restrict vj = va + j * Dv;
    const acc* __restrict dvj = dva + j * Dv;
    for (int64_t x = 0; x < Dv; ++x) {
      o[x] += ej * vj[x];
      odv[x] += ej * dvj[x];
      odsv[x] += edsj * vj[x];
    }
  }
}

template <typename T, typename acc>
FASTDIFF_ATTN_CLONES void sdpa_jvp_task(Mat<T> q, Mat<T> k, Mat<T> v, Mat<T> dq, Mat<T> dk,
                                        Mat<T> dv, T* out, T* dout, const Dims& d,
                                        int64_t q0, int64_t nq, acc scale, std::vector<acc>& buf) {
  const int64_t D = d.D, Dv = d.Dv;
  buf.resize(2 * kQBlock * D + 2 * kKBlock * D + 2 * kKBlock * Dv + 3 * kQBlock * Dv +
             3 * kQBlock + 3 * kKBlock);
  acc* qa = buf.data();
  acc* dqa = qa + kQBlock * D;
  acc* kt = dqa + kQBlock * D;        // [D, kKBlock]
  acc* dkt = kt + kKBlock * D;        // [D, kKBlock]
  acc* va = dkt + kKBlock * D;        // [kKBlock, Dv]
  acc* dva = va + kKBlock * Dv;
  acc* o = dva + kKBlock * Dv;        // acc
  acc* odv = o + kQBlock * Dv;        // acc_dv
  acc* odsv = odv + kQBlock * Dv;     // acc_dsv
  acc* m = odsv + kQBlock * Dv;
  acc* l = m + kQBlock;
  acc* c = l + kQBlock;
  acc* s = c + kQBlock;               // one row of the tile: s, then e = exp(s - m)
  acc* ds = s + kKBlock;              // ds, then e * ds
  acc* dsk = ds + kKBlock;            // q dk^T part of ds

  load_rows<T, acc>(q, q0, nq, D, qa);
  load_rows<T, acc>(dq, q0, nq, D, dqa);
  std::fill(o, o + 3 * kQBlock * Dv, acc(0));
  std::fill(m, m + nq, -std::numeric_limits<acc>::infinity());
  std::fill(l, l + 2 * kQBlock, acc(0));  // l and c

  for (int64_t k0 = 0; k0 < d.Lk; k0 += kKBlock) {
    const int64_t nk = std::min(kKBlock, d.Lk - k0);
    load_rows_t<T, acc>(k, k0, nk, D, kt);
    load_rows_t<T, acc>(dk, k0, nk, D, dkt);
    load_rows<T, acc>(v, k0, nk, Dv, va);
    load_rows<T, acc>(dv, k0, nk, Dv, dva);
    for (int64_t i = 0; i < nq; ++i) {
      const acc* qi = qa + i * D;
      const acc* dqi = dqa + i * D;
      for (int64_t j = 0; j < nk; ++j) s[j] = ds[j] = dsk[j] = acc(0);
      for (int64_t e = 0; e < D; ++e)
        qk_step(qi[e], dqi[e], kt + e * kKBlock, dkt + e * kKBlock, s, ds, dsk, nk);
      acc mb = m[i];
      for (int64_t j = 0; j < nk; ++j) {
        s[j] *= scale;
        ds[j] = (ds[j] + dsk[j]) * scale;
        mb = std::max(mb, s[j]);
      }
      acc* oi = o + i * Dv;
      acc* odvi = odv + i * Dv;
      acc* odsvi = odsv + i * Dv;
      if (mb > m[i]) {  // the max grew: rescale what was summed relative to the old one
        const acc alpha = std::exp(m[i] - mb);  // 0 on the first block (m = -inf)
        l[i] *= alpha;
        c[i] *= alpha;
        for (int64_t x = 0; x < Dv; ++x) {
          oi[x] *= alpha;
          odvi[x] *= alpha;
          odsvi[x] *= alpha;
        }
        m[i] = mb;
      }
      exp_shifted(s, mb, nk);
      acc li = l[i], ci = c[i];
      for (int64_t j = 0; j < nk; ++j) {
        li += s[j];
        ds[j] *= s[j];
        ci += ds[j];
      }
      l[i] = li;
      c[i] = ci;
      pv_step(s, ds, va, dva, oi, odvi, odsvi, nk, Dv);
    }
  }
  for (int64_t i = 0; i < nq; ++i) {
    const acc inv = acc(1) / l[i];
    const acc r = c[i] * inv;
    T* out_i = out + (q0 + i) * Dv;
    T* dout_i = dout + (q0 + i) * Dv;
    for (int64_t x = 0; x < Dv; ++x) {
      const acc oo = o[i * Dv + x] * inv;
      out_i[x] = static_cast<T>(oo);
      dout_i[x] = static_cast<T>((odv[i * Dv + x] + odsv[i * Dv + x]) * inv - r * oo);
    }
  }
}

void check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  TORCH_CHECK_VALUE(q.dim() >= 2, "sdpa_jvp: q must have shape [..., Lq, D], got ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == q.dim() && v.dim() == q.dim(),
                    "sdpa_jvp: q, k, v must have the same number of dims, got ", q.sizes(),
                    ", ", k.sizes(), ", ", v.sizes());
  const int64_t n = q.dim();
  for (int64_t i = 0; i < n - 2; ++i)
    TORCH_CHECK_VALUE(k.size(i) == q.size(i) && v.size(i) == q.size(i),
                      "sdpa_jvp: q, k, v must have the same batch dims, got ", q.sizes(), ", ",
                      k.sizes(), ", ", v.sizes());
  TORCH_CHECK_VALUE(k.size(-1) == q.size(-1), "sdpa_jvp: k must have q's last dim ",
                    q.size(-1), ", got ", k.sizes());
  TORCH_CHECK_VALUE(v.size(-2) == k.size(-2), "sdpa_jvp: v must have k's length ", k.size(-2),
                    ", got ", v.sizes());
  TORCH_CHECK_VALUE(dq.sizes() == q.sizes() && dk.sizes() == k.sizes() &&
                        dv.sizes() == v.sizes(),
                    "sdpa_jvp: dq, dk, dv must have the shapes of q, k, v");
  const auto st = q.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
                   "sdpa_jvp: q must be float32, float16, bfloat16 or float64, got ", st);
  for (const at::Tensor* t : {&k, &v, &dq, &dk, &dv}) {
    TORCH_CHECK_TYPE(t->scalar_type() == st, "sdpa_jvp: all inputs must have q's dtype ", st,
                     ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == q.device(), "sdpa_jvp: all inputs must be on q's device ",
                      q.device(), ", got ", t->device());
  }
}

std::tuple<at::Tensor, at::Tensor> sdpa_jvp_cpu(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, const at::Tensor& dq,
                                                const at::Tensor& dk, const at::Tensor& dv,
                                                double scale) {
  check_args(q, k, v, dq, dk, dv);
  std::vector<int64_t> out_shape(q.sizes().begin(), q.sizes().end());
  out_shape.back() = v.size(-1);
  at::Tensor out = at::empty(out_shape, q.options());
  at::Tensor dout = at::empty(out_shape, q.options());
  int64_t BH = 1;
  for (int64_t i = 0; i < q.dim() - 2; ++i) BH *= q.size(i);
  const Dims d{BH, q.size(-2), k.size(-2), q.size(-1), v.size(-1)};
  if (out.numel() == 0) return {out, dout};
  if (d.Lk == 0) {  // softmax over no keys: torch's math backend gives NaN
    out.fill_(std::numeric_limits<double>::quiet_NaN());
    dout.fill_(std::numeric_limits<double>::quiet_NaN());
    return {out, dout};
  }
  // Unit stride along D is all the kernel needs; batch dims may have any strides.
  auto unit = [](const at::Tensor& t) { return t.stride(-1) == 1 || t.size(-1) == 1 ? t : t.contiguous(); };
  const at::Tensor qc = unit(q), kc = unit(k), vc = unit(v);
  const at::Tensor dqc = unit(dq), dkc = unit(dk), dvc = unit(dv);
  // element offset of batch entry bh of t (batch dims flattened in row-major order)
  auto offset = [](const at::Tensor& t, int64_t bh) {
    int64_t off = 0;
    for (int64_t i = t.dim() - 3; i >= 0; --i) {
      off += (bh % t.size(i)) * t.stride(i);
      bh /= t.size(i);
    }
    return off;
  };
  const int64_t nqb = (d.Lq + kQBlock - 1) / kQBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sdpa_jvp_cpu", [&] {
    using acc = at::opmath_type<scalar_t>;
    const scalar_t* Q = qc.const_data_ptr<scalar_t>();
    const scalar_t* K = kc.const_data_ptr<scalar_t>();
    const scalar_t* V = vc.const_data_ptr<scalar_t>();
    const scalar_t* dQ = dqc.const_data_ptr<scalar_t>();
    const scalar_t* dK = dkc.const_data_ptr<scalar_t>();
    const scalar_t* dV = dvc.const_data_ptr<scalar_t>();
    scalar_t* O = out.data_ptr<scalar_t>();
    scalar_t* dO = dout.data_ptr<scalar_t>();
    at::parallel_for(0, d.BH * nqb, 1, [&](int64_t t0, int64_t t1) {
      std::vector<acc> buf;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t bh = t / nqb, q0 = (t % nqb) * kQBlock;
        const int64_t nq = std::min(kQBlock, d.Lq - q0);
        auto mat = [&](const scalar_t* p, const at::Tensor& t) {
          return Mat<scalar_t>{p + offset(t, bh), t.stride(-2)};
        };
        const int64_t oo = bh * d.Lq * d.Dv;
        sdpa_jvp_task<scalar_t, acc>(mat(Q, qc), mat(K, kc), mat(V, vc), mat(dQ, dqc), mat(dK, dkc),
                                     mat(dV, dvc), O + oo, dO + oo, d, q0, nq,
                                     static_cast<acc>(scale), buf);
      }
    });
  });
  return {out, dout};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) { m.impl("sdpa_jvp", &sdpa_jvp_cpu); }

// Itself a derivative (a forward-AD rule's kernel); differentiating it again raises.
TORCH_LIBRARY_IMPL(fastdiff, Autograd, m) {
  m.impl("sdpa_jvp", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace fastdiff
