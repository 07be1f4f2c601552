// CPU kernel of the grouped fold (pyadapt/ops/fold.py): W'_i = W_i + s_i L_i R_i for many
// weights of different shapes. Each weight is copied once into its accumulation dtype (float32,
// float64 for float64 weights), and all the products of a dtype run as one gemm_group (gemm.h):
// one parallel region packs every R_i, one computes every output tile, heaviest tiles first,
// each written once as W + s * (L R) from the registers. Summation orders depend on the shapes
// only, so the result does not depend on the thread count; the accumulator is rounded once to
// the weight's dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "linear_common.h"

namespace pyadapt {
namespace {

using namespace pyadapt::cpu;

// acc[w] += scales[w] * L[w] @ R[w] for the listed w, all of compute type T, in one group.
template <typename T>
void fold_group(const std::vector<int64_t>& ws, std::vector<at::Tensor>& acc,
                const std::vector<at::Tensor>& L, const std::vector<at::Tensor>& R,
                const double* scales) {
  std::vector<GemmArgs<T>> args;
  std::vector<StoreEpi<T, T>> epis;
  for (int64_t w : ws) {
    const int64_t m = acc[w].size(0), n = acc[w].size(1);
    args.push_back({m, n, L[w].size(1), view_of<T>(L[w]), view_of<T>(R[w])});
    T* o = acc[w].data_ptr<T>();
    epis.push_back(StoreEpi<T, T>{o, n, n, T(scales[w]), T(1), o, n});
  }
  gemm_group<T>(args, epis);
}

std::vector<at::Tensor> fold_weights_cpu(at::TensorList weights, at::TensorList lefts,
                                         at::TensorList rights, const at::Tensor& scales_) {
  at::NoGradGuard no_grad;  // ATen calls on inputs that may require grad
  const int64_t n = int64_t(weights.size());
  TORCH_CHECK(int64_t(lefts.size()) == n && int64_t(rights.size()) == n && scales_.numel() == n,
              "fold_weights (cpu backend): expected as many lefts, rights and scales as weights");
  at::Tensor scales = scales_.to(at::kDouble).contiguous();
  const double* sp = scales.data_ptr<double>();
  std::vector<at::Tensor> acc(n), L(n), R(n);
  std::vector<int64_t> in_float, in_double;
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
    (at_ == at::kDouble ? in_double : in_float).push_back(w);
  }
  if (!in_float.empty()) fold_group<float>(in_float, acc, L, R, sp);
  if (!in_double.empty()) fold_group<double>(in_double, acc, L, R, sp);
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
