// Torch-side glue of the CUDA backend: argument checks, the matrix products (cuBLAS through
// at::mm / at::addmm: tensor cores for bfloat16 / float16 with float32 accumulation) and the
// launches of the fused elementwise, reduction and tensor-core bottleneck kernels of kernels.h.
// Registered as torch.ops.pyadapt_cuda.* for the CUDA dispatch key;
// pyadapt/ops/_cuda_backend.py calls them.
// Compiled by the host compiler (no nvcc): only the .cu files need the CUDA compiler.
//
// Every op mirrors its reference in pyadapt/reference.py (the mathematics is documented there);
// the comments below say only how it is computed.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "kernels.h"

namespace pyadapt {
namespace cuda {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kDouble: return DType::F64;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default:
      TORCH_CHECK_TYPE(false, "x: expected float32, float64, float16 or bfloat16, got ",
                       t.scalar_type());
  }
}

at::ScalarType acc_type(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

Act parse_act(const std::string& name) {
  if (name == "relu") return Act::Relu;
  if (name == "gelu") return Act::Gelu;
  if (name == "quick_gelu") return Act::QuickGelu;
  if (name == "silu") return Act::Silu;
  if (name == "identity") return Act::Identity;
  TORCH_CHECK_VALUE(false, "activation: expected relu, gelu, quick_gelu, silu or identity, got ",
                    name);
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// A matrix (or vector when cols < 0) argument: on x's CUDA device, of x's dtype, of that shape.
// Returns it contiguous.
Tensor checked(const Tensor& t, const char* name, const Tensor& x, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), name, ": expected a tensor on ",
              x.device(), ", got one on ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, ": expected dtype ",
                   x.scalar_type(), ", got ", t.scalar_type());
  if (cols < 0) {
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == rows, name, ": expected shape (", rows,
                      ",), got ", t.sizes());
  } else {
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name,
                      ": expected shape (", rows, ", ", cols, "), got ", t.sizes());
  }
  return t.contiguous();
}

OptTensor checked(const OptTensor& t, const char* name, const Tensor& x, int64_t rows,
                  int64_t cols) {
  if (!t.has_value()) return std::nullopt;
  return checked(*t, name, x, rows, cols);
}

// The input x itself: a CUDA matrix of a supported dtype.
Tensor checked_input(const Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), name, ": expected a CUDA tensor, got one on ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 2, name, ": expected a 2-D (rows x features) tensor, got shape ",
                    x.sizes());
  dtype_of(x);
  return x.contiguous();
}

// The learnable scale: a single value, converted to x's dtype (the reference multiplies by
// scale.to(x.dtype)); read on the device by the kernels.
OptTensor checked_scale(const OptTensor& scale, const Tensor& x) {
  if (!scale.has_value()) return std::nullopt;
  TORCH_CHECK_VALUE(scale->numel() == 1, "scale: expected a single value, got shape ",
                    scale->sizes());
  TORCH_CHECK(scale->device() == x.device(), "scale: expected a tensor on ", x.device(),
              ", got one on ", scale->device());
  return scale->reshape({}).to(x.scalar_type()).contiguous();
}

// row_scale (M,) of any floating dtype, converted to x's dtype like the reference does.
OptTensor checked_row_scale(const OptTensor& row_scale, const Tensor& x) {
  if (!row_scale.has_value()) return std::nullopt;
  TORCH_CHECK(row_scale->device() == x.device(), "row_scale: expected a tensor on ", x.device(),
              ", got one on ", row_scale->device());
  TORCH_CHECK_VALUE(row_scale->dim() == 1 && row_scale->size(0) == x.size(0),
                    "row_scale: expected shape (", x.size(0), ",), got ", row_scale->sizes());
  return row_scale->to(x.scalar_type()).contiguous();
}

Dropout make_dropout(const OptTensor& seed, double p, const Tensor& x) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "dropout_p: expected a probability in [0, 1), got ", p);
  if (p == 0.0) return Dropout{nullptr, 0.0f, 1.0};
  TORCH_CHECK_TYPE(seed.has_value() && seed->scalar_type() == at::kLong && seed->numel() == 1,
                   "seed: expected a single-element int64 tensor when dropout_p > 0");
  TORCH_CHECK(seed->device() == x.device(), "seed: expected a tensor on ", x.device(),
              ", got one on ", seed->device());
  return Dropout{seed->data_ptr<int64_t>(), float(p), 1.0 / (1.0 - p)};
}

const Dropout kNoDropout{nullptr, 0.0f, 1.0};

const void* ptr(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }

// sum over rows of a (rows x cols), deterministically, returned in a's dtype.
Tensor col_sum_of(const Tensor& a) {
  const int64_t rows = a.size(0), cols = a.size(1);
  const auto acc = a.options().dtype(acc_type(a));
  Tensor work = at::empty({col_sum_workspace(rows, cols)}, acc);
  Tensor out = at::empty({cols}, acc);
  col_sum(dtype_of(a), a.data_ptr(), rows, cols, work.data_ptr(), out.data_ptr(), stream());
  check_launch();
  return out.to(a.scalar_type());
}

// sum_ij a_ij b_ij row_scale_i, deterministically, as a 0-dim tensor of the accumulation type.
Tensor weighted_dot_of(const Tensor& a, const Tensor& b, const OptTensor& row_scale) {
  const int64_t rows = a.size(0), cols = a.size(1);
  const auto acc = a.options().dtype(acc_type(a));
  Tensor work = at::empty({weighted_dot_workspace(rows, cols)}, acc);
  Tensor out = at::empty({}, acc);
  weighted_dot(dtype_of(a), a.data_ptr(), b.data_ptr(), ptr(row_scale), rows, cols,
               work.data_ptr(), out.data_ptr(), stream());
  check_launch();
  return out;
}

Tensor affine(const Tensor& x, const Tensor& w, const OptTensor& b) {
  return b.has_value() ? at::addmm(*b, x, w.t()) : at::mm(x, w.t());
}

// alpha * a @ b rounded once (cuBLAS scales in float32 before its single rounding).
Tensor scaled_mm(const Tensor& a, const Tensor& b, double alpha) {
  Tensor unused = at::empty({a.size(0), b.size(1)}, a.options());
  return at::addmm(unused, a, b, /*beta=*/0.0, /*alpha=*/alpha);  // beta 0: `unused` not read
}

void dropout_inplace(Tensor& t, const Dropout& drop) {
  if (drop.p <= 0.0f) return;
  bias_act_forward(dtype_of(t), t.data_ptr(), nullptr, nullptr, t.data_ptr(), t.size(0),
                   t.size(1), Act::Identity, drop, stream());
  check_launch();
}

Tensor empty_grad(const Tensor& x) { return at::empty({0}, x.options()); }

bool need(const c10::List<bool>& needs, size_t i) { return i < needs.size() && needs.get(i); }

// ---------------------------------------------------------------------------------------------
// bottleneck / MMA

struct BottleneckArgs {
  Tensor x, wd, wu;
  OptTensor bd, ws, bs, bu, scale, row_scale;
  int64_t m, d, r;
};

BottleneckArgs check_bottleneck(const Tensor& x_in, const Tensor& wd, const OptTensor& bd,
                                const OptTensor& ws, const OptTensor& bs, const Tensor& wu,
                                const OptTensor& bu, const OptTensor& scale,
                                const OptTensor& row_scale) {
  BottleneckArgs a;
  a.x = checked_input(x_in, "x");
  a.m = a.x.size(0);
  a.d = a.x.size(1);
  TORCH_CHECK_VALUE(wd.dim() == 2, "down_weight: expected shape (r, ", a.d, "), got ",
                    wd.sizes());
  a.r = wd.size(0);
  a.wd = checked(wd, "down_weight", a.x, a.r, a.d);
  a.wu = checked(wu, "up_weight", a.x, a.d, a.r);
  a.bd = checked(bd, "down_bias", a.x, a.r, -1);
  a.ws = checked(ws, "shared_weight", a.x, a.r, a.r);
  a.bs = checked(bs, "shared_bias", a.x, a.r, -1);
  TORCH_CHECK_VALUE(a.ws.has_value() || !a.bs.has_value(),
                    "shared_bias: given without shared_weight");
  a.bu = checked(bu, "up_bias", a.x, a.d, -1);
  a.scale = checked_scale(scale, a.x);
  a.row_scale = checked_row_scale(row_scale, a.x);
  return a;
}

// The fused tensor-core kernels (bottleneck_fused.cu) serve bfloat16 / float16 on sm_80 or newer
// when 1 <= r <= kFusedMaxRank, d is a multiple of 8 and the M x d operands are 16-byte aligned;
// everything else takes the cuBLAS path. PYADAPT_CUDA_FUSED=0 forces the cuBLAS path: read once,
// and again by the fused_from_env op (so that tests can switch).
bool fused_env() {
  const char* v = std::getenv("PYADAPT_CUDA_FUSED");
  return v == nullptr || std::string(v) != "0";
}

std::atomic<bool>& fused_switch() {
  static std::atomic<bool> on{fused_env()};
  return on;
}

bool fused_from_env() {
  fused_switch() = fused_env();
  return fused_switch();
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

bool fused_fits(const BottleneckArgs& a, std::initializer_list<const Tensor*> rows_of_d) {
  const at::ScalarType st = a.x.scalar_type();
  if (!fused_switch() || (st != at::kBFloat16 && st != at::kHalf)) return false;
  if (a.r < 1 || a.r > kFusedMaxRank || a.d == 0 || a.d % 8 != 0) return false;
  for (const Tensor* t : rows_of_d)
    if (t != nullptr && !aligned16(*t)) return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor,
                                        a.x.get_device()));
  return major >= 8;
}

// The weights as the fused kernels read them: 16-byte aligned, rows of W_s and W_u zero-padded
// to a multiple of 8 elements (copies only when a weight is not already so).
struct FusedWeights {
  Tensor wd, wu;
  OptTensor ws, bu;
  int64_t ld_rank;
};

Tensor aligned_copy(const Tensor& t) { return aligned16(t) ? t : t.clone(); }

Tensor padded_rows(const Tensor& t, int64_t cols) {
  return t.size(1) == cols ? aligned_copy(t) : at::constant_pad_nd(t, {0, cols - t.size(1)});
}

FusedWeights fused_weights(const BottleneckArgs& a) {
  FusedWeights w;
  w.ld_rank = (a.r + 7) / 8 * 8;
  w.wd = aligned_copy(a.wd);
  w.wu = padded_rows(a.wu, w.ld_rank);
  if (a.ws.has_value()) w.ws = padded_rows(*a.ws, w.ld_rank);
  if (a.bu.has_value()) w.bu = aligned_copy(*a.bu);
  return w;
}

FusedBottleneck fused_params(const BottleneckArgs& a, const FusedWeights& w, Act act,
                             const Dropout& drop, double scale_value) {
  FusedBottleneck p;
  p.W_d = w.wd.data_ptr();
  p.b_d = ptr(a.bd);
  p.W_s = ptr(w.ws);
  p.b_s = ptr(a.bs);
  p.W_u = w.wu.data_ptr();
  p.b_u = ptr(w.bu);
  p.scale = ptr(a.scale);
  p.scale_value = scale_value;
  p.row_scale = ptr(a.row_scale);
  p.rows = a.m;
  p.d = a.d;
  p.r = a.r;
  p.ld_rank = w.ld_rank;
  p.act = act;
  p.drop = drop;
  return p;
}

// a @ b for bfloat16 / float16 operands, accumulated and returned in float32 (zeros when the
// inner dimension is empty). aten::mm.dtype (cuBLAS with a float32 output) exists from torch 2.8
// on; looked up by name so that the module still builds against older torch (declared >= 2.5),
// which gets the product of float32 copies instead.
Tensor mm_float(const Tensor& a, const Tensor& b) {
  if (a.size(1) == 0) return at::zeros({a.size(0), b.size(1)}, a.options().dtype(at::kFloat));
  static const auto mm_dtype = c10::Dispatcher::singleton().findSchema({"aten::mm", "dtype"});
  if (mm_dtype.has_value())
    return mm_dtype->typed<Tensor(const Tensor&, const Tensor&, at::ScalarType)>().call(
        a, b, at::kFloat);
  return at::mm(a.to(at::kFloat), b.to(at::kFloat));
}

// hi + lo for a matrix whose columns [0, n) and [n, 2n) hold the hi and lo halves.
Tensor join_halves(const Tensor& t, int64_t dim, int64_t n) {
  return t.narrow(dim, 0, n) + t.narrow(dim, n, n);
}

// The backward on the fused kernels: the forward kernel recomputes the pre-activations (float32),
// the row kernel gives dx and the M x r inputs of the weight gradients at float32 accuracy
// (kernels.h), which are cuBLAS products with float32 results, rounded once, and fixed-order
// sums of per-strip partials. dW_u = s P with P = g^T h_in, h_in = row_scale * (the input of
// up): the row scales in an extra column of h_in make the same product give db_u = s P[:, r],
// and dscale = <b_u, P[:, r]> + sum_i <h_in_i, (g W_u)_i>; g_u = s * row_scale * g (M x d) is
// never formed.
std::vector<Tensor> bottleneck_backward_fused(const BottleneckArgs& a, const Tensor& g,
                                              bool has_residual, Act act, const Dropout& drop,
                                              double scale_value, bool grad_scale_invariant,
                                              const c10::List<bool>& needs) {
  const bool shared = a.ws.has_value();
  const bool want_dW_d = need(needs, 1);
  const bool want_db_d = need(needs, 2) && a.bd.has_value();
  const bool want_dW_s = shared && need(needs, 3);
  const bool want_db_s = need(needs, 4) && a.bs.has_value();
  const bool want_dbu = need(needs, 6) && a.bu.has_value();
  const bool want_dscale = need(needs, 7) && a.scale.has_value();
  const bool want_hin = need(needs, 5) || want_dbu || want_dscale;
  std::vector<Tensor> grads(8);
  for (auto& t : grads) t = empty_grad(a.x);
  if (!(need(needs, 0) || want_dW_d || want_db_d || want_dW_s || want_db_s || want_hin))
    return grads;

  const DType dt = dtype_of(a.x);
  const FusedWeights w = fused_weights(a);
  const FusedBottleneck p = fused_params(a, w, act, drop, scale_value);
  const auto f32 = a.x.options().dtype(at::kFloat);
  const int64_t strips = fused_bottleneck_strips(a.m);
  auto matrix = [&](bool want, int64_t rows, int64_t cols, const at::TensorOptions& opts) {
    return want ? at::empty({rows, cols}, opts) : Tensor();
  };
  auto raw = [](const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; };
  auto raw_f = [](const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
  const int64_t hin_cols = a.r + (want_dbu || (want_dscale && a.bu.has_value()) ? 1 : 0);
  const Tensor pre1 = at::empty({a.m, a.r}, f32), pre2 = matrix(shared, a.m, a.r, f32);
  const Tensor dx = matrix(need(needs, 0), a.m, a.d, a.x.options());
  const Tensor dpre1 = matrix(want_dW_d, a.m, 2 * a.r, a.x.options());
  const Tensor dpre2 = matrix(want_dW_s, a.m, a.r, f32), h1 = matrix(want_dW_s, a.m, a.r, f32);
  const Tensor hin = matrix(want_hin, a.m, 2 * hin_cols, a.x.options());
  const Tensor db_d = matrix(want_db_d, strips, a.r, f32);
  const Tensor db_s = matrix(want_db_s, strips, a.r, f32);
  const Tensor dscale = matrix(want_dscale, strips, 1, f32);
  if (a.m > 0) {
    fused_bottleneck_forward(dt, p, a.x.data_ptr(), nullptr, nullptr, pre1.data_ptr<float>(),
                             raw_f(pre2), stream());
    check_launch();
    FusedBackwardOut out;
    out.g = g.data_ptr();
    out.pre1 = pre1.data_ptr<float>();
    out.pre2 = raw_f(pre2);
    out.add_g = !has_residual;
    out.dx = raw(dx);
    out.dpre1 = raw(dpre1);
    out.dpre2 = raw_f(dpre2);
    out.h1 = raw_f(h1);
    out.hin = raw(hin);
    out.hin_cols = hin_cols;
    out.db_d = raw_f(db_d);
    out.db_s = raw_f(db_s);
    out.dscale = raw_f(dscale);
    fused_bottleneck_backward(dt, p, out, stream());
    check_launch();
  }

  // Parameter gradients from their float32 values, rounded once. Those of up carry s, which
  // grad_scale_invariant (MMA's gradient-scale layers) takes out again; under it the others are
  // divided by s.
  auto times_s = [&](const Tensor& t) {
    return a.scale.has_value() ? t * a.scale->to(at::kFloat) : t * scale_value;
  };
  auto over_s = [&](const Tensor& t) {
    return a.scale.has_value() ? t / a.scale->to(at::kFloat) : t / scale_value;
  };
  const at::ScalarType st = a.x.scalar_type();
  auto param = [&](const Tensor& t) { return (grad_scale_invariant ? over_s(t) : t).to(st); };
  auto up_param = [&](const Tensor& t) { return (grad_scale_invariant ? t : times_s(t)).to(st); };
  if (need(needs, 0)) grads[0] = dx;
  if (want_dW_d) grads[1] = param(join_halves(mm_float(dpre1.t(), a.x), 0, a.r));
  if (want_db_d) grads[2] = param(col_sum_of(db_d));
  if (want_dW_s) grads[3] = param(at::mm(dpre2.t(), h1));
  if (want_db_s) grads[4] = param(col_sum_of(db_s));
  if (want_hin) {
    const Tensor P = join_halves(mm_float(g.t(), hin), 1, hin_cols);  // (d, hin_cols)
    if (need(needs, 5)) grads[5] = up_param(P.narrow(1, 0, a.r));
    if (want_dbu) grads[6] = up_param(P.select(1, a.r));
    if (want_dscale) {
      Tensor total = col_sum_of(dscale).reshape({});
      if (a.bu.has_value()) {
        const Tensor bu_row = a.bu->to(at::kFloat).reshape({1, a.d});
        total = total + weighted_dot_of(bu_row, P.select(1, a.r).reshape({1, a.d}).contiguous(),
                                        std::nullopt);
      }
      grads[7] = grad_scale_invariant ? over_s(total) : total;
    }
  }
  return grads;
}

Tensor bottleneck_forward(const Tensor& x_in, const OptTensor& residual, const Tensor& wd,
                          const OptTensor& bd, const OptTensor& ws, const OptTensor& bs,
                          const Tensor& wu, const OptTensor& bu, const OptTensor& scale,
                          double scale_value, const OptTensor& row_scale, const OptTensor& seed,
                          std::string activation, double dropout_p) {
  BottleneckArgs a = check_bottleneck(x_in, wd, bd, ws, bs, wu, bu, scale, row_scale);
  c10::cuda::CUDAGuard guard(a.x.device());  // after the checks: x is a CUDA tensor
  const Act act = parse_act(activation);
  const Dropout drop = make_dropout(seed, dropout_p, a.x);
  const OptTensor res = checked(residual, "residual", a.x, a.m, a.d);
  const DType dt = dtype_of(a.x);
  if (fused_fits(a, {&a.x, res.has_value() ? &*res : nullptr})) {
    Tensor y = at::empty({a.m, a.d}, a.x.options());
    if (a.m > 0) {
      const FusedWeights w = fused_weights(a);
      fused_bottleneck_forward(dt, fused_params(a, w, act, drop, scale_value), a.x.data_ptr(),
                               ptr(res), y.data_ptr(), nullptr, nullptr, stream());
      check_launch();
    }
    return y;
  }

  Tensor pre = at::mm(a.x, a.wd.t());  // (M, r)
  Tensor h = at::empty_like(pre);
  if (a.ws.has_value()) {
    bias_act_forward(dt, pre.data_ptr(), ptr(a.bd), nullptr, h.data_ptr(), a.m, a.r, act,
                     kNoDropout, stream());
    check_launch();
    pre = at::mm(h, a.ws->t());
    bias_act_forward(dt, pre.data_ptr(), ptr(a.bs), nullptr, h.data_ptr(), a.m, a.r, act, drop,
                     stream());
  } else {
    bias_act_forward(dt, pre.data_ptr(), ptr(a.bd), nullptr, h.data_ptr(), a.m, a.r, act, drop,
                     stream());
  }
  check_launch();
  Tensor y = at::mm(h, a.wu.t());  // (M, d); the epilogue finishes it in place
  output_epilogue(dt, y.data_ptr(), ptr(a.bu), res.has_value() ? res->data_ptr() : a.x.data_ptr(),
                  ptr(a.scale), scale_value, ptr(a.row_scale), y.data_ptr(), a.m, a.d, stream());
  check_launch();
  return y;
}

// Gradients [dx, d down_w, d down_b, d shared_w, d shared_b, d up_w, d up_b, d scale]; an entry
// not asked for (needs) or of an absent input is an empty tensor.
std::vector<Tensor> bottleneck_backward(
    const Tensor& grad_y, const Tensor& x_in, bool has_residual, const Tensor& wd,
    const OptTensor& bd, const OptTensor& ws, const OptTensor& bs, const Tensor& wu,
    const OptTensor& bu, const OptTensor& scale, double scale_value, const OptTensor& row_scale,
    const OptTensor& seed, std::string activation, double dropout_p, bool grad_scale_invariant,
    c10::List<bool> needs) {
  BottleneckArgs a = check_bottleneck(x_in, wd, bd, ws, bs, wu, bu, scale, row_scale);
  c10::cuda::CUDAGuard guard(a.x.device());  // after the checks: x is a CUDA tensor
  const Act act = parse_act(activation);
  const Dropout drop = make_dropout(seed, dropout_p, a.x);
  const Tensor g = checked(grad_y, "grad_y", a.x, a.m, a.d);
  if (fused_fits(a, {&a.x, &g})) {
    return bottleneck_backward_fused(a, g, has_residual, act, drop, scale_value,
                                     grad_scale_invariant, needs);
  }
  const DType dt = dtype_of(a.x);
  const bool shared = a.ws.has_value();

  // Recompute the rank-space activations (cheaper than storing them: M x r per GEMM).
  Tensor pre1 = at::mm(a.x, a.wd.t());
  Tensor h1 = at::empty_like(pre1);
  bias_act_forward(dt, pre1.data_ptr(), ptr(a.bd), pre1.data_ptr(), h1.data_ptr(), a.m, a.r, act,
                   shared ? kNoDropout : drop, stream());
  check_launch();
  Tensor pre2, hin = h1;
  if (shared) {
    pre2 = at::mm(h1, a.ws->t());
    hin = at::empty_like(pre2);
    bias_act_forward(dt, pre2.data_ptr(), ptr(a.bs), pre2.data_ptr(), hin.data_ptr(), a.m, a.r,
                     act, drop, stream());
    check_launch();
  }

  std::vector<Tensor> grads(8);
  for (auto& t : grads) t = empty_grad(a.x);
  if (need(needs, 7) && a.scale.has_value()) {
    Tensor u = affine(hin, a.wu, a.bu);
    grads[7] = weighted_dot_of(g, u, a.row_scale);
  }
  Tensor g_u = at::empty_like(g);
  scale_rows(dt, g.data_ptr(), ptr(a.scale), scale_value, ptr(a.row_scale), g_u.data_ptr(), a.m,
             a.d, stream());
  check_launch();
  if (need(needs, 5)) grads[5] = at::mm(g_u.t(), hin);
  if (need(needs, 6) && a.bu.has_value()) grads[6] = col_sum_of(g_u);

  const bool need_chain = need(needs, 0) || need(needs, 1) || need(needs, 2) ||
                          (shared && (need(needs, 3) || need(needs, 4)));
  if (need_chain) {
    Tensor dh = at::mm(g_u, a.wu);  // (M, r)
    if (shared) {
      act_backward(dt, dh.data_ptr(), pre2.data_ptr(), dh.data_ptr(), a.m, a.r, act, drop,
                   stream());
      check_launch();
      if (need(needs, 3)) grads[3] = at::mm(dh.t(), h1);
      if (need(needs, 4) && a.bs.has_value()) grads[4] = col_sum_of(dh);
      dh = at::mm(dh, *a.ws);
    }
    act_backward(dt, dh.data_ptr(), pre1.data_ptr(), dh.data_ptr(), a.m, a.r, act,
                 shared ? kNoDropout : drop, stream());
    check_launch();
    if (need(needs, 1)) grads[1] = at::mm(dh.t(), a.x);
    if (need(needs, 2) && a.bd.has_value()) grads[2] = col_sum_of(dh);
    if (need(needs, 0)) grads[0] = has_residual ? at::mm(dh, a.wd) : at::addmm(g, dh, a.wd);
  }
  if (grad_scale_invariant) {
    // MMA's gradient-scale layers: parameters train as if scale were 1; dx stays exact.
    for (size_t i = 1; i < grads.size(); ++i) {
      grads[i] = a.scale.has_value() ? grads[i] / a.scale->to(grads[i].scalar_type())
                                     : grads[i] / scale_value;
    }
  }
  return grads;
}

// ---------------------------------------------------------------------------------------------
// frozen linear + LoRA / CP / Tucker-core adapter

struct LowrankArgs {
  Tensor x, w, down, up;
  OptTensor b, core;
  int64_t m, d_in, d_out, r1, r2;
};

LowrankArgs check_lowrank(const Tensor& x_in, const Tensor& w, const OptTensor& b,
                          const Tensor& down, const OptTensor& core, const Tensor& up) {
  LowrankArgs a;
  a.x = checked_input(x_in, "x");
  a.m = a.x.size(0);
  a.d_in = a.x.size(1);
  TORCH_CHECK_VALUE(w.dim() == 2, "weight: expected shape (out, ", a.d_in, "), got ", w.sizes());
  a.d_out = w.size(0);
  a.w = checked(w, "weight", a.x, a.d_out, a.d_in);
  a.b = checked(b, "bias", a.x, a.d_out, -1);
  TORCH_CHECK_VALUE(down.dim() == 2, "down: expected shape (r, ", a.d_in, "), got ",
                    down.sizes());
  a.r1 = down.size(0);
  a.down = checked(down, "down", a.x, a.r1, a.d_in);
  a.r2 = a.r1;
  if (core.has_value()) {
    TORCH_CHECK_VALUE(core->dim() == 2, "core: expected shape (", a.r1, ", r2), got ",
                      core->sizes());
    a.r2 = core->size(1);
  }
  a.core = checked(core, "core", a.x, a.r1, a.r2);
  a.up = checked(up, "up", a.x, a.d_out, a.r2);
  return a;
}

Tensor lowrank_forward(const Tensor& x_in, const Tensor& w, const OptTensor& b,
                       const Tensor& down, const OptTensor& core, const Tensor& up, double scale,
                       const OptTensor& seed, double dropout_p, bool dropout_after_core) {
  LowrankArgs a = check_lowrank(x_in, w, b, down, core, up);
  c10::cuda::CUDAGuard guard(a.x.device());  // after the checks: x is a CUDA tensor
  const Dropout drop = make_dropout(seed, dropout_p, a.x);
  Tensor y = affine(a.x, a.w, a.b);
  Tensor p = at::mm(a.x, a.down.t());  // (M, r1)
  if (!dropout_after_core) dropout_inplace(p, drop);
  if (a.core.has_value()) p = at::mm(p, *a.core);
  if (dropout_after_core) dropout_inplace(p, drop);
  y.addmm_(p, a.up.t(), /*beta=*/1.0, /*alpha=*/scale);
  return y;
}

// Gradients [dx, dW, db, d down, d core, d up] (empty where not asked for or absent).
std::vector<Tensor> lowrank_backward(const Tensor& grad_y, const Tensor& x_in, const Tensor& w,
                                     const OptTensor& b, const Tensor& down,
                                     const OptTensor& core, const Tensor& up, double scale,
                                     const OptTensor& seed, double dropout_p,
                                     bool dropout_after_core, c10::List<bool> needs) {
  LowrankArgs a = check_lowrank(x_in, w, b, down, core, up);
  c10::cuda::CUDAGuard guard(a.x.device());  // after the checks: x is a CUDA tensor
  const Dropout drop = make_dropout(seed, dropout_p, a.x);
  const Tensor g = checked(grad_y, "grad_y", a.x, a.m, a.d_out);
  std::vector<Tensor> grads(6);
  for (auto& t : grads) t = empty_grad(a.x);

  Tensor u_in = at::mm(a.x, a.down.t());
  if (!dropout_after_core) dropout_inplace(u_in, drop);
  Tensor p = a.core.has_value() ? at::mm(u_in, *a.core) : u_in.clone();
  if (dropout_after_core) dropout_inplace(p, drop);
  if (need(needs, 5)) grads[5] = scaled_mm(g.t(), p, scale);
  Tensor g_p = scaled_mm(g, a.up, scale);  // (M, r2)
  if (dropout_after_core) dropout_inplace(g_p, drop);
  if (need(needs, 4) && a.core.has_value()) grads[4] = at::mm(u_in.t(), g_p);
  Tensor du = a.core.has_value() ? at::mm(g_p, a.core->t()) : g_p;
  if (!dropout_after_core) dropout_inplace(du, drop);
  if (need(needs, 3)) grads[3] = at::mm(du.t(), a.x);
  if (need(needs, 0)) grads[0] = at::mm(g, a.w).addmm_(du, a.down);
  if (need(needs, 1)) grads[1] = at::mm(g.t(), a.x);
  if (need(needs, 2) && a.b.has_value()) grads[2] = col_sum_of(g);
  return grads;
}

// ---------------------------------------------------------------------------------------------
// R-Adapter: frozen linear + linear adapter

struct RadapterArgs {
  Tensor x, wo;
  OptTensor bo, wf, wd, wu, scale, row_scale;
  int64_t m, d_in, d_out;
};

RadapterArgs check_radapter(const Tensor& x_in, const Tensor& wo, const OptTensor& bo,
                            const OptTensor& wf, const OptTensor& wd, const OptTensor& wu,
                            const OptTensor& scale, const OptTensor& row_scale) {
  RadapterArgs a;
  a.x = checked_input(x_in, "x");
  a.m = a.x.size(0);
  a.d_in = a.x.size(1);
  TORCH_CHECK_VALUE(wo.dim() == 2, "base_weight: expected shape (out, ", a.d_in, "), got ",
                    wo.sizes());
  a.d_out = wo.size(0);
  a.wo = checked(wo, "base_weight", a.x, a.d_out, a.d_in);
  a.bo = checked(bo, "base_bias", a.x, a.d_out, -1);
  TORCH_CHECK_VALUE(wf.has_value() != (wd.has_value() && wu.has_value()) &&
                        wd.has_value() == wu.has_value(),
                    "radapter: give either full_weight, or both down_weight and up_weight");
  a.wf = checked(wf, "full_weight", a.x, a.d_out, a.d_out);
  if (wd.has_value()) {
    TORCH_CHECK_VALUE(wd->dim() == 2, "down_weight: expected shape (r, ", a.d_out, "), got ",
                      wd->sizes());
    const int64_t r = wd->size(0);
    a.wd = checked(wd, "down_weight", a.x, r, a.d_out);
    a.wu = checked(wu, "up_weight", a.x, a.d_out, r);
  }
  a.scale = checked_scale(scale, a.x);
  a.row_scale = checked_row_scale(row_scale, a.x);
  return a;
}

Tensor radapter_forward(const Tensor& x_in, const Tensor& wo, const OptTensor& bo,
                        const OptTensor& wf, const OptTensor& wd, const OptTensor& wu,
                        const OptTensor& scale, double scale_value, const OptTensor& row_scale) {
  RadapterArgs a = check_radapter(x_in, wo, bo, wf, wd, wu, scale, row_scale);
  c10::cuda::CUDAGuard guard(a.x.device());  // after the checks: x is a CUDA tensor
  Tensor z = affine(a.x, a.wo, a.bo);
  Tensor q = a.wf.has_value() ? at::mm(z, a.wf->t()) : at::mm(at::mm(z, a.wd->t()), a.wu->t());
  output_epilogue(dtype_of(a.x), q.data_ptr(), nullptr, z.data_ptr(), ptr(a.scale), scale_value,
                  ptr(a.row_scale), q.data_ptr(), a.m, a.d_out, stream());
  check_launch();
  return q;
}

// Gradients [dx, dW_o, db_o, dW_f, dW_d, dW_u, dscale] (empty where not asked for or absent).
std::vector<Tensor> radapter_backward(const Tensor& grad_y, const Tensor& x_in, const Tensor& wo,
                                      const OptTensor& bo, const OptTensor& wf,
                                      const OptTensor& wd, const OptTensor& wu,
                                      const OptTensor& scale, double scale_value,
                                      const OptTensor& row_scale, c10::List<bool> needs) {
  RadapterArgs a = check_radapter(x_in, wo, bo, wf, wd, wu, scale, row_scale);
  c10::cuda::CUDAGuard guard(a.x.device());  // after the checks: x is a CUDA tensor
  const Tensor g = checked(grad_y, "grad_y", a.x, a.m, a.d_out);
  std::vector<Tensor> grads(7);
  for (auto& t : grads) t = empty_grad(a.x);

  Tensor z = affine(a.x, a.wo, a.bo);
  Tensor g_q = at::empty_like(g);
  scale_rows(dtype_of(a.x), g.data_ptr(), ptr(a.scale), scale_value, ptr(a.row_scale),
             g_q.data_ptr(), a.m, a.d_out, stream());
  check_launch();
  Tensor dz, q;
  const bool need_q = need(needs, 6) && a.scale.has_value();
  if (a.wf.has_value()) {
    if (need(needs, 3)) grads[3] = at::mm(g_q.t(), z);
    dz = at::addmm(g, g_q, *a.wf);
    if (need_q) q = at::mm(z, a.wf->t());
  } else {
    Tensor t = at::mm(z, a.wd->t());
    if (need(needs, 5)) grads[5] = at::mm(g_q.t(), t);
    Tensor dt = at::mm(g_q, *a.wu);
    if (need(needs, 4)) grads[4] = at::mm(dt.t(), z);
    dz = at::addmm(g, dt, *a.wd);
    if (need_q) q = at::mm(t, a.wu->t());
  }
  if (need_q) grads[6] = weighted_dot_of(g, q, a.row_scale);
  if (need(needs, 0)) grads[0] = at::mm(dz, a.wo);
  if (need(needs, 1)) grads[1] = at::mm(dz.t(), a.x);
  if (need(needs, 2) && a.bo.has_value()) grads[2] = col_sum_of(dz);
  return grads;
}

// ---------------------------------------------------------------------------------------------
// grouped fold W'_i = W_i + s_i L_i R_i

std::vector<Tensor> fold_weights(std::vector<Tensor> weights, std::vector<Tensor> lefts,
                                 std::vector<Tensor> rights, const Tensor& scales) {
  const size_t n = weights.size();
  TORCH_CHECK_VALUE(lefts.size() == n && rights.size() == n && scales.dim() == 1 &&
                        size_t(scales.size(0)) == n,
                    "fold_weights: expected equal numbers of weights, lefts, rights and scales, "
                    "got ", n, ", ", lefts.size(), ", ", rights.size(), ", ", scales.numel());
  std::vector<Tensor> out;
  out.reserve(n);
  if (n == 0) return out;
  const Tensor w0 = checked_input(weights[0], "weights[0]");
  c10::cuda::CUDAGuard guard(w0.device());
  TORCH_CHECK(scales.device() == w0.device(), "scales: expected a tensor on ", w0.device(),
              ", got one on ", scales.device());
  const Tensor s = scales.to(at::kDouble).contiguous();
  for (size_t i = 0; i < n; ++i) {
    const std::string wi = "weights[" + std::to_string(i) + "]";
    const Tensor w = checked_input(weights[i], wi.c_str());
    TORCH_CHECK(w.device() == w0.device(), wi, ": expected a tensor on ", w0.device(),
                " like weights[0], got one on ", w.device());
    const int64_t rows = w.size(0), cols = w.size(1);
    const std::string li = "lefts[" + std::to_string(i) + "]";
    const std::string ri = "rights[" + std::to_string(i) + "]";
    TORCH_CHECK(lefts[i].device() == w.device() && rights[i].device() == w.device(), li, ", ",
                ri, ": expected tensors on ", w.device());
    TORCH_CHECK_VALUE(lefts[i].dim() == 2 && lefts[i].size(0) == rows, li, ": expected shape (",
                      rows, ", k), got ", lefts[i].sizes());
    const int64_t k = lefts[i].size(1);
    TORCH_CHECK_VALUE(rights[i].dim() == 2 && rights[i].size(0) == k && rights[i].size(1) == cols,
                      ri, ": expected shape (", k, ", ", cols, "), got ", rights[i].sizes());
    const at::ScalarType acc = acc_type(w);
    // L @ R in the accumulation type, so the fold rounds to W's dtype once.
    const Tensor lr = at::mm(lefts[i].to(acc), rights[i].to(acc)).contiguous();
    Tensor o = at::empty({rows, cols}, w.options());
    fold_epilogue(dtype_of(w), w.data_ptr(), lr.data_ptr(), s.data_ptr<double>() + i,
                  o.data_ptr(), rows * cols, stream());
    check_launch();
    out.push_back(o);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(pyadapt_cuda, m) {
  m.def("bottleneck_forward(Tensor x, Tensor? residual, Tensor down_weight, Tensor? down_bias, "
        "Tensor? shared_weight, Tensor? shared_bias, Tensor up_weight, Tensor? up_bias, "
        "Tensor? scale, float scale_value, Tensor? row_scale, Tensor? seed, str activation, "
        "float dropout_p) -> Tensor");
  m.def("bottleneck_backward(Tensor grad_y, Tensor x, bool has_residual, Tensor down_weight, "
        "Tensor? down_bias, Tensor? shared_weight, Tensor? shared_bias, Tensor up_weight, "
        "Tensor? up_bias, Tensor? scale, float scale_value, Tensor? row_scale, Tensor? seed, "
        "str activation, float dropout_p, bool grad_scale_invariant, bool[] needs) -> Tensor[]");
  m.def("lowrank_forward(Tensor x, Tensor weight, Tensor? bias, Tensor down, Tensor? core, "
        "Tensor up, float scale, Tensor? seed, float dropout_p, bool dropout_after_core) "
        "-> Tensor");
  m.def("lowrank_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias, Tensor down, "
        "Tensor? core, Tensor up, float scale, Tensor? seed, float dropout_p, "
        "bool dropout_after_core, bool[] needs) -> Tensor[]");
  m.def("radapter_forward(Tensor x, Tensor base_weight, Tensor? base_bias, "
        "Tensor? full_weight, Tensor? down_weight, Tensor? up_weight, Tensor? scale, "
        "float scale_value, Tensor? row_scale) -> Tensor");
  m.def("radapter_backward(Tensor grad_y, Tensor x, Tensor base_weight, Tensor? base_bias, "
        "Tensor? full_weight, Tensor? down_weight, Tensor? up_weight, Tensor? scale, "
        "float scale_value, Tensor? row_scale, bool[] needs) -> Tensor[]");
  m.def("fold_weights(Tensor[] weights, Tensor[] lefts, Tensor[] rights, Tensor scales) "
        "-> Tensor[]");
  // Re-reads PYADAPT_CUDA_FUSED; returns whether the fused bottleneck kernels are on.
  m.def("fused_from_env() -> bool", &fused_from_env);
}

TORCH_LIBRARY_IMPL(pyadapt_cuda, CUDA, m) {
  m.impl("bottleneck_forward", &bottleneck_forward);
  m.impl("bottleneck_backward", &bottleneck_backward);
  m.impl("lowrank_forward", &lowrank_forward);
  m.impl("lowrank_backward", &lowrank_backward);
  m.impl("radapter_forward", &radapter_forward);
  m.impl("radapter_backward", &radapter_backward);
  m.impl("fold_weights", &fold_weights);
}

}  // namespace cuda
}  // namespace pyadapt
