// Fused CPU kernels of the bottleneck / MMA adapter op (pyadapt/ops/bottleneck.py):
//   y = residual + scale * row_scale * up(drop(act(shared?(act(down(x))))))
// Rows of x are processed in blocks of kRowBlock rows: a block's x rows, its bottleneck
// activations (kRowBlock x r) and its output rows stay in cache across the down and up passes.
// Blocks run in parallel (at::parallel_for). Every matrix product is a register-blocked
// micro-kernel (combo_rows, rank_update: groups of 4 rows x 32 columns of accumulators with
// constant trip counts) that gcc vectorises at -O3 -march=native. Weight gradients are reduced
// deterministically: each reduction chunk (a fixed number of rows that depends only on M, never
// on the thread count) accumulates its rows in order into its own partial buffer, and partials
// are summed in chunk order, so gradients are bit-identical across runs and OMP thread counts.
// Dropout regenerates the reference's counter-based Philox4x32-10 mask (Triton's tl.rand).
// Covers float32 and float64 (accumulation in the storage type; bias gradients and dscale in
// double); the Python glue falls back to the reference for other dtypes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common.h"

namespace pyadapt {
namespace {

using namespace pyadapt::cpu;

constexpr int64_t kRowBlock = 32;     // rows per cache block
constexpr int64_t kMinChunkRows = 256;  // rows per deterministic reduction chunk (at least)
constexpr int64_t kMaxChunks = 64;      // bound on partial buffers

struct Params {
  int64_t M, d, r;
  bool shared;
  Act act;
  double scale;
  double p;
  uint64_t seed;
};

// Forward of one row block: fills pre1/h1 (rows x r), pre2 (rows x r, when shared) and hin
// (rows x r, the input of `up` after dropout). Scratch buffers are row-major with stride r.
template <typename T>
void bottleneck_rows(const T* __restrict__ x, int64_t row0, int64_t rows, const Params& P,
                     const T* __restrict__ wdT, const T* __restrict__ bd,
                     const T* __restrict__ wsT, const T* __restrict__ bs, T* __restrict__ pre1,
                     T* __restrict__ h1, T* __restrict__ pre2, T* __restrict__ hin) {
  const int64_t d = P.d, r = P.r;
  combo_rows<T>(rows, x + row0 * d, d, d, 64, wdT, r, bd, 0, pre1, r, r);
  for (int64_t i = 0; i < rows; ++i) {
    T* __restrict__ p1 = pre1 + i * r;
    T* a1 = h1 + i * r;
    for (int64_t k = 0; k < r; ++k) a1[k] = act_fwd(p1[k], P.act);
    const T* h = a1;
    if (P.shared) {
      T* p2 = pre2 + i * r;
      combo<T>(a1, r, 64, wsT, r, bs, p2, r);
      h = p2;
    }
    T* hi = hin + i * r;
    if (P.shared) {
      for (int64_t k = 0; k < r; ++k) hi[k] = act_fwd(h[k], P.act);
    } else {
      for (int64_t k = 0; k < r; ++k) hi[k] = h[k];
    }
    if (P.p > 0.0) {
      const float pf = float(P.p);
      const T mult = T(1.0 / (1.0 - P.p));
      const uint64_t base = uint64_t(row0 + i) * uint64_t(r);
      for (int64_t k = 0; k < r; ++k)
        hi[k] = philox_uniform(P.seed, base + uint64_t(k)) >= pf ? hi[k] * mult : T(0);
    }
  }
}

template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor& res, const at::Tensor& wd,
                  const at::Tensor& bd, const at::Tensor& ws, const at::Tensor& bs,
                  const at::Tensor& wu, const at::Tensor& bu, const at::Tensor& rs,
                  const Params& P, at::Tensor& y) {
  const int64_t d = P.d, r = P.r;
  at::Tensor wdT = wd.t().contiguous();                         // (d, r)
  at::Tensor wsT = P.shared ? ws.t().contiguous() : at::Tensor();  // (r, r)
  at::Tensor wuT = wu.t().contiguous();                         // (r, d)
  const T* xp = x.data_ptr<T>();
  const T* resp = res.defined() ? res.data_ptr<T>() : xp;
  const T* wdTp = wdT.data_ptr<T>();
  const T* bdp = bd.defined() ? bd.data_ptr<T>() : nullptr;
  const T* wsTp = P.shared ? wsT.data_ptr<T>() : nullptr;
  const T* bsp = bs.defined() ? bs.data_ptr<T>() : nullptr;
  const T* wuTp = wuT.data_ptr<T>();
  const T* bup = bu.defined() ? bu.data_ptr<T>() : nullptr;
  const T* rsp = rs.defined() ? rs.data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  const T scale = T(P.scale);
  const int64_t nblocks = (P.M + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> buf(4 * kRowBlock * r);
    T* pre1 = buf.data();
    T* h1 = pre1 + kRowBlock * r;
    T* pre2 = h1 + kRowBlock * r;
    T* hin = pre2 + kRowBlock * r;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row0 = b * kRowBlock, rows = std::min(kRowBlock, P.M - row0);
      bottleneck_rows<T>(xp, row0, rows, P, wdTp, bdp, wsTp, bsp, pre1, h1, pre2, hin);
      combo_rows<T>(rows, hin, r, r, 64, wuTp, d, bup, 0, yp + row0 * d, d, d);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t row = row0 + i;
        const T* __restrict__ resi = resp + row * d;
        T* __restrict__ yi = yp + row * d;
        if (rsp) {
          const T rv = rsp[row];
          for (int64_t j = 0; j < d; ++j) yi[j] = resi[j] + (yi[j] * scale) * rv;
        } else {
          for (int64_t j = 0; j < d; ++j) yi[j] = resi[j] + yi[j] * scale;
        }
      }
    }
  });
}

template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& gy, const at::Tensor& x, bool has_residual,
                                      const at::Tensor& wd, const at::Tensor& bd,
                                      const at::Tensor& ws, const at::Tensor& bs,
                                      const at::Tensor& wu, const at::Tensor& bu,
                                      const at::Tensor& rs, const Params& P, bool need_dx,
                                      bool need_dscale, bool gsi) {
  const int64_t M = P.M, d = P.d, r = P.r;
  const auto opts = x.options();
  at::Tensor dx = need_dx ? at::empty({M, d}, opts) : at::empty({0}, opts);
  // Reduction chunks: a fixed row count that depends on M only.
  int64_t chunk_rows = std::max(kMinChunkRows, (M + kMaxChunks - 1) / kMaxChunks);
  chunk_rows = (chunk_rows + kRowBlock - 1) / kRowBlock * kRowBlock;
  const int64_t nchunks = std::max<int64_t>(1, (M + chunk_rows - 1) / chunk_rows);
  // Partial layout per chunk: dWd (r,d) | dbd (r) | dWs (r,r) | dbs (r) | dWu (d,r) | dbu (d) | dscale
  const int64_t o_wd = 0, o_bd = o_wd + r * d, o_ws = o_bd + r, o_bs = o_ws + r * r,
                o_wu = o_bs + r, o_bu = o_wu + d * r, o_sc = o_bu + d, psize = o_sc + 1;
  std::vector<T> partial(size_t(nchunks * psize), T(0));
  // Bias gradients and dscale are plain sums over rows (short, cancelling for small r):
  // accumulated in double, in their own partials: db_d (r) | db_s (r) | db_u (d) | dscale.
  const int64_t b_bd = 0, b_bs = r, b_bu = 2 * r, b_sc = 2 * r + d, bsize = b_sc + 1;
  std::vector<double> bpartial(size_t(nchunks * bsize), 0.0);

  at::Tensor wdT = wd.t().contiguous();
  at::Tensor wsT = P.shared ? ws.t().contiguous() : at::Tensor();
  at::Tensor wuT = wu.t().contiguous();
  const T* xp = x.data_ptr<T>();
  const T* gyp = gy.data_ptr<T>();
  const T* wdp = wd.data_ptr<T>();
  const T* wdTp = wdT.data_ptr<T>();
  const T* bdp = bd.defined() ? bd.data_ptr<T>() : nullptr;
  const T* wsp = P.shared ? ws.data_ptr<T>() : nullptr;
  const T* wsTp = P.shared ? wsT.data_ptr<T>() : nullptr;
  const T* bsp = bs.defined() ? bs.data_ptr<T>() : nullptr;
  const T* wup = wu.data_ptr<T>();
  const T* wuTp = wuT.data_ptr<T>();
  const T* bup = bu.defined() ? bu.data_ptr<T>() : nullptr;
  const T* rsp = rs.defined() ? rs.data_ptr<T>() : nullptr;
  T* dxp = need_dx ? dx.data_ptr<T>() : nullptr;
  const T scale = T(P.scale);

  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> buf(6 * kRowBlock * r + d + kRowBlock * d + r);
    T* pre1 = buf.data();
    T* h1 = pre1 + kRowBlock * r;
    T* pre2 = h1 + kRowBlock * r;
    T* hin = pre2 + kRowBlock * r;
    T* dh = hin + kRowBlock * r;
    T* dh1 = dh + kRowBlock * r;
    T* __restrict__ u = dh1 + kRowBlock * r;
    T* __restrict__ gu_blk = u + d;  // (kRowBlock x d): g_u of the block's rows
    for (int64_t c = c0; c < c1; ++c) {
      T* part = partial.data() + c * psize;
      double* bpart = bpartial.data() + c * bsize;
      T* pwd = part + o_wd; double* pbd = bpart + b_bd; T* pws = part + o_ws;
      double* pbs = bpart + b_bs; T* pwu = part + o_wu; double* pbu = bpart + b_bu;
      double dscale = 0.0;  // a scalar: accumulate in double (long sums)
      const int64_t cend = std::min(M, (c + 1) * chunk_rows);
      for (int64_t row0 = c * chunk_rows; row0 < cend; row0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, cend - row0);
        bottleneck_rows<T>(xp, row0, rows, P, wdTp, bdp, wsTp, bsp, pre1, h1, pre2, hin);
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t row = row0 + i;
          const T* gyi = gyp + row * d;
          const T* hi = hin + i * r;
          const T rv = rsp ? rsp[row] : T(1);
          // g_u = scale * row_scale * g; when the scale is learnable, u = hin W_u^T + b_u and
          // dscale += sum(g_row * u)
          if (need_dscale) {
            combo<T>(hi, r, 64, wuTp, d, bup, u, d);
            double ds = 0.0;
            for (int64_t j = 0; j < d; ++j) ds += double((rsp ? gyi[j] * rv : gyi[j]) * u[j]);
            dscale += ds;
          }
          T* __restrict__ gu = gu_blk + i * d;
          for (int64_t j = 0; j < d; ++j) gu[j] = (rsp ? gyi[j] * rv : gyi[j]) * scale;
          for (int64_t j = 0; j < d; ++j) pbu[j] += gu[j];  // db_u += g_u
        }
        // dh = g_u W_u for the block
        combo_rows<T>(rows, gu_blk, d, d, 64, wup, r, nullptr, 0, dh, r, r);
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t row = row0 + i;
          T* __restrict__ dhi = dh + i * r;
          if (P.p > 0.0) {
            const float pf = float(P.p);
            const T mult = T(1.0 / (1.0 - P.p));
            const uint64_t base = uint64_t(row) * uint64_t(r);
            for (int64_t k = 0; k < r; ++k)
              dhi[k] = philox_uniform(P.seed, base + uint64_t(k)) >= pf ? dhi[k] * mult : T(0);
          }
          const T* a1 = h1 + i * r;
          T* __restrict__ g1 = dh1 + i * r;
          if (P.shared) {
            // dpre2 = dh * act'(pre2); dW_s += dpre2^T h1; db_s += dpre2; dh1 = dpre2 W_s
            const T* p2 = pre2 + i * r;
            for (int64_t k = 0; k < r; ++k) dhi[k] *= act_grad(p2[k], P.act);
            combo<T>(dhi, r, 64, wsp, r, nullptr, g1, r);
            for (int64_t k = 0; k < r; ++k) pbs[k] += dhi[k];
          } else {
            for (int64_t k = 0; k < r; ++k) g1[k] = dhi[k];
          }
          // dpre1 = dh1 * act'(pre1); db_d += dpre1
          const T* p1 = pre1 + i * r;
          for (int64_t k = 0; k < r; ++k) {
            g1[k] *= act_grad(p1[k], P.act);
            pbd[k] += g1[k];
          }
        }
        // dx = dpre1 W_d (+ g). Block-wide weight-gradient updates: dW_u += g_u^T hin, dW_s += dpre2^T h1,
        // dW_d += dpre1^T x (each partial slice loaded and stored once per block).
        rank_update<T>(rows, d, gu_blk, d, hin, r, pwu, r, r);
        if (P.shared) rank_update<T>(rows, r, dh, r, h1, r, pws, r, r);
        rank_update<T>(rows, r, dh1, r, xp + row0 * d, d, pwd, d, d);
        if (dxp)
          combo_rows<T>(rows, dh1, r, r, 64, wdp, d, has_residual ? nullptr : gyp + row0 * d, d,
                        dxp + row0 * d, d, d);
      }
      bpart[b_sc] = dscale;
    }
  });

  // Fixed-order sum of the chunk partials (parallel over elements: still deterministic).
  at::Tensor total = at::empty({psize}, opts);
  T* tp = total.data_ptr<T>();
  const T* pp = partial.data();
  at::parallel_for(0, psize, 4096, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) tp[e] = T(0);
    for (int64_t c = 0; c < nchunks; ++c) {
      const T* pc = pp + c * psize;
      for (int64_t e = e0; e < e1; ++e) tp[e] += pc[e];
    }
  });
  const int64_t pairs[4][3] = {{o_bd, b_bd, r}, {o_bs, b_bs, r}, {o_bu, b_bu, d}, {o_sc, b_sc, 1}};
  for (const auto& pr : pairs) {
    for (int64_t e = 0; e < pr[2]; ++e) {
      double acc = 0.0;
      for (int64_t c = 0; c < nchunks; ++c) acc += bpartial[c * bsize + pr[1] + e];
      tp[pr[0] + e] = T(acc);
    }
  }
  if (gsi) total.div_(P.scale);
  auto view = [&](int64_t off, at::IntArrayRef shape) {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    return total.narrow(0, off, n).view(shape).clone();
  };
  at::Tensor empty = at::empty({0}, opts);
  return {dx,
          view(o_wd, {r, d}),
          bd.defined() ? view(o_bd, {r}) : empty,
          P.shared ? view(o_ws, {r, r}) : empty,
          bs.defined() ? view(o_bs, {r}) : empty,
          view(o_wu, {d, r}),
          bu.defined() ? view(o_bu, {d}) : empty,
          view(o_sc, {})};
}

at::Tensor opt_contig(const c10::optional<at::Tensor>& t, at::ScalarType dtype) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return t->to(dtype).contiguous();
}

Params make_params(const at::Tensor& x, const at::Tensor& wd, bool shared, const std::string& act,
                   double scale, double p, const c10::optional<at::Tensor>& seed) {
  TORCH_CHECK(x.dim() == 2 && wd.dim() == 2, "bottleneck: x and down_weight must be 2-D");
  TORCH_CHECK(x.device().is_cpu(), "bottleneck (cpu backend): expected CPU tensors");
  Params P;
  P.M = x.size(0);
  P.d = x.size(1);
  P.r = wd.size(0);
  P.shared = shared;
  P.act = parse_act(act);
  P.scale = scale;
  P.p = p;
  P.seed = 0;
  if (p > 0.0) {
    TORCH_CHECK(seed.has_value() && seed->defined(), "bottleneck: dropout needs a seed");
    P.seed = uint64_t(seed->item<int64_t>());
  }
  return P;
}

at::Tensor bottleneck_forward_cpu(const at::Tensor& x_, const c10::optional<at::Tensor>& residual,
                                  const at::Tensor& wd_, const c10::optional<at::Tensor>& bd_,
                                  const c10::optional<at::Tensor>& ws_,
                                  const c10::optional<at::Tensor>& bs_, const at::Tensor& wu_,
                                  const c10::optional<at::Tensor>& bu_, double scale,
                                  const c10::optional<at::Tensor>& row_scale,
                                  const c10::optional<at::Tensor>& seed, std::string activation,
                                  double dropout_p) {
  const auto dt = x_.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "bottleneck cpu: float32/float64 only");
  at::Tensor x = x_.contiguous();
  at::Tensor res = opt_contig(residual, dt);
  const bool shared = ws_.has_value() && ws_->defined();
  Params P = make_params(x, wd_, shared, activation, scale, dropout_p, seed);
  at::Tensor wd = wd_.contiguous(), wu = wu_.contiguous();
  at::Tensor bd = opt_contig(bd_, dt), ws = opt_contig(ws_, dt), bs = opt_contig(bs_, dt),
             bu = opt_contig(bu_, dt), rs = opt_contig(row_scale, dt);
  at::Tensor y = at::empty({P.M, P.d}, x.options());
  if (P.M == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(dt, "bottleneck_forward_cpu", [&] {
    forward_impl<scalar_t>(x, res, wd, bd, ws, bs, wu, bu, rs, P, y);
  });
  return y;
}

std::vector<at::Tensor> bottleneck_backward_cpu(
    const at::Tensor& gy_, const at::Tensor& x_, bool has_residual, const at::Tensor& wd_,
    const c10::optional<at::Tensor>& bd_, const c10::optional<at::Tensor>& ws_,
    const c10::optional<at::Tensor>& bs_, const at::Tensor& wu_,
    const c10::optional<at::Tensor>& bu_, double scale, const c10::optional<at::Tensor>& row_scale,
    const c10::optional<at::Tensor>& seed, std::string activation, double dropout_p,
    bool grad_scale_invariant, bool need_dx, bool need_dscale) {
  const auto dt = x_.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "bottleneck cpu: float32/float64 only");
  at::Tensor x = x_.contiguous();
  at::Tensor gy = gy_.to(dt).contiguous();
  const bool shared = ws_.has_value() && ws_->defined();
  Params P = make_params(x, wd_, shared, activation, scale, dropout_p, seed);
  at::Tensor wd = wd_.contiguous(), wu = wu_.contiguous();
  at::Tensor bd = opt_contig(bd_, dt), ws = opt_contig(ws_, dt), bs = opt_contig(bs_, dt),
             bu = opt_contig(bu_, dt), rs = opt_contig(row_scale, dt);
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(dt, "bottleneck_backward_cpu", [&] {
    out = backward_impl<scalar_t>(gy, x, has_residual, wd, bd, ws, bs, wu, bu, rs, P, need_dx,
                                  need_dscale, grad_scale_invariant);
  });
  return out;
}

// Keep mask of the reference's dropout_multiplier (for tests): (rows x cols) bool.
at::Tensor dropout_keep_cpu(int64_t seed, int64_t rows, int64_t cols, double p) {
  at::Tensor out = at::empty({rows, cols}, at::TensorOptions().dtype(at::kBool));
  bool* op = out.data_ptr<bool>();
  const float pf = float(p);
  at::parallel_for(0, rows * cols, 4096, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) op[e] = philox_uniform(uint64_t(seed), uint64_t(e)) >= pf;
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyadapt_C, m) {
  m.def("bottleneck_forward(Tensor x, Tensor? residual, Tensor down_weight, Tensor? down_bias, "
        "Tensor? shared_weight, Tensor? shared_bias, Tensor up_weight, Tensor? up_bias, "
        "float scale, Tensor? row_scale, Tensor? seed, str activation, float dropout_p) -> Tensor");
  m.def("bottleneck_backward(Tensor grad_y, Tensor x, bool has_residual, Tensor down_weight, "
        "Tensor? down_bias, Tensor? shared_weight, Tensor? shared_bias, Tensor up_weight, "
        "Tensor? up_bias, float scale, Tensor? row_scale, Tensor? seed, str activation, "
        "float dropout_p, bool grad_scale_invariant, bool need_dx, bool need_dscale) -> Tensor[]");
  m.def("dropout_keep(int seed, int rows, int cols, float p) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyadapt_C, CPU, m) {
  m.impl("bottleneck_forward", &bottleneck_forward_cpu);
  m.impl("bottleneck_backward", &bottleneck_backward_cpu);
}

TORCH_LIBRARY_IMPL(pyadapt_C, CompositeExplicitAutograd, m) {
  m.impl("dropout_keep", &dropout_keep_cpu);
}

}  // namespace pyadapt
