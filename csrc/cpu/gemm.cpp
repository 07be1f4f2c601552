// The deterministic GEMM of gemm.h as an op of its own, torch.ops.pyadapt_C.gemm_into: the kernels
// built on it (lowrank, radapter, fold, bottleneck) reach its paths only through their own
// shapes, so tests/test_gemm_cpu.py drives it directly at every tile edge, operand layout and
// epilogue. Not part of the public API.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "linear_common.h"

namespace pyadapt {
namespace {

using namespace pyadapt::cpu;

// out = beta * init + alpha * a @ b, init: None, a bias row (1-D, n) or a matrix (out itself
// allowed). blas_for_small: take tiled_gemm's BLAS path for small products (as the kernels do);
// false always runs gemm.h.
void gemm_into_cpu(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                   const c10::optional<at::Tensor>& init, double alpha, double beta,
                   bool blas_for_small) {
  TORCH_CHECK(out.dim() == 2 && a.dim() == 2 && b.dim() == 2, "gemm_into: expected matrices");
  TORCH_CHECK(a.size(0) == out.size(0) && b.size(1) == out.size(1) && a.size(1) == b.size(0),
              "gemm_into: shapes ", a.sizes(), " @ ", b.sizes(), " -> ", out.sizes());
  TORCH_CHECK(out.scalar_type() == a.scalar_type() && a.scalar_type() == b.scalar_type() &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble),
              "gemm_into: expected float32 or float64 operands of one dtype");
  Init how = Init::None;
  at::Tensor it;
  if (init.has_value() && init->defined()) {
    it = *init;
    TORCH_CHECK(it.scalar_type() == out.scalar_type(), "gemm_into: init dtype");
    how = it.dim() == 1 ? Init::Row : Init::Matrix;
  }
  if (blas_for_small) {
    tiled_gemm(out, a, b, how, it, beta, alpha);
    return;
  }
  if (out.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "gemm_into", [&] {
    gemm_into<scalar_t>(out, a, b, how, it, beta, alpha);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyadapt_C, m) {
  m.def("gemm_into(Tensor(a!) out, Tensor a, Tensor b, Tensor? init, float alpha, float beta, "
        "bool blas_for_small) -> ()");
}

TORCH_LIBRARY_IMPL(pyadapt_C, CPU, m) {
  m.impl("gemm_into", &gemm_into_cpu);
}

}  // namespace pyadapt
