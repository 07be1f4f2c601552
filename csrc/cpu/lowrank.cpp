// CPU kernels of the frozen linear + low-rank adapter op (pyadapt/ops/lowrank.py):
//   y = x W^T + b + scale * drop(core(x A^T)) B^T     (dropout before or after the core K)
// The frozen GEMM (M x d_out x d_in) dominates, so the win is in running fewer and larger GEMM
// passes, not in fusing elementwise work:
//   - without dropout the adapter folds into the weight, W' = W + scale * B K^T A (d_out x d_in
//     x r flops, small next to M x d_out x d_in once M is large), and the forward is one GEMM
//     y = b + x W'^T; the backward's dx = g W + du A is one GEMM dx = g W';
//   - with dropout (or a small M, where folding costs more than it saves) x is read once for
//     [z | u] = x [W; A]^T + [b; 0], and y = z + scale * p B^T;
//   - the backward reads g once for dx's GEMM and the rank-space g B: g [W' | scale B].
// The weight gradients are skinny products over the rows (dA = du^T x, dB = scale g^T p, dK =
// u^T g_p); dW and db are computed only when asked for (the base is usually frozen).
// Every GEMM is a tiled_gemm (linear_common.h): bit-identical across runs and thread counts.
// bf16/fp16 storage computes in float32 and rounds once (the Python glue casts the results).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "linear_common.h"

namespace pyadapt {
namespace {

using namespace pyadapt::cpu;

// Whether folding the adapter into the weight costs fewer flops than applying it to M rows.
bool fold_pays(int64_t M, int64_t d_in, int64_t d_out, int64_t r1, int64_t r2, bool core) {
  const double fold = double(d_out) * r1 * d_in + (core ? double(d_out) * r1 * r2 : 0.0);
  const double apply = double(M) * (double(r1) * d_in + double(r2) * d_out +
                                    (core ? double(r1) * r2 : 0.0));
  return fold <= apply;
}

// W' = W + scale * (B K^T) A (d_out x d_in), in the compute dtype.
at::Tensor folded_weight(const at::Tensor& W, const at::Tensor& A, const at::Tensor& K,
                         const at::Tensor& B, double scale) {
  at::Tensor left = K.defined() ? det_mm(B, K.t()) : B;  // (d_out x r1)
  at::Tensor Wf = W.clone();
  det_addmm_(Wf, left, A, scale);
  return Wf;
}

struct Inputs {
  at::ScalarType ct;
  at::Tensor x, W, b, A, K, B;
  int64_t M, d_in, d_out, r1, r2;
};

Inputs prepare(const at::Tensor& x, const at::Tensor& W, const c10::optional<at::Tensor>& b,
               const at::Tensor& A, const c10::optional<at::Tensor>& K, const at::Tensor& B) {
  TORCH_CHECK(x.device().is_cpu(), "lowrank (cpu backend): expected CPU tensors");
  TORCH_CHECK(x.dim() == 2 && W.dim() == 2 && A.dim() == 2 && B.dim() == 2,
              "lowrank (cpu backend): x, weight, down and up must be 2-D");
  check_storage(x.scalar_type(), "lowrank");
  Inputs in;
  in.ct = compute_type(x.scalar_type());
  in.x = in_compute(x, in.ct);
  in.W = in_compute(W, in.ct);
  in.b = opt_in_compute(b, in.ct);
  in.A = in_compute(A, in.ct);
  in.K = opt_in_compute(K, in.ct);
  in.B = in_compute(B, in.ct);
  in.M = x.size(0);
  in.d_in = x.size(1);
  in.d_out = W.size(0);
  in.r1 = A.size(0);
  in.r2 = in.K.defined() ? in.K.size(1) : in.r1;
  return in;
}

at::Tensor lowrank_forward_cpu(const at::Tensor& x_, const at::Tensor& W_,
                               const c10::optional<at::Tensor>& b_, const at::Tensor& A_,
                               const c10::optional<at::Tensor>& K_, const at::Tensor& B_,
                               double scale, const c10::optional<at::Tensor>& seed,
                               double dropout_p, bool dropout_after_core) {
  at::NoGradGuard no_grad;  // ATen calls on inputs that may require grad
  Inputs in = prepare(x_, W_, b_, A_, K_, B_);
  const uint64_t sd = seed_value(seed, dropout_p, "lowrank");
  if (in.M == 0) return at::empty({0, in.d_out}, in.x.options());
  if (dropout_p == 0.0 && fold_pays(in.M, in.d_in, in.d_out, in.r1, in.r2, in.K.defined())) {
    at::Tensor Wf = folded_weight(in.W, in.A, in.K, in.B, scale);
    return det_linear(in.x, Wf.t(), in.b);
  }
  // x is read once for the base and the rank-space input: [z | u] = x [W; A]^T + [b; 0].
  at::Tensor bext;
  if (in.b.defined()) bext = at::cat({in.b, at::zeros({in.r1}, in.b.options())});
  at::Tensor joint = det_linear(in.x, at::cat({in.W, in.A}, 0).t(), bext);
  at::Tensor u = joint.narrow(1, in.d_out, in.r1).contiguous();  // (M x r1)
  if (dropout_p > 0.0 && !dropout_after_core) apply_dropout(u, sd, dropout_p);
  at::Tensor p = in.K.defined() ? det_mm(u, in.K) : u;  // (M x r2)
  if (dropout_p > 0.0 && dropout_after_core) apply_dropout(p, sd, dropout_p);
  at::Tensor y = at::empty({in.M, in.d_out}, in.x.options());
  tiled_gemm(y, p, in.B.t(), Init::Matrix, joint.narrow(1, 0, in.d_out), 1.0, scale);
  return y;
}

// [dx, dW, db, dA, dK, dB] in the compute dtype; an empty tensor where not needed or absent.
std::vector<at::Tensor> lowrank_backward_cpu(
    const at::Tensor& gy_, const at::Tensor& x_, const at::Tensor& W_,
    const c10::optional<at::Tensor>& b_, const at::Tensor& A_,
    const c10::optional<at::Tensor>& K_, const at::Tensor& B_, double scale,
    const c10::optional<at::Tensor>& seed, double dropout_p, bool dropout_after_core,
    c10::List<bool> needs) {
  at::NoGradGuard no_grad;  // ATen calls on inputs that may require grad
  TORCH_CHECK(needs.size() == 6, "lowrank_backward: needs must have 6 entries");
  Inputs in = prepare(x_, W_, b_, A_, K_, B_);
  const uint64_t sd = seed_value(seed, dropout_p, "lowrank");
  const bool drop = dropout_p > 0.0;
  const bool has_core = in.K.defined();
  const bool need_x = needs[0], need_W = needs[1], need_b = needs[2] && in.b.defined(),
             need_A = needs[3], need_K = needs[4] && has_core, need_B = needs[5];
  at::Tensor g = in_compute(gy_, in.ct);
  at::Tensor empty = at::empty({0}, in.x.options());
  std::vector<at::Tensor> out(6, empty);
  const bool fold_dx = need_x && !drop &&
                       fold_pays(in.M, in.d_in, in.d_out, in.r1, in.r2, has_core);

  // Rank-space activations: u = x A^T (dropped when before the core), p = u K (dropped after).
  at::Tensor u_in, p;
  if (need_B || need_K) {
    u_in = det_mm(in.x, in.A.t());
    if (drop && !dropout_after_core) apply_dropout(u_in, sd, dropout_p);
    if (need_B) {
      p = has_core ? det_mm(u_in, in.K) : u_in.clone();
      if (drop && dropout_after_core) apply_dropout(p, sd, dropout_p);
    }
  }
  if (need_B) out[5] = det_mm(g.t(), p, scale);  // dB = scale g^T p

  // g_p = scale g B. With dx, g is read once: [g W' | g_p] = g [W' | scale B], W' the folded
  // weight (dx = g W'), or W (dx = g W + du A).
  const bool need_gp = need_K || need_A || (need_x && !fold_dx);
  at::Tensor g_p, gw;
  if (need_x) {
    at::Tensor w = fold_dx ? folded_weight(in.W, in.A, in.K, in.B, scale) : in.W;
    at::Tensor joint = det_mm(g, need_gp ? at::cat({w, in.B * scale}, 1) : w);
    gw = joint.narrow(1, 0, in.d_in);
    if (need_gp) g_p = joint.narrow(1, in.d_in, in.r2).contiguous();
  } else if (need_gp) {
    g_p = det_mm(g, in.B, scale);
  }
  // g_p masked when the dropout follows the core; du = g_p K^T, masked when it precedes it.
  at::Tensor du;
  if (need_gp) {
    if (drop && dropout_after_core) apply_dropout(g_p, sd, dropout_p);
    if (need_K) out[4] = det_mm(u_in.t(), g_p);  // dK = u_in^T g_p
    du = has_core ? det_mm(g_p, in.K.t()) : g_p;
    if (drop && !dropout_after_core) apply_dropout(du, sd, dropout_p);
  }
  if (need_A) out[3] = det_mm(du.t(), in.x);  // dA = du^T x
  if (need_x) {
    if (fold_dx) {
      out[0] = gw.contiguous();  // dx = g W'
    } else {
      at::Tensor dx = at::empty({in.M, in.d_in}, in.x.options());
      tiled_gemm(dx, du, in.A, Init::Matrix, gw, 1.0, 1.0);  // dx = g W + du A
      out[0] = dx;
    }
  }
  if (need_W) out[1] = det_mm(g.t(), in.x);
  if (need_b) out[2] = column_sum(g);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyadapt_C, m) {
  m.def("lowrank_forward(Tensor x, Tensor weight, Tensor? bias, Tensor down, Tensor? core, "
        "Tensor up, float scale, Tensor? seed, float dropout_p, bool dropout_after_core) "
        "-> Tensor");
  m.def("lowrank_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias, Tensor down, "
        "Tensor? core, Tensor up, float scale, Tensor? seed, float dropout_p, "
        "bool dropout_after_core, bool[] needs) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(pyadapt_C, CPU, m) {
  m.impl("lowrank_forward", &lowrank_forward_cpu);
  m.impl("lowrank_backward", &lowrank_backward_cpu);
}

}  // namespace pyadapt
