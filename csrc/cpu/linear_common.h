// Building blocks of the CPU kernels built around a frozen linear layer (lowrank.cpp,
// radapter.cpp, fold.cpp): a tiled GEMM whose result does not depend on the thread count, a
// column sum accumulated in double, the rank-space dropout of pyadapt.reference, and the dtype
// policy (bf16/fp16 storage computes in float32 and is rounded once at the end).
//
// Why tiles: a BLAS call may pick its blocking (and so its summation order) from the number of
// threads it gets. Here the output is cut into fixed tiles that depend on the shapes only; each
// tile is one BLAS call contracting over the full inner dimension, made inside at::parallel_for
// (an OpenMP region, where MKL runs single-threaded), and tiles run in parallel. Every output
// element is therefore computed by the same call with the same operands whatever the thread
// count. Products of at most kSmallGemm multiply-adds are one direct call instead (below).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"

namespace pyadapt {
namespace cpu {

// Output tiles: full-width row blocks of at most kMaxTileRows rows (each BLAS call packs its
// rows once and sees the whole width), cut into kTargetTiles or more tiles where the shape
// allows, splitting columns too when there are few rows (skinny 16 x 768 weight gradients).
// Sizes are multiples of 16 and depend on the shape only, never on the thread count.
constexpr int64_t kMaxTileRows = 256;
constexpr int64_t kTargetTiles = 8;
constexpr double kSmallGemm = double(1 << 21);  // multiply-adds

inline int64_t round_up16(int64_t v) { return (v + 15) / 16 * 16; }

struct TileShape {
  int64_t rows, cols;
};

inline TileShape tile_shape(int64_t m, int64_t n) {
  const int64_t rows = std::max<int64_t>(
      16, std::min(kMaxTileRows, round_up16((m + kTargetTiles - 1) / kTargetTiles)));
  const int64_t row_tiles = std::max<int64_t>(1, (m + rows - 1) / rows);  // m = 0: no tiles
  int64_t cols = n;
  if (row_tiles < kTargetTiles) {
    const int64_t splits = (kTargetTiles + row_tiles - 1) / row_tiles;
    cols = std::max<int64_t>(16, round_up16((n + splits - 1) / splits));
  }
  return {rows, std::max<int64_t>(cols, 1)};
}

// How `init` enters tiled_gemm: not at all (out = alpha a b), as a row broadcast to every row
// (a bias of n values), or as a matrix of out's shape (it may be out itself: accumulate).
enum class Init { None, Row, Matrix };

// out (m x n) = beta * init + alpha * a (m x k) @ b (k x n); a, b and out may be strided views
// with unit stride in one dimension (transposes of contiguous matrices, column slices).
inline void tiled_gemm(at::Tensor out, const at::Tensor& a, const at::Tensor& b, Init how,
                       const at::Tensor& init, double beta, double alpha) {
  const int64_t m = out.size(0), n = out.size(1);
  if (m == 0 || n == 0) return;
  // A small product is one call, the very call F.linear / torch.mm make (so a zero adapter
  // leaves the base output bit-equal to nn.Linear's). That its bits do not depend on the thread
  // count is measured, not a BLAS guarantee: 117 shapes up to kSmallGemm, MKL 2024.2, 1 vs 2
  // threads, all bit-identical; the tests' thread-count checks cover both paths.
  const bool small = double(m) * double(n) * double(a.size(1)) <= kSmallGemm;
  const TileShape ts = small ? TileShape{m, n} : tile_shape(m, n);
  const int64_t tm = (m + ts.rows - 1) / ts.rows;
  const int64_t tn = (n + ts.cols - 1) / ts.cols;
  auto run_tiles = [&](int64_t t0, int64_t t1) {
    // Grad mode is thread-local and worker threads do not inherit the caller's guard.
    at::NoGradGuard no_grad;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = (t / tn) * ts.rows, j0 = (t % tn) * ts.cols;
      const int64_t bm = std::min(ts.rows, m - i0), bn = std::min(ts.cols, n - j0);
      at::Tensor o = out.narrow(0, i0, bm).narrow(1, j0, bn);
      at::Tensor at_ = a.narrow(0, i0, bm);
      at::Tensor bt = b.narrow(1, j0, bn);
      if (how == Init::None) {
        at::addmm_out(o, o, at_, bt, 0.0, alpha);  // beta = 0: o is not read (nor its NaNs)
      } else if (how == Init::Row) {
        o.copy_(init.narrow(0, j0, bn).unsqueeze(0).expand({bm, bn}));
        at::addmm_out(o, o, at_, bt, beta, alpha);
      } else {
        at::Tensor it = init.narrow(0, i0, bm).narrow(1, j0, bn);
        at::addmm_out(o, it, at_, bt, beta, alpha);
      }
    }
  };
  if (small)
    run_tiles(0, 1);  // on the calling thread, outside any parallel region, as F.linear runs
  else
    at::parallel_for(0, tm * tn, 1, run_tiles);
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
