// Fused CPU kernels of the bottleneck / MMA adapter op (pyadapt/ops/bottleneck.py):
//   y = residual + scale * row_scale * up(drop(act(shared?(act(down(x))))))
// Rows of x are processed in blocks of kRowBlock rows: a block's x rows, its bottleneck
// activations (kRowBlock x r) and its output rows stay in cache across the down and up passes,
// so the forward reads x (and the residual) and writes y once, and the backward reads x and
// grad_y and writes dx once. Blocks run in parallel (at::parallel_for). The products of a block
// with a weight (down: a d-long sum per bottleneck value; up: an r-long sum per output value)
// run gemm.h's micro-kernels over weights packed once per call (gemm_serial; the wide ones write
// y or dx straight from the registers); the weight gradients (rank-`rows` updates) and the
// shared layer use common.h's register tiles (gemm_acc). Sums run in an order fixed by shapes.
// Training keeps the forward's pre-activations (bottleneck_forward_saving, M x r, or 2r with
// the shared layer), so the backward does not recompute down(x), a product over d.
// Weight gradients are reduced deterministically: each reduction chunk (a fixed number of rows
// that depends only on M, never on the thread count) accumulates its blocks in order into its
// own partial buffer, and partials are summed in chunk order, so gradients are bit-identical
// across runs and OMP thread counts. dW_u and db_u are summed without the scale, which is
// applied once to the totals (never to a d-wide copy of grad_y), and dscale comes from those
// totals: <W_u, dW_u / scale> + <b_u, db_u / scale>. Dropout regenerates the reference's
// counter-based Philox4x32-10 mask (Triton's tl.rand).
// Storage dtypes: float32, float64, bfloat16, float16. Math runs in the compute type (float64
// for float64 storage, float32 otherwise): low-precision rows are widened once into a block
// buffer, and every output is rounded once to the storage dtype. Bias gradients and dscale are
// summed in double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__F16C__) || defined(__AVX__)
#include <immintrin.h>
#endif

#include "common.h"
#include "gemm.h"

namespace pyadapt {
namespace {

using namespace pyadapt::cpu;

constexpr int64_t kRowBlock = 48;       // rows per cache block (a multiple of kMicroRows)
// Deterministic reduction chunks (rows per chunk depend on M only): at most kMaxChunks partial
// buffers; kMinChunkRows rows or more each, unless that leaves fewer than kMinChunks chunks
// (small batches: a chunk is the unit of parallel work, so one chunk would run on one thread).
constexpr int64_t kMinChunkRows = 192;
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kMinChunks = 8;

// PYADAPT_POISON_OUTPUTS=1 (tests): outputs and scratch start as NaN instead of uninitialised or
// zero memory, so an element the kernel leaves unwritten, or a scratch value it reads before
// writing, shows up in the comparison with the reference.
inline bool poison_outputs() {
  const char* v = std::getenv("PYADAPT_POISON_OUTPUTS");
  return v != nullptr && v[0] == '1';
}

template <typename S>
struct ComputeOf { using type = float; };
template <>
struct ComputeOf<double> { using type = double; };

// Storage <-> compute conversions of a row. c10::Half's scalar conversion does not vectorise:
// float16 uses the F16C instructions where the compiler targets them (round to nearest even,
// as c10::Half does).
template <typename S, typename C>
inline void widen(const S* __restrict__ src, C* __restrict__ dst, int64_t n) {
  int64_t j = 0;
  if constexpr (std::is_same_v<S, C>) {
    std::memcpy(dst, src, size_t(n) * sizeof(C));
    return;
  }
#if defined(__F16C__)
  if constexpr (std::is_same_v<S, c10::Half> && std::is_same_v<C, float>) {
    for (; j + 8 <= n; j += 8)
      _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(
                                    reinterpret_cast<const __m128i*>(src + j))));
  }
#endif
  for (; j < n; ++j) dst[j] = static_cast<C>(src[j]);
}

template <typename S, typename C>
inline void narrow(const C* __restrict__ src, S* __restrict__ dst, int64_t n) {
  int64_t j = 0;
  if constexpr (std::is_same_v<S, C>) {
    std::memcpy(dst, src, size_t(n) * sizeof(C));
    return;
  }
#if defined(__F16C__)
  if constexpr (std::is_same_v<S, c10::Half> && std::is_same_v<C, float>) {
    for (; j + 8 <= n; j += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
  }
#endif
  for (; j < n; ++j) dst[j] = static_cast<S>(src[j]);
}

// A storage row in the compute type: the row itself when the types agree, else widened into buf.
template <typename S, typename C>
inline const C* row_in_compute(const S* row, C* buf, int64_t n) {
  if constexpr (std::is_same_v<S, C>) {
    return row;
  } else {
    widen<S, C>(row, buf, n);
    return buf;
  }
}

// Whether an output of `bytes` is written with streaming stores: only outputs far larger than
// the per-core caches (then its lines would be evicted before anyone reads them back, and
// fetching them for ownership only costs bandwidth). PYADAPT_CPU_STREAM=0/1 overrides.
inline bool streams_output(int64_t bytes) {
  const char* v = std::getenv("PYADAPT_CPU_STREAM");
  if (v != nullptr && (v[0] == '0' || v[0] == '1')) return v[0] == '1';
  return bytes >= (int64_t(8) << 20);
}

// Orders a thread's streaming stores before the parallel region ends.
inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// Epilogue segments of gemm.h's wide tiles: columns j..j+n (n <= NV * L) of a storage row as
// NV compute-type vectors (zero past n), and back (only n values written, rounded once for
// low-precision storage; streamed past the caches when asked, see streams_output).
template <typename S, typename C, int NV>
inline void load_seg(const S* src, int64_t n, typename GemmVec<C>::V (&v)[NV]) {
  using G = GemmVec<C>;
  if constexpr (std::is_same_v<S, C>) {
    if (n == NV * G::L) {
      for (int k = 0; k < NV; ++k) v[k] = *reinterpret_cast<const typename G::U*>(src + k * G::L);
      return;
    }
  }
  alignas(64) C buf[NV * G::L] = {};
  widen<S, C>(src, buf, n);
  std::memcpy(v, buf, sizeof(buf));
}

template <typename S, typename C, int NV>
inline void store_seg(const typename GemmVec<C>::V (&v)[NV], S* dst, int64_t n, bool stream) {
  using G = GemmVec<C>;
  if constexpr (std::is_same_v<S, C>) {
    if (n == NV * G::L) {
#if defined(__AVX512F__)
      if constexpr (kGemmVecBytes == 64) {
        if (stream && (reinterpret_cast<uintptr_t>(dst) & 63) == 0) {
          for (int k = 0; k < NV; ++k) {
            if constexpr (std::is_same_v<C, float>)
              _mm512_stream_ps(dst + k * G::L, reinterpret_cast<__m512>(v[k]));
            else
              _mm512_stream_pd(dst + k * G::L, reinterpret_cast<__m512d>(v[k]));
          }
          return;
        }
      }
#endif
#if defined(__AVX__)
      if constexpr (kGemmVecBytes == 32) {
        if (stream && (reinterpret_cast<uintptr_t>(dst) & 31) == 0) {
          for (int k = 0; k < NV; ++k) {
            if constexpr (std::is_same_v<C, float>)
              _mm256_stream_ps(dst + k * G::L, reinterpret_cast<__m256>(v[k]));
            else
              _mm256_stream_pd(dst + k * G::L, reinterpret_cast<__m256d>(v[k]));
          }
          return;
        }
      }
#endif
      for (int k = 0; k < NV; ++k) *reinterpret_cast<typename G::U*>(dst + k * G::L) = v[k];
      return;
    }
  }
  alignas(64) C buf[NV * G::L];
  std::memcpy(buf, v, sizeof(buf));
  narrow<S, C>(buf, dst, n);
}

// The vectors in an epilogue's argument (gemm.h hands NV of them, NV set by the tile shape).
template <typename VA>
constexpr int nvec() { return int(std::extent_v<std::remove_reference_t<VA>>); }

// Prefetches the cache lines of n values from p: the next block's rows, requested while this
// block's output is written (the down product reads 48 rows at once, too many streams for the
// hardware prefetcher).
template <typename S>
inline void prefetch_row(const S* p, int64_t n) {
  for (int64_t c = 0; c < n; c += int64_t(64 / sizeof(S))) __builtin_prefetch(p + c, 0, 3);
}

struct Params {
  int64_t M, d, r;
  int64_t rp, dp;  // r and d padded to the GEMM tile width (zero columns in packed weights)
  bool shared;
  Act act;
  double scale;
  double p;
  uint64_t seed;
  // Philox row of each local row (null: the row index itself). A caller that runs a subset of a
  // larger batch (the adapter bank, one group at a time) passes the rows' batch indices, so the
  // mask is that of the whole batch.
  const int64_t* drop_rows = nullptr;
};

inline uint64_t philox_row(const Params& P, int64_t row) {
  return uint64_t(P.drop_rows ? P.drop_rows[row] : row);
}

// Weights and biases in the compute type, packed: the products of a row block with a weight
// in gemm.h's panels (narrow: r columns, wide: d columns), the shared layer's for gemm_acc
// (zero-padded columns).
template <typename C>
using NarrowB = PackedB<C, NarrowTile<C>::NR>;
template <typename C>
using WideB = PackedB<C, WideTile<C>::NR>;

template <typename C>
struct Packed {
  std::unique_ptr<NarrowB<C>> down_t;  // (d x r): down^T, the forward's x -> pre1
  std::unique_ptr<WideB<C>> up_t;      // (r x d): up^T, the forward's hin -> y
  std::unique_ptr<NarrowB<C>> up;      // (d x r): up, the backward's g_u -> dh
  std::unique_ptr<WideB<C>> down;      // (r x d): down, dpre1 -> dx
  std::vector<C> wsT;  // (r, rp): shared^T
  std::vector<C> ws;   // (r, rp): shared, dpre2 -> dh1
  std::vector<C> wu;   // (d, r): up as given (dscale)
  std::vector<C> bd, bs, bu, rs;  // empty when absent; bu padded to a whole wide tile
};

template <typename S, typename C>
std::vector<C> to_compute(const at::Tensor& t) {
  std::vector<C> out;
  if (!t.defined()) return out;
  out.resize(size_t(t.numel()));
  widen<S, C>(t.data_ptr<S>(), out.data(), t.numel());
  return out;
}

// w (R x K, storage type S) packed as gemm.h's B operand: K x R (transposed) or R x K.
template <typename C, int NR, typename S>
std::unique_ptr<PackedB<C, NR>> pack_b_of(const at::Tensor& w, bool transpose) {
  const int64_t R = w.size(0), K = w.size(1);
  const S* p = w.data_ptr<S>();
  auto out = transpose ? std::make_unique<PackedB<C, NR>>(K, R)
                       : std::make_unique<PackedB<C, NR>>(R, K);
  out->pack(transpose ? View<S>{p, 1, K} : View<S>{p, K, 1});
  return out;
}

// out (rows_out, ld) with out[i * ld + j] = w[j * rows_out + i] (transposed) or w[i * cols + j].
template <typename S, typename C>
std::vector<C> pack(const at::Tensor& w, bool transpose, int64_t ld) {
  const int64_t R = w.size(0), K = w.size(1);
  const S* p = w.data_ptr<S>();
  const int64_t rows = transpose ? K : R, cols = transpose ? R : K;
  std::vector<C> out(size_t(rows * ld));
  // in parallel (small batches spend a visible share of the call here), transposes by 16 x 16
  // tiles so both sides are read and written a cache line at a time
  constexpr int64_t T = 16;
  at::parallel_for(0, (rows + T - 1) / T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t i0 = t0 * T; i0 < std::min(rows, t1 * T); i0 += T) {
      const int64_t i1 = std::min(rows, i0 + T);
      for (int64_t j0 = 0; j0 < cols; j0 += T)
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = j0; j < std::min(cols, j0 + T); ++j)
            out[i * ld + j] = static_cast<C>(transpose ? p[j * K + i] : p[i * K + j]);
      for (int64_t i = i0; i < i1; ++i) std::fill(out.begin() + i * ld + cols, out.begin() + (i + 1) * ld, C(0));
    }
  });
  return out;
}

template <typename S, typename C>
Packed<C> pack_all(const Params& P, const at::Tensor& wd, const at::Tensor& bd,
                   const at::Tensor& ws, const at::Tensor& bs, const at::Tensor& wu,
                   const at::Tensor& bu, const at::Tensor& rs, bool backward,
                   bool have_pre = false) {
  Packed<C> k;
  // the products that form pre1 / pre2: not needed by a backward given the saved ones
  if (!have_pre) {
    k.down_t = pack_b_of<C, NarrowTile<C>::NR, S>(wd, true);
    if (P.shared) k.wsT = pack<S, C>(ws, true, P.rp);
  }
  if (!backward) k.up_t = pack_b_of<C, WideTile<C>::NR, S>(wu, true);  // u = hin W_u^T
  if (backward) {
    k.up = pack_b_of<C, NarrowTile<C>::NR, S>(wu, false);
    k.down = pack_b_of<C, WideTile<C>::NR, S>(wd, false);
    if (P.shared) k.ws = pack<S, C>(ws, false, P.rp);
    k.wu = to_compute<S, C>(wu);
  }
  k.bd = to_compute<S, C>(bd);
  k.bs = to_compute<S, C>(bs);
  k.bu = to_compute<S, C>(bu);
  if (!k.bu.empty()) k.bu.resize(size_t(round_up(P.d, WideTile<C>::NR)), C(0));
  k.rs = to_compute<S, C>(rs);
  return k;
}

// Fill `rows` rows of out (stride ld, n columns) with a bias row, or zeros.
template <typename C>
inline void fill_rows(C* out, int64_t rows, int64_t ld, const std::vector<C>& bias, int64_t n) {
  for (int64_t i = 0; i < rows; ++i) {
    C* o = out + i * ld;
    if (bias.empty())
      std::fill(o, o + ld, C(0));
    else {
      std::copy(bias.begin(), bias.begin() + n, o);
      std::fill(o + n, o + ld, C(0));
    }
  }
}

// Per-thread scratch of one row block, all in the compute type with padded strides.
template <typename C>
struct Scratch {
  std::vector<C> buf;
  C *xb, *pre1, *h1, *pre2, *hin, *dh, *dh1, *gu;
  Scratch(const Params& P, bool backward) {
    const int64_t B = kRowBlock, rp = P.rp, dp = P.dp;
    const int64_t small = B * rp;
    buf.assign(size_t(B * dp + (backward ? 6 : 4) * small + (backward ? B * dp : 0)),
               poison_outputs() ? std::numeric_limits<C>::quiet_NaN() : C(0));
    C* p = buf.data();
    xb = p; p += B * dp;
    pre1 = p; p += small;
    h1 = p; p += small;
    pre2 = p; p += small;
    hin = p; p += small;
    dh = backward ? p : nullptr; p += backward ? small : 0;
    dh1 = backward ? p : nullptr; p += backward ? small : 0;
    gu = backward ? p : nullptr;
  }
};

// Per-thread scratch of gemm_serial for the products with packed weights (present ones only).
template <typename C>
struct ProductScratch {
  std::unique_ptr<SerialScratch<C, NarrowTile<C>>> down_t, up;
  std::unique_ptr<SerialScratch<C, WideTile<C>>> up_t, down;
  explicit ProductScratch(const Packed<C>& W) {
    if (W.down_t) down_t = std::make_unique<SerialScratch<C, NarrowTile<C>>>(*W.down_t, kRowBlock);
    if (W.up) up = std::make_unique<SerialScratch<C, NarrowTile<C>>>(*W.up, kRowBlock);
    if (W.up_t) up_t = std::make_unique<SerialScratch<C, WideTile<C>>>(*W.up_t, kRowBlock);
    if (W.down) down = std::make_unique<SerialScratch<C, WideTile<C>>>(*W.down, kRowBlock);
  }
};

// Writes a narrow product's row segment (columns j.. of an r-wide result) into a scratch row of
// stride rp: value * mult + bias (bias null: none), only the columns below rp (the pad columns
// past r come out zero: B is zero-padded and there is no bias there).
template <typename C, typename VA>
inline void narrow_store(C* row, int64_t j, const VA& v, int64_t rp, int64_t r, C mult,
                         const C* bias) {
  constexpr int NV = nvec<VA>();
  alignas(64) C buf[NV * GemmVec<C>::L];
  std::memcpy(buf, &v, sizeof(buf));
  const int64_t n = std::min<int64_t>(NV * GemmVec<C>::L, rp - j);
  for (int64_t c = 0; c < n; ++c)
    row[j + c] = buf[c] * mult + (bias && j + c < r ? bias[j + c] : C(0));
}

// The x rows of a block in the compute type, readable up to column dp: the storage itself when
// it already is (and d needs no padding), else widened into the scratch block.
template <typename S, typename C>
inline const C* block_x(const S* x, int64_t row0, int64_t rows, const Params& P, C* xb,
                        int64_t& ldx) {
  if constexpr (std::is_same_v<S, C>) {
    if (P.dp == P.d) {
      ldx = P.d;
      return x + row0 * P.d;
    }
  }
  ldx = P.dp;
  for (int64_t i = 0; i < rows; ++i) widen<S, C>(x + (row0 + i) * P.d, xb + i * P.dp, P.d);
  return xb;
}

// Width of the saved pre-activations of a row: pre1 (r), then pre2 (r) when shared.
inline int64_t saved_width(const Params& P) { return P.shared ? 2 * P.r : P.r; }

// rows x r values of `src` (row stride ld) into dst with stride rp, zero pad columns.
template <typename C>
inline void copy_padded(const C* src, int64_t ld, int64_t rows, int64_t r, int64_t rp, C* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    std::copy(src + i * ld, src + i * ld + r, dst + i * rp);
    std::fill(dst + i * rp + r, dst + (i + 1) * rp, C(0));
  }
}

// Forward of one row block up to the input of `up`: pre1/h1 (rows x r), pre2 (when shared) and
// hin (after dropout), all with stride rp (pad columns zero: act(0) = 0 for every activation).
// saved (the forward's pre-activations, row stride saved_width) replaces the down and shared
// products when given: the backward then costs no product over d for them.
template <typename C>
void bottleneck_rows(const C* xb, int64_t ldx, const C* saved, int64_t row0, int64_t rows,
                     const Params& P, const Packed<C>& W, Scratch<C>& s, ProductScratch<C>& ps) {
  const int64_t r = P.r, rp = P.rp, sw = saved_width(P);
  if (saved) {
    copy_padded(saved + row0 * sw, sw, rows, r, rp, s.pre1);
  } else {
    // pre1 = x W_d^T + b_d
    const C* bias = W.bd.empty() ? nullptr : W.bd.data();
    gemm_serial<C, NarrowTile<C>>(rows, View<C>{xb, ldx, 1}, *W.down_t, *ps.down_t,
                                  [&](int64_t i, int64_t j, const auto& v) {
      narrow_store(s.pre1 + i * rp, j, v, rp, r, C(1), bias);
    });
  }
  for (int64_t i = 0; i < rows * rp; ++i) s.h1[i] = act_fwd(s.pre1[i], P.act);
  const C* h = s.h1;
  if (P.shared) {
    if (saved) {
      copy_padded(saved + row0 * sw + r, sw, rows, r, rp, s.pre2);
    } else {
      fill_rows(s.pre2, rows, rp, W.bs, r);
      gemm_acc<C>(rows, rp, r, s.h1, rp, 1, W.wsT.data(), rp, s.pre2, rp);
    }
    for (int64_t i = 0; i < rows * rp; ++i) s.hin[i] = act_fwd(s.pre2[i], P.act);
  } else {
    std::copy(h, h + rows * rp, s.hin);
  }
  if (P.p > 0.0) {
    const float pf = float(P.p);
    const C mult = C(1.0 / (1.0 - P.p));
    for (int64_t i = 0; i < rows; ++i) {
      C* hi = s.hin + i * rp;
      const uint64_t base = philox_row(P, row0 + i) * uint64_t(r);
      for (int64_t k = 0; k < r; ++k)
        hi[k] = philox_uniform(P.seed, base + uint64_t(k)) >= pf ? hi[k] * mult : C(0);
    }
  }
}

template <typename S>
void forward_impl(const at::Tensor& x, const at::Tensor& res, const at::Tensor& wd,
                  const at::Tensor& bd, const at::Tensor& ws, const at::Tensor& bs,
                  const at::Tensor& wu, const at::Tensor& bu, const at::Tensor& rs,
                  const Params& P, at::Tensor& y, at::Tensor& saved) {
  using C = typename ComputeOf<S>::type;
  const int64_t d = P.d, rp = P.rp;
  const Packed<C> W = pack_all<S, C>(P, wd, bd, ws, bs, wu, bu, rs, false);
  const S* xp = x.data_ptr<S>();
  const S* resp = res.defined() ? res.data_ptr<S>() : xp;
  S* yp = y.data_ptr<S>();
  C* const savep = saved.defined() ? saved.data_ptr<C>() : nullptr;
  const C scale = C(P.scale);
  const bool has_rs = !W.rs.empty();
  const int64_t nblocks = (P.M + kRowBlock - 1) / kRowBlock;
  const bool stream = streams_output(P.M * d * int64_t(sizeof(S)));
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    Scratch<C> s(P, false);
    ProductScratch<C> ps(W);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row0 = b * kRowBlock, rows = std::min(kRowBlock, P.M - row0);
      int64_t ldx;
      const C* xb = block_x<S, C>(xp, row0, rows, P, s.xb, ldx);
      bottleneck_rows<C>(xb, ldx, nullptr, row0, rows, P, W, s, ps);
      if (savep) {
        const int64_t sw = saved_width(P);
        for (int64_t i = 0; i < rows; ++i) {
          C* o = savep + (row0 + i) * sw;
          std::copy(s.pre1 + i * rp, s.pre1 + i * rp + P.r, o);
          if (P.shared) std::copy(s.pre2 + i * rp, s.pre2 + i * rp + P.r, o + P.r);
        }
      }
      // up projection with the epilogue fused: y = residual + (u * scale) * row_scale,
      // u = hin W_u^T + b_u, each y element written once
      gemm_serial<C, WideTile<C>>(rows, View<C>{s.hin, rp, 1}, *W.up_t, *ps.up_t,
                                  [&](int64_t i, int64_t j, const auto& acc) {
        constexpr int NV = nvec<decltype(acc)>();
        using V = typename GemmVec<C>::V;
        using U = typename GemmVec<C>::U;
        const int64_t row = row0 + i, n = std::min<int64_t>(NV * GemmVec<C>::L, d - j);
        const C f = has_rs ? W.rs[row] : C(1);
        V res[NV], out[NV];
        load_seg<S, C, NV>(resp + row * d + j, n, res);
        for (int k = 0; k < NV; ++k) {
          const V b = W.bu.empty() ? V{} : *reinterpret_cast<const U*>(W.bu.data() + j + k * GemmVec<C>::L);
          // (u * scale) * row_scale, u = acc + b_u: the reference's order of operations
          out[k] = ((acc[k] + b) * scale) * f + res[k];
        }
        store_seg<S, C, NV>(out, yp + row * d + j, n, stream);
        if (row + kRowBlock < P.M) prefetch_row(xp + (row + kRowBlock) * d + j, n);
      });
    }
    if (stream) stream_fence();
  });
}

template <typename S>
std::vector<at::Tensor> backward_impl(const at::Tensor& gy, const at::Tensor& x, bool has_residual,
                                      const at::Tensor& wd, const at::Tensor& bd,
                                      const at::Tensor& ws, const at::Tensor& bs,
                                      const at::Tensor& wu, const at::Tensor& bu,
                                      const at::Tensor& rs, const at::Tensor& saved,
                                      const Params& P, bool need_dx, bool need_dscale,
                                      bool gsi) {
  using C = typename ComputeOf<S>::type;
  const int64_t M = P.M, d = P.d, r = P.r, rp = P.rp, dp = P.dp;
  const auto opts = x.options();
  at::Tensor dx = need_dx ? at::empty({M, d}, opts) : at::empty({0}, opts);
  if (need_dx && poison_outputs()) dx.fill_(std::numeric_limits<double>::quiet_NaN());
  // Reduction chunks: a fixed row count that depends on M only.
  int64_t chunk_rows = std::max({int64_t(1), (M + kMaxChunks - 1) / kMaxChunks,
                                 std::min(kMinChunkRows, (M + kMinChunks - 1) / kMinChunks)});
  chunk_rows = round_up(chunk_rows, kRowBlock);
  const int64_t nchunks = std::max<int64_t>(1, (M + chunk_rows - 1) / chunk_rows);
  // Partial layout per chunk (padded columns): dWd^T (d,rp) | dWs (r,rp) | dWu (d,rp). dW_d is
  // accumulated transposed: as x^T dpre1 its product has d rows (whole 6-row register tiles)
  // where dpre1^T x would have r (r = 32: five tiles and a 2-row remainder).
  const int64_t o_wd = 0, o_ws = o_wd + d * rp, o_wu = o_ws + r * rp, psize = o_wu + d * rp;
  // Uninitialised here: each chunk zeroes its own partial on the thread that fills it (in
  // that core's cache, in parallel), not one serial pass over all of them.
  std::unique_ptr<C[]> partial(new C[size_t(nchunks * psize)]);
  // Bias gradients are plain sums over rows (short, cancelling for small r): accumulated in
  // double, in their own partials: db_d (r) | db_s (r) | db_u (d) | dscale (set at the end).
  const int64_t b_bd = 0, b_bs = r, b_bu = 2 * r, b_sc = 2 * r + d, bsize = b_sc + 1;
  std::vector<double> bpartial(size_t(nchunks * bsize), 0.0);

  const Packed<C> W = pack_all<S, C>(P, wd, bd, ws, bs, wu, bu, rs, true, saved.defined());
  const S* xp = x.data_ptr<S>();
  const S* gyp = gy.data_ptr<S>();
  S* dxp = need_dx ? dx.data_ptr<S>() : nullptr;
  const C scale = C(P.scale);
  const bool has_rs = !W.rs.empty();
  const bool direct_g = std::is_same_v<S, C> && d == dp && !has_rs;
  const C* const savedp = saved.defined() ? saved.data_ptr<C>() : nullptr;

  const bool stream = need_dx && streams_output(M * d * int64_t(sizeof(S)));
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    Scratch<C> s(P, true);
    ProductScratch<C> ps(W);
    std::vector<C> colsum(static_cast<size_t>(dp), C(0));
    for (int64_t c = c0; c < c1; ++c) {
      C* part = partial.get() + c * psize;
      std::fill(part, part + psize, C(0));
      double* bpart = bpartial.data() + c * bsize;
      C* pwd = part + o_wd; C* pws = part + o_ws; C* pwu = part + o_wu;
      double* pbd = bpart + b_bd; double* pbs = bpart + b_bs; double* pbu = bpart + b_bu;
      const int64_t cend = std::min(M, (c + 1) * chunk_rows);
      for (int64_t row0 = c * chunk_rows; row0 < cend; row0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, cend - row0);
        int64_t ldx;
        const C* xb = block_x<S, C>(xp, row0, rows, P, s.xb, ldx);
        bottleneck_rows<C>(xb, ldx, savedp, row0, rows, P, W, s, ps);
        // gr = row_scale * g: grad_y's rows themselves when they already are that (compute
        // dtype, no padding, no row_scale), else widened / scaled into the scratch (zero pad
        // columns). scale is applied to the r-wide dh and, once, to the reduced dW_u / db_u,
        // never to a d-wide copy of g. db_u / scale += column sums of gr.
        const C* gr;
        int64_t ldg;
        if (direct_g) {
          gr = reinterpret_cast<const C*>(gyp) + row0 * d;
          ldg = d;
        } else {
          for (int64_t i = 0; i < rows; ++i) {
            const int64_t row = row0 + i;
            C* gi = s.gu + i * dp;
            const C* g = row_in_compute<S, C>(gyp + row * d, gi, d);  // widened in place
            if (has_rs) {
              const C rv = W.rs[row];
              for (int64_t j = 0; j < d; ++j) gi[j] = g[j] * rv;
            } else if (g != gi) {
              std::copy(g, g + d, gi);
            }
            for (int64_t j = d; j < dp; ++j) gi[j] = C(0);
          }
          gr = s.gu;
          ldg = dp;
        }
        std::fill(colsum.begin(), colsum.end(), C(0));
        for (int64_t i = 0; i < rows; ++i) {
          const C* __restrict__ gi = gr + i * ldg;
          for (int64_t j = 0; j < d; ++j) colsum[j] += gi[j];
        }
        for (int64_t j = 0; j < d; ++j) pbu[j] += double(colsum[j]);
        // dh = scale * (gr W_u)
        gemm_serial<C, NarrowTile<C>>(rows, View<C>{gr, ldg, 1}, *W.up, *ps.up,
                                      [&](int64_t i, int64_t j, const auto& v) {
          narrow_store(s.dh + i * rp, j, v, rp, r, scale, static_cast<const C*>(nullptr));
        });
        if (P.p > 0.0) {
          const float pf = float(P.p);
          const C mult = C(1.0 / (1.0 - P.p));
          for (int64_t i = 0; i < rows; ++i) {
            C* dhi = s.dh + i * rp;
            const uint64_t base = philox_row(P, row0 + i) * uint64_t(r);
            for (int64_t k = 0; k < r; ++k)
              dhi[k] = philox_uniform(P.seed, base + uint64_t(k)) >= pf ? dhi[k] * mult : C(0);
          }
        }
        if (P.shared) {
          // dpre2 = dh * act'(pre2) (kept in dh); db_s += dpre2; dh1 = dpre2 W_s
          for (int64_t i = 0; i < rows; ++i) {
            C* dhi = s.dh + i * rp;
            const C* p2 = s.pre2 + i * rp;
            for (int64_t k = 0; k < r; ++k) {
              dhi[k] *= act_grad(p2[k], P.act);
              pbs[k] += double(dhi[k]);
            }
          }
          fill_rows(s.dh1, rows, rp, std::vector<C>(), r);
          gemm_acc<C>(rows, rp, r, s.dh, rp, 1, W.ws.data(), rp, s.dh1, rp);
        } else {
          std::copy(s.dh, s.dh + rows * rp, s.dh1);
        }
        // dpre1 = dh1 * act'(pre1) (kept in dh1); db_d += dpre1
        for (int64_t i = 0; i < rows; ++i) {
          C* g1 = s.dh1 + i * rp;
          const C* p1 = s.pre1 + i * rp;
          for (int64_t k = 0; k < r; ++k) {
            g1[k] *= act_grad(p1[k], P.act);
            pbd[k] += double(g1[k]);
          }
        }
        // Weight gradients of the block: dW_u / scale += gr^T hin, dW_s += dpre2^T h1,
        // dW_d^T += x^T dpre1
        gemm_acc<C>(d, rp, rows, gr, 1, ldg, s.hin, rp, pwu, rp);
        if (P.shared) gemm_acc<C>(r, rp, rows, s.dh, 1, rp, s.h1, rp, pws, rp);
        gemm_acc<C>(d, rp, rows, xb, 1, ldx, s.dh1, rp, pwd, rp);
        // dx = dpre1 W_d (+ g when the residual is x itself)
        if (dxp) {
          gemm_serial<C, WideTile<C>>(rows, View<C>{s.dh1, rp, 1}, *W.down, *ps.down,
                                      [&](int64_t i, int64_t j, const auto& acc) {
            constexpr int NV = nvec<decltype(acc)>();
            using V = typename GemmVec<C>::V;
            const int64_t row = row0 + i, n = std::min<int64_t>(NV * GemmVec<C>::L, d - j);
            V out[NV];
            if (!has_residual) {  // the residual is x itself: its identity path
              load_seg<S, C, NV>(gyp + row * d + j, n, out);
              for (int k = 0; k < NV; ++k) out[k] = out[k] + acc[k];
            } else {
              for (int k = 0; k < NV; ++k) out[k] = acc[k];
            }
            store_seg<S, C, NV>(out, dxp + row * d + j, n, stream);
            if (row + kRowBlock < M) {  // the next block's x and grad_y (see the forward)
              prefetch_row(xp + (row + kRowBlock) * d + j, n);
              prefetch_row(gyp + (row + kRowBlock) * d + j, n);
            }
          });
        }
      }
    }
    if (stream) stream_fence();
  });

  // Fixed-order sum of the chunk partials (parallel over elements: still deterministic).
  const auto copts = opts.dtype(c10::CppTypeToScalarType<C>::value);
  at::Tensor total = at::empty({psize}, copts);
  C* tp = total.data_ptr<C>();
  const C* pp = partial.get();
  at::parallel_for(0, psize, 4096, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) tp[e] = C(0);
    for (int64_t c = 0; c < nchunks; ++c) {
      const C* pc = pp + c * psize;
      for (int64_t e = e0; e < e1; ++e) tp[e] += pc[e];
    }
  });
  std::vector<double> bsum(size_t(bsize), 0.0);
  for (int64_t e = 0; e < bsize; ++e)
    for (int64_t c = 0; c < nchunks; ++c) bsum[e] += bpartial[c * bsize + e];
  // dW_u and db_u were summed without scale (as gr^T hin and colsum(gr)). With
  // u = hin W_u^T + b_u, dscale = sum(row_scale * g * u) = <W_u, gr^T hin> + <b_u, colsum(gr)>:
  // from those sums, with no product over the rows. Then dW_u and db_u get their scale.
  if (need_dscale) {
    double ds = 0.0;
    for (int64_t j = 0; j < d; ++j)
      for (int64_t k = 0; k < r; ++k)
        ds += double(W.wu[j * r + k]) * double(tp[o_wu + j * rp + k]);
    if (!W.bu.empty())
      for (int64_t j = 0; j < d; ++j) ds += double(W.bu[j]) * bsum[b_bu + j];
    bsum[b_sc] = ds;
  }
  for (int64_t e = o_wu; e < o_wu + d * rp; ++e) tp[e] *= scale;
  for (int64_t j = 0; j < d; ++j) bsum[b_bu + j] *= P.scale;
  at::Tensor btotal = at::empty({bsize}, copts);
  C* bt = btotal.data_ptr<C>();
  for (int64_t e = 0; e < bsize; ++e) bt[e] = C(bsum[e]);
  if (gsi) {
    total.div_(P.scale);
    btotal.div_(P.scale);
  }
  const auto dt = x.scalar_type();
  auto mat = [&](int64_t off, int64_t rows, int64_t ld, int64_t cols) {
    // a fresh tensor per gradient (no output aliases another), rounded once to the storage dtype
    return at::empty({rows, cols}, opts).copy_(total.narrow(0, off, rows * ld).view({rows, ld}).narrow(1, 0, cols));
  };
  auto vecv = [&](int64_t off, int64_t n) {
    return btotal.narrow(0, off, n).to(dt).clone();
  };
  at::Tensor empty = at::empty({0}, opts);
  return {dx,
          at::empty({r, d}, opts).copy_(
              total.narrow(0, o_wd, d * rp).view({d, rp}).narrow(1, 0, r).t()),
          bd.defined() ? vecv(b_bd, r) : empty,
          P.shared ? mat(o_ws, r, rp, r) : empty,
          bs.defined() ? vecv(b_bs, r) : empty,
          mat(o_wu, d, rp, r),
          bu.defined() ? vecv(b_bu, d) : empty,
          btotal.narrow(0, b_sc, 1).to(dt).view(std::vector<int64_t>{}).clone()};
}

at::Tensor opt_contig(const c10::optional<at::Tensor>& t, at::ScalarType dtype) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return t->to(dtype).contiguous();
}

void check_dtype(at::ScalarType dt) {
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "bottleneck cpu: x must be float32, float64, bfloat16 or float16, got ", dt);
}

Params make_params(const at::Tensor& x, const at::Tensor& wd, bool shared, const std::string& act,
                   double scale, double p, const c10::optional<at::Tensor>& seed) {
  TORCH_CHECK(x.dim() == 2 && wd.dim() == 2, "bottleneck: x and down_weight must be 2-D");
  TORCH_CHECK(x.device().is_cpu(), "bottleneck (cpu backend): expected CPU tensors");
  Params P;
  P.M = x.size(0);
  P.d = x.size(1);
  P.r = wd.size(0);
  const int64_t nc = x.scalar_type() == at::kDouble ? tile_cols<double>() : tile_cols<float>();
  P.rp = round_up(P.r, nc);
  P.dp = round_up(P.d, nc);
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

// dropout_rows (M,) int64, optional: see Params::drop_rows.
at::Tensor dropout_row_ids(const c10::optional<at::Tensor>& rows, Params& P) {
  if (!rows.has_value() || !rows->defined()) return at::Tensor();
  TORCH_CHECK(rows->dim() == 1 && rows->size(0) == P.M && rows->scalar_type() == at::kLong,
              "bottleneck: dropout_rows must be int64 of shape (M,)");
  at::Tensor t = rows->contiguous();
  P.drop_rows = t.data_ptr<int64_t>();
  return t;
}

// The compute dtype's scalar type (float32 storage for every low-precision dtype).
at::ScalarType compute_type(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

// y, and with save_pre the rows' pre-activations (M x saved_width, compute dtype) for the
// backward, which then skips the down (and shared) products.
std::vector<at::Tensor> forward_cpu(const at::Tensor& x_, const c10::optional<at::Tensor>& residual,
                                    const at::Tensor& wd_, const c10::optional<at::Tensor>& bd_,
                                    const c10::optional<at::Tensor>& ws_,
                                    const c10::optional<at::Tensor>& bs_, const at::Tensor& wu_,
                                    const c10::optional<at::Tensor>& bu_, double scale,
                                    const c10::optional<at::Tensor>& row_scale,
                                    const c10::optional<at::Tensor>& seed,
                                    const std::string& activation, double dropout_p,
                                    const c10::optional<at::Tensor>& dropout_rows, bool save_pre) {
  const auto dt = x_.scalar_type();
  check_dtype(dt);
  at::Tensor x = x_.contiguous();
  at::Tensor res = opt_contig(residual, dt);
  const bool shared = ws_.has_value() && ws_->defined();
  Params P = make_params(x, wd_, shared, activation, scale, dropout_p, seed);
  at::Tensor drop_rows = dropout_row_ids(dropout_rows, P);
  at::Tensor wd = wd_.to(dt).contiguous(), wu = wu_.to(dt).contiguous();
  at::Tensor bd = opt_contig(bd_, dt), ws = opt_contig(ws_, dt), bs = opt_contig(bs_, dt),
             bu = opt_contig(bu_, dt), rs = opt_contig(row_scale, dt);
  at::Tensor y = at::empty({P.M, P.d}, x.options());
  at::Tensor saved = save_pre ? at::empty({P.M, saved_width(P)}, x.options().dtype(compute_type(dt)))
                              : at::Tensor();
  if (P.M == 0) return {y, save_pre ? saved : at::empty({0}, x.options())};
  if (poison_outputs()) {
    y.fill_(std::numeric_limits<double>::quiet_NaN());
    if (save_pre) saved.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "bottleneck_forward_cpu", [&] {
    forward_impl<scalar_t>(x, res, wd, bd, ws, bs, wu, bu, rs, P, y, saved);
  });
  return {y, save_pre ? saved : at::empty({0}, x.options())};
}

at::Tensor bottleneck_forward_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                  const at::Tensor& wd, const c10::optional<at::Tensor>& bd,
                                  const c10::optional<at::Tensor>& ws,
                                  const c10::optional<at::Tensor>& bs, const at::Tensor& wu,
                                  const c10::optional<at::Tensor>& bu, double scale,
                                  const c10::optional<at::Tensor>& row_scale,
                                  const c10::optional<at::Tensor>& seed, std::string activation,
                                  double dropout_p,
                                  const c10::optional<at::Tensor>& dropout_rows) {
  return forward_cpu(x, residual, wd, bd, ws, bs, wu, bu, scale, row_scale, seed, activation,
                     dropout_p, dropout_rows, false)[0];
}

std::vector<at::Tensor> bottleneck_forward_saving_cpu(
    const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& wd,
    const c10::optional<at::Tensor>& bd, const c10::optional<at::Tensor>& ws,
    const c10::optional<at::Tensor>& bs, const at::Tensor& wu,
    const c10::optional<at::Tensor>& bu, double scale, const c10::optional<at::Tensor>& row_scale,
    const c10::optional<at::Tensor>& seed, std::string activation, double dropout_p,
    const c10::optional<at::Tensor>& dropout_rows) {
  return forward_cpu(x, residual, wd, bd, ws, bs, wu, bu, scale, row_scale, seed, activation,
                     dropout_p, dropout_rows, true);
}

std::vector<at::Tensor> bottleneck_backward_cpu(
    const at::Tensor& gy_, const at::Tensor& x_, bool has_residual, const at::Tensor& wd_,
    const c10::optional<at::Tensor>& bd_, const c10::optional<at::Tensor>& ws_,
    const c10::optional<at::Tensor>& bs_, const at::Tensor& wu_,
    const c10::optional<at::Tensor>& bu_, double scale, const c10::optional<at::Tensor>& row_scale,
    const c10::optional<at::Tensor>& seed, std::string activation, double dropout_p,
    bool grad_scale_invariant, bool need_dx, bool need_dscale,
    const c10::optional<at::Tensor>& dropout_rows, const c10::optional<at::Tensor>& saved_pre) {
  const auto dt = x_.scalar_type();
  check_dtype(dt);
  at::Tensor x = x_.contiguous();
  at::Tensor gy = gy_.to(dt).contiguous();
  const bool shared = ws_.has_value() && ws_->defined();
  Params P = make_params(x, wd_, shared, activation, scale, dropout_p, seed);
  at::Tensor drop_rows = dropout_row_ids(dropout_rows, P);
  at::Tensor wd = wd_.to(dt).contiguous(), wu = wu_.to(dt).contiguous();
  at::Tensor bd = opt_contig(bd_, dt), ws = opt_contig(ws_, dt), bs = opt_contig(bs_, dt),
             bu = opt_contig(bu_, dt), rs = opt_contig(row_scale, dt);
  at::Tensor saved;
  if (saved_pre.has_value() && saved_pre->defined()) {
    TORCH_CHECK(saved_pre->dim() == 2 && saved_pre->size(0) == P.M &&
                    saved_pre->size(1) == saved_width(P) &&
                    saved_pre->scalar_type() == compute_type(dt),
                "bottleneck: saved_pre must be the forward's (M, ", saved_width(P), ") ",
                compute_type(dt), " pre-activations");
    saved = saved_pre->contiguous();
  }
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "bottleneck_backward_cpu", [&] {
    out = backward_impl<scalar_t>(gy, x, has_residual, wd, bd, ws, bs, wu, bu, rs, saved, P,
                                  need_dx, need_dscale, grad_scale_invariant);
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
        "float scale, Tensor? row_scale, Tensor? seed, str activation, float dropout_p, "
        "Tensor? dropout_rows=None) -> Tensor");
  m.def("bottleneck_forward_saving(Tensor x, Tensor? residual, Tensor down_weight, "
        "Tensor? down_bias, Tensor? shared_weight, Tensor? shared_bias, Tensor up_weight, "
        "Tensor? up_bias, float scale, Tensor? row_scale, Tensor? seed, str activation, "
        "float dropout_p, Tensor? dropout_rows=None) -> Tensor[]");
  m.def("bottleneck_backward(Tensor grad_y, Tensor x, bool has_residual, Tensor down_weight, "
        "Tensor? down_bias, Tensor? shared_weight, Tensor? shared_bias, Tensor up_weight, "
        "Tensor? up_bias, float scale, Tensor? row_scale, Tensor? seed, str activation, "
        "float dropout_p, bool grad_scale_invariant, bool need_dx, bool need_dscale, "
        "Tensor? dropout_rows=None, Tensor? saved_pre=None) -> Tensor[]");
  m.def("dropout_keep(int seed, int rows, int cols, float p) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyadapt_C, CPU, m) {
  m.impl("bottleneck_forward", &bottleneck_forward_cpu);
  m.impl("bottleneck_forward_saving", &bottleneck_forward_saving_cpu);
  m.impl("bottleneck_backward", &bottleneck_backward_cpu);
}

TORCH_LIBRARY_IMPL(pyadapt_C, CompositeExplicitAutograd, m) {
  m.impl("dropout_keep", &dropout_keep_cpu);
}

}  // namespace pyadapt
