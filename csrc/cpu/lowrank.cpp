// CPU kernels of the frozen linear + low-rank adapter op (pyadapt/ops/lowrank.py):
//   y = x W^T + b + scale * drop(core(x A^T)) B^T     (dropout before or after the core K)
// The frozen GEMM (M x d_out x d_in) dominates, so the work is arranged around it: one pass of
// gemm.h's GEMM per direction, the adapter riding in its epilogue or folded into its weight,
// and no M x d sized intermediate besides the outputs:
//   - forward, no dropout (and M large enough): the adapter folds into the weight,
//     W' = W + scale * B K^T A (d_out x d_in x r flops), and y = b + x W'^T is one GEMM;
//   - forward otherwise: p = drop(core(x A^T)) (M x r, a narrow GEMM), then the GEMM x W^T whose
//     epilogue adds b + p (scale B^T) to each finished row segment (LowRankEpi);
//   - backward: dx = g W' (folded) or g W with du A added in the epilogue; the rank-space
//     products g_p = scale g B, u = x A^T and the weight gradients dA = du^T x, dB = scale g^T p,
//     dK = u^T g_p are narrow GEMMs (an adapter's rank wide, read in place, not packed);
//     dW = g^T x and db only when asked for (the base is usually frozen).
// Every product sums in an order fixed by the shapes: bit-identical across runs and thread
// counts. bf16/fp16 storage computes in float32 and rounds once (the Python glue casts).
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

// alpha * q (r x n) as a contiguous r x round_up(n, width) matrix with zero columns, so the
// epilogue can read whole vectors of any of its rows at any tile column.
at::Tensor padded_rows(const at::Tensor& q, double alpha, int64_t width) {
  const int64_t n = q.size(1);
  at::Tensor out = at::zeros({q.size(0), round_up(std::max<int64_t>(n, 1), width)}, q.options());
  out.narrow(1, 0, n).copy_(q).mul_(alpha);
  return out;
}

at::Tensor padded_vector(const at::Tensor& v, int64_t width) {
  if (!v.defined()) return v;
  return padded_rows(v.view({1, -1}), 1.0, width).view(-1);
}

// The epilogue that puts the adapter into the frozen GEMM: out[i, j] = acc + bias[j] +
// sum_t P[i, t] Q[t, j], Q = scale B^T (or A), padded to whole vectors. r FMAs per element
// (a few percent of the GEMM's d_in) instead of a pass over the M x d_out output.
template <typename T>
struct LowRankEpi {
  T* out;
  int64_t ldo, n;
  const T* bias;  // padded, or null
  const T* P;
  int64_t ldp, rank;
  const T* Q;
  int64_t ldq;

  template <typename VA>
  void operator()(int64_t i, int64_t j, const VA& v) const {
    using G = GemmVec<T>;
    using V = typename G::V;
    using U = typename G::U;
    constexpr int NV = int(sizeof(VA) / sizeof(V));
    V r[NV];
    for (int k = 0; k < NV; ++k) {
      r[k] = v[k];
      if (bias) r[k] += *reinterpret_cast<const U*>(bias + j + k * G::L);
    }
    const T* p = P + i * ldp;
    for (int64_t t = 0; t < rank; ++t) {
      const T c = p[t];
      const T* q = Q + t * ldq + j;
      for (int k = 0; k < NV; ++k) r[k] += *reinterpret_cast<const U*>(q + k * G::L) * c;
    }
    const int64_t cols = std::min<int64_t>(NV * G::L, n - j);
    T* o = out + i * ldo + j;
    if (cols == NV * G::L) {
      for (int k = 0; k < NV; ++k) *reinterpret_cast<U*>(o + k * G::L) = r[k];
    } else {
      alignas(64) T buf[NV * G::L];
      std::memcpy(buf, r, sizeof(buf));
      std::copy(buf, buf + cols, o);
    }
  }
};

// out (M x n) = a @ b + bias + P Q, Q given as a padded r x n' matrix (padded_rows).
at::Tensor gemm_lowrank(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias_padded,
                        const at::Tensor& P, const at::Tensor& Q) {
  const int64_t M = a.size(0), n = b.size(1), K = a.size(1);
  at::Tensor out = at::empty({M, n}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "gemm_lowrank", [&] {
    using T = scalar_t;
    LowRankEpi<T> epi{out.data_ptr<T>(), n, n,
                      bias_padded.defined() ? bias_padded.data_ptr<T>() : nullptr,
                      P.data_ptr<T>(), P.stride(0), P.size(1), Q.data_ptr<T>(), Q.stride(0)};
    gemm<T>(M, n, K, view_of<T>(a), view_of<T>(b), epi);
  });
  return out;
}

// Column padding the epilogue may read past n: the widest micro-tile.
template <typename T>
constexpr int64_t epi_width() { return 4 * GemmVec<T>::L; }

int64_t epi_width_of(at::ScalarType t) {
  return t == at::kDouble ? epi_width<double>() : epi_width<float>();
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

// The rank-space input of B: p = drop(core(x A^T)) (dropout before or after the core).
at::Tensor rank_input(const Inputs& in, uint64_t sd, double p_drop, bool after_core) {
  at::Tensor u = det_mm(in.x, in.A.t());  // (M x r1)
  if (p_drop > 0.0 && !after_core) apply_dropout(u, sd, p_drop);
  at::Tensor p = in.K.defined() ? det_mm(u, in.K) : u;  // (M x r2)
  if (p_drop > 0.0 && after_core) apply_dropout(p, sd, p_drop);
  return p;
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
  at::Tensor p = rank_input(in, sd, dropout_p, dropout_after_core);
  const int64_t w = epi_width_of(in.ct);
  return gemm_lowrank(in.x, in.W.t(), padded_vector(in.b, w), p,
                      padded_rows(in.B.t(), scale, w));
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
  at::Tensor u_in;
  if (need_B || need_K) {
    u_in = det_mm(in.x, in.A.t());
    if (drop && !dropout_after_core) apply_dropout(u_in, sd, dropout_p);
  }
  if (need_B) {
    at::Tensor p = has_core ? det_mm(u_in, in.K) : u_in;
    if (drop && dropout_after_core) {
      if (!has_core) p = p.clone();  // u_in stays unmasked for dK (there is no core: unused)
      apply_dropout(p, sd, dropout_p);
    }
    out[5] = det_mm(g.t(), p, scale);  // dB = scale g^T p
  }
  // g_p = scale g B; masked when the dropout follows the core; du = g_p K^T, masked when it
  // precedes it.
  at::Tensor du;
  if (need_K || need_A || (need_x && !fold_dx)) {
    at::Tensor g_p = det_mm(g, in.B, scale);
    if (drop && dropout_after_core) apply_dropout(g_p, sd, dropout_p);
    if (need_K) out[4] = det_mm(u_in.t(), g_p);  // dK = u_in^T g_p
    du = has_core ? det_mm(g_p, in.K.t()) : g_p;
    if (drop && !dropout_after_core) apply_dropout(du, sd, dropout_p);
  }
  if (need_A) out[3] = det_mm(du.t(), in.x);  // dA = du^T x
  if (need_x) {
    if (fold_dx)
      out[0] = det_mm(g, folded_weight(in.W, in.A, in.K, in.B, scale));  // dx = g W'
    else  // dx = g W + du A, the adapter term in the GEMM's epilogue
      out[0] = gemm_lowrank(g, in.W, at::Tensor(), du,
                            padded_rows(in.A, 1.0, epi_width_of(in.ct)));
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
