// Building blocks of the CPU kernels built around a frozen linear layer (lowrank.cpp,
// radapter.cpp, fold.cpp): a GEMM on tensors whose result does not depend on the thread count
// (gemm.h), a column sum accumulated in double, the rank-space dropout of pyadapt.reference,
// and the dtype policy (bf16/fp16 storage computes in float32 and is rounded once at the end).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "gemm.h"

namespace pyadapt {
namespace cpu {

// Products of at most kSmallGemm multiply-adds are one direct BLAS call on the calling thread,
// the very call F.linear / torch.mm make (so a zero adapter leaves a small base output bit-equal
// to nn.Linear's). That its bits do not depend on the thread count is measured, not a BLAS
// guarantee: 117 shapes up to kSmallGemm, MKL 2024.2, 1 vs 2 threads, all bit-identical; the
// tests' thread-count checks cover both paths. Larger products run gemm.h's GEMM.
constexpr double kSmallGemm = double(1 << 21);  // multiply-adds

// How `init` enters tiled_gemm: not at all (out = alpha a b), as a row broadcast to every row
// (a bias of n values), or as a matrix of out's shape (it may be out itself: accumulate).
enum class Init { None, Row, Matrix };

template <typename T>
inline View<T> view_of(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1)};
}

template <typename T>
void gemm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, Init how,
               const at::Tensor& init, double beta, double alpha) {
  const int64_t m = out.size(0), n = out.size(1), K = a.size(1);
  const T* ip = how == Init::None ? nullptr : init.data_ptr<T>();
  const int64_t ldi = how == Init::Matrix ? init.stride(0) : 0;
  TORCH_CHECK(how != Init::Matrix || init.stride(1) == 1, "gemm: init needs unit column stride");
  TORCH_CHECK(how != Init::Row || init.stride(0) == 1, "gemm: bias needs unit stride");
  if (4 * m <= n && how != Init::Row) {
    // few rows, many columns (an r x d weight gradient): compute out^T = b^T a^T, so the packed
    // operand is the small one and the large one is read in place, column runs contiguous
    StoreTransposedEpi<T, T> epi{out.data_ptr<T>(), out.stride(0), m, T(alpha), T(beta), ip, ldi};
    gemm<T>(n, m, K, view_of<T>(b).t(), view_of<T>(a).t(), epi);
  } else {
    StoreEpi<T, T> epi{out.data_ptr<T>(), out.stride(0), n, T(alpha), T(beta), ip, ldi};
    gemm<T>(m, n, K, view_of<T>(a), view_of<T>(b), epi);
  }
}

// out (m x n) = beta * init + alpha * a (m x k) @ b (k x n); a and b may be any strided views
// (transposes, column slices), out and a matrix init need unit column stride.
inline void tiled_gemm(at::Tensor out, const at::Tensor& a, const at::Tensor& b, Init how,
                       const at::Tensor& init, double beta, double alpha) {
  const int64_t m = out.size(0), n = out.size(1);
  if (m == 0 || n == 0) return;
  if (double(m) * double(n) * double(a.size(1)) <= kSmallGemm) {
    at::NoGradGuard no_grad;
    if (how == Init::None) {
      at::addmm_out(out, out, a, b, 0.0, alpha);  // beta = 0: out is not read (nor its NaNs)
    } else if (how == Init::Row) {
      out.copy_(init.unsqueeze(0).expand({m, n}));
      at::addmm_out(out, out, a, b, beta, alpha);
    } else {
      at::addmm_out(out, init, a, b, beta, alpha);
    }
    return;
  }
  TORCH_CHECK(out.stride(1) == 1, "gemm: out needs unit column stride");
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "tiled_gemm", [&] {
    gemm_into<scalar_t>(out, a, b, how, init, beta, alpha);
  });
}

// a @ b as a new contiguous tensor (m x n), deterministic (see tiled_gemm).
inline at::Tensor det_mm(const at::Tensor& a, const at::Tensor& b, double alpha = 1.0) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  tiled_gemm(out, a, b, Init::None, at::Tensor(), 0.0, alpha);
  return out;
}

// bias (n) broadcast + a @ b; bias undefined: a @ b.
inline at::Tensor det_linear(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  if (bias.defined())
    tiled_gemm(out, a, b, Init::Row, bias, 1.0, 1.0);
  else
    tiled_gemm(out, a, b, Init::None, at::Tensor(), 0.0, 1.0);
  return out;
}

// out += alpha * a @ b, deterministic.
inline void det_addmm_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double alpha) {
  tiled_gemm(out, a, b, Init::Matrix, out, 1.0, alpha);
}

// Column sums of a contiguous (rows x cols) matrix, each accumulated in double over the rows
// in order (columns are split among threads, rows never are): a bias gradient.
template <typename T>
inline void column_sum(const T* __restrict__ g, int64_t rows, int64_t cols, T* __restrict__ out) {
  constexpr int64_t kColBlock = 256;
  const int64_t nb = (cols + kColBlock - 1) / kColBlock;
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    std::vector<double> acc(kColBlock);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t j0 = b * kColBlock, w = std::min(kColBlock, cols - j0);
      std::fill(acc.begin(), acc.begin() + w, 0.0);
      for (int64_t i = 0; i < rows; ++i) {
        const T* __restrict__ gi = g + i * cols + j0;
        for (int64_t j = 0; j < w; ++j) acc[j] += double(gi[j]);
      }
      for (int64_t j = 0; j < w; ++j) out[j0 + j] = T(acc[j]);
    }
  });
}

inline at::Tensor column_sum(const at::Tensor& g) {
  at::Tensor gc = g.contiguous();
  at::Tensor out = at::empty({gc.size(1)}, gc.options());
  AT_DISPATCH_FLOATING_TYPES(gc.scalar_type(), "column_sum", [&] {
    column_sum<scalar_t>(gc.data_ptr<scalar_t>(), gc.size(0), gc.size(1),
                         out.data_ptr<scalar_t>());
  });
  return out;
}

// sum_ij a_ij * b_ij in double, in a fixed order (one thread): a scale gradient.
inline double dot_all(const at::Tensor& a_, const at::Tensor& b_) {
  at::Tensor a = a_.contiguous(), b = b_.to(a.scalar_type()).contiguous();
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "dot_all", [&] {
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    const int64_t n = a.numel();
    constexpr int64_t kBlock = 1024;
    for (int64_t e0 = 0; e0 < n; e0 += kBlock) {
      const int64_t e1 = std::min(n, e0 + kBlock);
      double part = 0.0;
      for (int64_t e = e0; e < e1; ++e) part += double(ap[e]) * double(bp[e]);
      total += part;
    }
  });
  return total;
}

// In place on a contiguous (rows x cols) matrix: the reference's inverted dropout, element
// (i, j) kept iff philox_uniform(seed, i * cols + j) >= p (p rounded to float32), kept values
// multiplied by 1/(1-p) rounded to T (as the reference's multiplier tensor is).
inline void apply_dropout(at::Tensor& t, uint64_t seed, double p) {
  const int64_t rows = t.size(0), cols = t.size(1);
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "apply_dropout", [&] {
    scalar_t* tp = t.data_ptr<scalar_t>();
    const float pf = float(p);
    const scalar_t mult = scalar_t(1.0 / (1.0 - p));
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        scalar_t* __restrict__ ti = tp + i * cols;
        const uint64_t base = uint64_t(i) * uint64_t(cols);
        for (int64_t j = 0; j < cols; ++j)
          ti[j] = philox_uniform(seed, base + uint64_t(j)) >= pf ? ti[j] * mult : scalar_t(0);
      }
    });
  });
}

// Rows of a contiguous (rows x cols) matrix scaled in place: t_i *= f_i (f of length rows).
inline void scale_rows(at::Tensor& t, const at::Tensor& f) {
  const int64_t rows = t.size(0), cols = t.size(1);
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "scale_rows", [&] {
    scalar_t* tp = t.data_ptr<scalar_t>();
    const scalar_t* fp = f.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const scalar_t v = fp[i];
        scalar_t* __restrict__ ti = tp + i * cols;
        for (int64_t j = 0; j < cols; ++j) ti[j] *= v;
      }
    });
  });
}

// The dtype a storage dtype computes in: float32 for bf16/fp16, itself otherwise.
inline at::ScalarType compute_type(at::ScalarType storage) {
  return (storage == at::kHalf || storage == at::kBFloat16) ? at::kFloat : storage;
}

inline void check_storage(at::ScalarType dt, const char* op) {
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              op, " (cpu backend): expected float32, float64, bfloat16 or float16, got ", dt);
}

inline at::Tensor in_compute(const at::Tensor& t, at::ScalarType ct) {
  return t.to(ct).contiguous();
}

inline at::Tensor opt_in_compute(const c10::optional<at::Tensor>& t, at::ScalarType ct) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return t->to(ct).contiguous();
}

inline uint64_t seed_value(const c10::optional<at::Tensor>& seed, double p, const char* op) {
  if (p <= 0.0) return 0;
  TORCH_CHECK(seed.has_value() && seed->defined(), op, ": dropout needs a seed");
  return uint64_t(seed->item<int64_t>());
}

}  // namespace cpu
}  // namespace pyadapt
