// CPU kernels of the R-Adapter op (pyadapt/ops/radapter.py):
//   y = z + scale * row_scale * q,   z = x W_o^T + b_o,   q = z W_f^T  or  (z W_d^T) W_u^T
// The adapter is linear, so without per-row scales it folds into the frozen weight, as the
// Triton backend does: W_k = (I + c W_f) W_o, b_k = (I + c W_f) b_o (W_f = W_u W_d in the
// low-rank form), and the forward is one GEMM y = b_k + x W_k^T. Folding costs d_out^2 d_in
// (full) or 2 r d_out d_in (low rank) flops against M d_out^2 (2 M r d_out) to apply the adapter
// to the rows, so it runs when d_in <= M. The backward's dx = (g + c g W_f) W_o is then one GEMM
// dx = g W_k. Per-row scales (adapter dropping) cannot fold into one weight: z and q are
// computed and mixed row by row. The adapter's weight gradients and dscale share one product
// over the rows: P = (row_scale g)^T z (full) or (row_scale g)^T t with t = z W_d^T; dW_f (dW_u)
// = c P and dscale = <P, W_f> (<P, W_u>), so q is never formed in the backward; in the
// low-rank form z is not either (t and dW_d come from x through the small W_d W_o, W_d b_o),
// which leaves dx as the backward's only large GEMM.
// Adapter dropping zeroes whole samples (row_scale 0; p = 0.2 in the shipped runs): a dropped
// row's output is z and its adapter gradient is zero, so the adapter's products (q, P and
// g_row W_f) run on the kept rows only, gathered into compact matrices.
// Every GEMM is gemm.h's (through tiled_gemm): bit-identical across runs and thread counts.
// bf16/fp16 storage computes in float32 and rounds once (the Python glue casts the results).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "linear_common.h"

namespace pyadapt {
namespace {

using namespace pyadapt::cpu;

struct Inputs {
  at::ScalarType ct;
  at::Tensor x, Wo, bo, Wf, Wd, Wu, rs;
  int64_t M, d_in, d_out;
  bool full;
};

Inputs prepare(const at::Tensor& x, const at::Tensor& Wo, const c10::optional<at::Tensor>& bo,
               const c10::optional<at::Tensor>& Wf, const c10::optional<at::Tensor>& Wd,
               const c10::optional<at::Tensor>& Wu, const c10::optional<at::Tensor>& rs) {
  TORCH_CHECK(x.device().is_cpu(), "radapter (cpu backend): expected CPU tensors");
  TORCH_CHECK(x.dim() == 2 && Wo.dim() == 2, "radapter (cpu backend): x, base_weight must be 2-D");
  check_storage(x.scalar_type(), "radapter");
  Inputs in;
  in.ct = compute_type(x.scalar_type());
  in.x = in_compute(x, in.ct);
  in.Wo = in_compute(Wo, in.ct);
  in.bo = opt_in_compute(bo, in.ct);
  in.Wf = opt_in_compute(Wf, in.ct);
  in.Wd = opt_in_compute(Wd, in.ct);
  in.Wu = opt_in_compute(Wu, in.ct);
  in.rs = opt_in_compute(rs, in.ct);
  in.full = in.Wf.defined();
  TORCH_CHECK(in.full || (in.Wd.defined() && in.Wu.defined()),
              "radapter (cpu backend): give full_weight, or down_weight and up_weight");
  in.M = x.size(0);
  in.d_in = x.size(1);
  in.d_out = Wo.size(0);
  return in;
}

bool fold_pays(const Inputs& in) { return in.d_in <= in.M; }

// The rows whose adapter output is kept (row_scale != 0), as an int64 index tensor; undefined
// when every row is kept (or there is no row_scale): then the products run on all rows.
at::Tensor kept_rows(const Inputs& in) {
  if (!in.rs.defined()) return at::Tensor();
  at::Tensor kept = in.rs.ne(0).nonzero().view(-1);
  return kept.size(0) == in.M ? at::Tensor() : kept;
}

// t's kept rows (t itself when all are kept).
at::Tensor kept_part(const at::Tensor& t, const at::Tensor& kept) {
  return kept.defined() ? t.index_select(0, kept) : t;
}

// out = v + c W_f v for a (d_out x n) matrix v, with W_f = W_u W_d in the low-rank form.
at::Tensor apply_adapter_to_columns(const Inputs& in, const at::Tensor& v, double c) {
  at::Tensor out = at::empty_like(v);
  if (in.full) {
    tiled_gemm(out, in.Wf, v, Init::Matrix, v, 1.0, c);
  } else {
    at::Tensor t = det_mm(in.Wd, v);  // (r x n)
    tiled_gemm(out, in.Wu, t, Init::Matrix, v, 1.0, c);
  }
  return out;
}

// W_k = (I + c W_f) W_o and b_k = (I + c W_f) b_o (undefined without b_o).
std::pair<at::Tensor, at::Tensor> folded(const Inputs& in, double c) {
  at::Tensor Wk = apply_adapter_to_columns(in, in.Wo, c);
  at::Tensor bk;
  if (in.bo.defined()) bk = apply_adapter_to_columns(in, in.bo.view({in.d_out, 1}), c).view(-1);
  return {Wk, bk};
}

at::Tensor radapter_forward_cpu(const at::Tensor& x_, const at::Tensor& Wo_,
                                const c10::optional<at::Tensor>& bo_,
                                const c10::optional<at::Tensor>& Wf_,
                                const c10::optional<at::Tensor>& Wd_,
                                const c10::optional<at::Tensor>& Wu_, double c,
                                const c10::optional<at::Tensor>& rs_) {
  at::NoGradGuard no_grad;  // ATen calls on inputs that may require grad
  Inputs in = prepare(x_, Wo_, bo_, Wf_, Wd_, Wu_, rs_);
  if (in.M == 0) return at::empty({0, in.d_out}, in.x.options());
  if (!in.rs.defined() && fold_pays(in)) {
    auto [Wk, bk] = folded(in, c);
    return det_linear(in.x, Wk.t(), bk);
  }
  at::Tensor z = det_linear(in.x, in.Wo.t(), in.bo);
  at::Tensor t = in.full ? z : det_mm(z, in.Wd.t());  // what the last adapter matrix multiplies
  const at::Tensor& last = in.full ? in.Wf : in.Wu;
  at::Tensor y = at::empty_like(z);
  if (!in.rs.defined()) {
    tiled_gemm(y, t, last.t(), Init::Matrix, z, 1.0, c);  // y = z + c q
    return y;
  }
  const at::Tensor kept = kept_rows(in);
  if (kept.defined() && kept.size(0) == 0) return z;  // every row dropped: y = z
  at::Tensor q = det_mm(kept_part(t, kept), last.t());
  scale_rows(q, kept_part(in.rs, kept) * c);
  return kept.defined() ? z.index_add_(0, kept, q) : z.add_(q);
}

// Training forward of the full-rank form: y, and z and q (compute dtype) for the backward,
// which then needs neither to recompute z nor to form P = g^T z in double for dscale
// (dscale = sum(row_scale g * q), summed in double). The unfolded forward costs what the folded
// one does near M = d_in (two products of M d_out^2 against d_out^2 d_in + M d_out d_in) and
// keeps what eager autograd keeps. The low-rank form returns y and empty tensors (its backward
// never forms z).
std::vector<at::Tensor> radapter_forward_saving_cpu(
    const at::Tensor& x_, const at::Tensor& Wo_, const c10::optional<at::Tensor>& bo_,
    const c10::optional<at::Tensor>& Wf_, const c10::optional<at::Tensor>& Wd_,
    const c10::optional<at::Tensor>& Wu_, double c, const c10::optional<at::Tensor>& rs_) {
  at::NoGradGuard no_grad;
  Inputs in = prepare(x_, Wo_, bo_, Wf_, Wd_, Wu_, rs_);
  at::Tensor empty = at::empty({0}, in.x.options());
  if (!in.full) return {radapter_forward_cpu(x_, Wo_, bo_, Wf_, Wd_, Wu_, c, rs_), empty, empty};
  if (in.M == 0) {
    at::Tensor e = at::empty({0, in.d_out}, in.x.options());
    return {e, e.clone(), e.clone()};
  }
  at::Tensor z = det_linear(in.x, in.Wo.t(), in.bo);
  if (!in.rs.defined()) {
    at::Tensor q = det_mm(z, in.Wf.t());
    return {z.add(q, c), z, q};
  }
  // q of the kept rows; a dropped row's q stays zero (the backward reads only kept rows)
  const at::Tensor kept = kept_rows(in);
  at::Tensor q_kept = det_mm(kept_part(z, kept), in.Wf.t());
  at::Tensor cq = q_kept.clone();
  scale_rows(cq, kept_part(in.rs, kept) * c);
  if (!kept.defined()) return {z.add(cq), z, q_kept};
  at::Tensor q = at::zeros_like(z).index_copy_(0, kept, q_kept);
  return {z.clone().index_add_(0, kept, cq), z, q};
}

// [dx, dW_o, db_o, dW_f, dW_d, dW_u, dscale] in the compute dtype; empty where not needed.
std::vector<at::Tensor> radapter_backward_cpu(
    const at::Tensor& gy_, const at::Tensor& x_, const at::Tensor& Wo_,
    const c10::optional<at::Tensor>& bo_, const c10::optional<at::Tensor>& Wf_,
    const c10::optional<at::Tensor>& Wd_, const c10::optional<at::Tensor>& Wu_, double c,
    const c10::optional<at::Tensor>& rs_, c10::List<bool> needs,
    const c10::optional<at::Tensor>& saved_z, const c10::optional<at::Tensor>& saved_q) {
  at::NoGradGuard no_grad;  // ATen calls on inputs that may require grad
  TORCH_CHECK(needs.size() == 7, "radapter_backward: needs must have 7 entries");
  Inputs in = prepare(x_, Wo_, bo_, Wf_, Wd_, Wu_, rs_);
  const bool need_x = needs[0], need_Wo = needs[1], need_bo = needs[2] && in.bo.defined(),
             need_Wf = needs[3] && in.full, need_Wd = needs[4] && !in.full,
             need_Wu = needs[5] && !in.full, need_scale = needs[6];
  at::Tensor g = in_compute(gy_, in.ct);
  at::Tensor empty = at::empty({0}, in.x.options());
  std::vector<at::Tensor> out(7, empty);
  // g_row = row_scale * g on the rows the adapter's products see: the kept rows (compact) in
  // the full-rank form, every row in the low-rank form (its products are r wide: no gain)
  const at::Tensor kept = in.full ? kept_rows(in) : at::Tensor();
  at::Tensor g_row = kept_part(g, kept);
  if (in.rs.defined()) {
    if (!kept.defined()) g_row = g.clone();
    scale_rows(g_row, kept_part(in.rs, kept));
  }
  const bool need_dz = need_Wo || need_bo || (need_x && (in.rs.defined() || !fold_pays(in)));

  // dscale = <P, W> sums d_out^2 (d_out r) terms that cancel: P's rounding error, amplified by
  // the cancellation, would dominate in float32, so P (and t) are computed in double for it.
  // With the saving forward's q, dscale = sum(g_row * q) is summed in double directly.
  const bool have_saved = in.full && saved_z.has_value() && saved_z->defined() &&
                          saved_q.has_value() && saved_q->defined();
  if (have_saved)
    TORCH_CHECK(saved_z->sizes() == g.sizes() && saved_q->sizes() == g.sizes() &&
                    saved_z->scalar_type() == in.ct && saved_q->scalar_type() == in.ct,
                "radapter_backward: saved_z and saved_q must be the saving forward's (M, d_out) ",
                in.ct, " tensors");
  auto wide = [&](const at::Tensor& t) {
    return need_scale && !have_saved ? t.to(at::kDouble) : t;
  };
  at::Tensor z;  // z of the kept rows
  if (in.full && (need_Wf || need_scale))
    z = have_saved ? kept_part(saved_z->contiguous(), kept)
                   : det_linear(kept_part(in.x, kept), in.Wo.t(), in.bo);
  at::Tensor dz;
  if (in.full) {
    if (have_saved && need_scale)
      out[6] = at::scalar_tensor(dot_all(g_row, kept_part(saved_q->contiguous(), kept)),
                                 in.x.options());
    if (need_Wf || (need_scale && !have_saved)) {
      at::Tensor P = det_mm(wide(g_row).t(), wide(z));  // (d_out x d_out)
      if (need_scale && !have_saved)
        out[6] = at::scalar_tensor(dot_all(P, in.Wf), in.x.options());
      if (need_Wf) out[3] = P.mul_(c).to(in.ct);
    }
    if (need_dz) {
      // dz = g + c g_row W_f on the kept rows; a dropped row's dz is g
      at::Tensor g_kept = kept_part(g, kept);
      at::Tensor dz_kept = at::empty_like(g_kept);
      tiled_gemm(dz_kept, g_row, in.Wf, Init::Matrix, g_kept, 1.0, c);
      dz = kept.defined() ? g.clone().index_copy_(0, kept, dz_kept) : dz_kept;
    }
  } else {
    // z = x W_o^T + b_o is never formed here: t = z W_d^T = x (W_d W_o)^T + W_d b_o and
    // dW_d = dt^T z = (dt^T x) W_o^T + (dt^T 1) b_o^T, so dx is the only large GEMM left.
    if (need_Wu || need_scale) {
      at::Tensor Wd = wide(in.Wd), tb;
      if (in.bo.defined()) tb = det_mm(Wd, wide(in.bo).view({in.d_out, 1})).view(-1);
      at::Tensor t = det_linear(wide(in.x), det_mm(Wd, wide(in.Wo)).t(), tb);  // (M x r)
      at::Tensor P = det_mm(wide(g_row).t(), t);  // (d_out x r)
      if (need_scale) out[6] = at::scalar_tensor(dot_all(P, in.Wu), in.x.options());
      if (need_Wu) out[5] = P.mul_(c).to(in.ct);
    }
    if (need_Wd || need_dz) {
      at::Tensor dt = det_mm(g_row, in.Wu, c);    // (M x r)
      if (need_Wd) {
        at::Tensor dWd = det_mm(det_mm(dt.t(), in.x), in.Wo.t());  // (dt^T x) W_o^T
        if (in.bo.defined())
          det_addmm_(dWd, column_sum(dt).view({-1, 1}), in.bo.view({1, in.d_out}), 1.0);
        out[4] = dWd;
      }
      if (need_dz) {
        dz = at::empty_like(g);
        tiled_gemm(dz, dt, in.Wd, Init::Matrix, g, 1.0, 1.0);  // dz = g + dt W_d
      }
    }
  }
  if (need_x) out[0] = dz.defined() ? det_mm(dz, in.Wo) : det_mm(g, folded(in, c).first);
  if (need_Wo) out[1] = det_mm(dz.t(), in.x);
  if (need_bo) out[2] = column_sum(dz);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyadapt_C, m) {
  m.def("radapter_forward(Tensor x, Tensor base_weight, Tensor? base_bias, Tensor? full_weight, "
        "Tensor? down_weight, Tensor? up_weight, float scale, Tensor? row_scale) -> Tensor");
  m.def("radapter_backward(Tensor grad_y, Tensor x, Tensor base_weight, Tensor? base_bias, "
        "Tensor? full_weight, Tensor? down_weight, Tensor? up_weight, float scale, "
        "Tensor? row_scale, bool[] needs, Tensor? saved_z=None, Tensor? saved_q=None) "
        "-> Tensor[]");
  m.def("radapter_forward_saving(Tensor x, Tensor base_weight, Tensor? base_bias, "
        "Tensor? full_weight, Tensor? down_weight, Tensor? up_weight, float scale, "
        "Tensor? row_scale) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(pyadapt_C, CPU, m) {
  m.impl("radapter_forward", &radapter_forward_cpu);
  m.impl("radapter_backward", &radapter_backward_cpu);
  m.impl("radapter_forward_saving", &radapter_forward_saving_cpu);
}

}  // namespace pyadapt
