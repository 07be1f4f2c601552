// CPU kernel of the grouped fold (pyadapt/ops/fold.py): W'_i = W_i + s_i L_i R_i for many
// weights of different shapes in one parallel region. Each weight is copied once into its
// accumulation dtype (float32, float64 for float64 weights), every weight is cut into the fixed
// output tiles of tiled_gemm, and the tiles of all weights form one task list that the threads
// work through (heaviest first, each taking the next tile): small and large weights share the
// threads instead of running one after the other. A tile is one single-threaded BLAS call over the full inner size, so the result does
// not depend on the thread count; the accumulator is rounded once to the weight's dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "linear_common.h"

namespace pyadapt {
namespace {

using namespace pyadapt::cpu;

struct Tile {
  int64_t w, i0, j0, bm, bn;
};

std::vector<at::Tensor> fold_weights_cpu(at::TensorList weights, at::TensorList lefts,
                                         at::TensorList rights, const at::Tensor& scales_) {
  at::NoGradGuard no_grad;  // ATen calls on inputs that may require grad
  const int64_t n = int64_t(weights.size());
  TORCH_CHECK(int64_t(lefts.size()) == n && int64_t(rights.size()) == n && scales_.numel() == n,
              "fold_weights (cpu backend): expected as many lefts, rights and scales as weights");
  at::Tensor scales = scales_.to(at::kDouble).contiguous();
  const double* sp = scales.data_ptr<double>();
  std::vector<at::Tensor> acc(n), L(n), R(n);
  std::vector<Tile> tiles;
  for (int64_t w = 0; w < n; ++w) {
    const at::Tensor& W = weights[w];
    TORCH_CHECK(W.device().is_cpu() && W.dim() == 2, "fold_weights (cpu backend): weights[", w,
                "] must be a 2-D CPU tensor");
    check_storage(W.scalar_type(), "fold_weights");
    const auto at_ = W.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    acc[w] = W.to(at_, /*non_blocking=*/false, /*copy=*/true).contiguous();
    L[w] = lefts[w].to(at_).contiguous();
    R[w] = rights[w].to(at_).contiguous();
    TORCH_CHECK(L[w].dim() == 2 && R[w].dim() == 2 && L[w].size(0) == W.size(0) &&
                    R[w].size(1) == W.size(1) && L[w].size(1) == R[w].size(0),
                "fold_weights (cpu backend): shapes of lefts[", w, "] / rights[", w,
                "] do not match weights[", w, "]");
    const TileShape ts = tile_shape(W.size(0), W.size(1));
    for (int64_t i0 = 0; i0 < W.size(0); i0 += ts.rows)
      for (int64_t j0 = 0; j0 < W.size(1); j0 += ts.cols)
        tiles.push_back({w, i0, j0, std::min(ts.rows, W.size(0) - i0),
                         std::min(ts.cols, W.size(1) - j0)});
  }
  // Tiles of different weights cost very different amounts (a bias column against a 768 x 3072
  // block): a static split of the list can hand one thread all the heavy ones. Workers take the
  // next tile from a shared counter instead, heaviest first. Which thread runs a tile does not
  // change its result (one single-threaded BLAS call), so the fold stays deterministic.
  auto cost = [&](const Tile& t) { return t.bm * t.bn * L[t.w].size(1); };
  std::stable_sort(tiles.begin(), tiles.end(),
                   [&](const Tile& a, const Tile& b) { return cost(a) > cost(b); });
  std::atomic<int64_t> next{0};
  const int64_t ntiles = int64_t(tiles.size());
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntiles));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    at::NoGradGuard no_grad;  // grad mode is thread-local: not inherited by worker threads
    for (int64_t t = next++; t < ntiles; t = next++) {
      const Tile& tl = tiles[t];
      at::Tensor o = acc[tl.w].narrow(0, tl.i0, tl.bm).narrow(1, tl.j0, tl.bn);
      at::addmm_out(o, o, L[tl.w].narrow(0, tl.i0, tl.bm), R[tl.w].narrow(1, tl.j0, tl.bn), 1.0,
                    sp[tl.w]);
    }
  });
  std::vector<at::Tensor> out(n);
  for (int64_t w = 0; w < n; ++w) out[w] = acc[w].to(weights[w].scalar_type());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyadapt_C, m) {
  m.def("fold_weights(Tensor[] weights, Tensor[] lefts, Tensor[] rights, Tensor scales) "
        "-> Tensor[]");
}

TORCH_LIBRARY_IMPL(pyadapt_C, CPU, m) {
  m.impl("fold_weights", &fold_weights_cpu);
}

}  // namespace pyadapt
