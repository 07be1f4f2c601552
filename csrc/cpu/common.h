// Building blocks shared by the fused CPU kernels in csrc/cpu: activations (the reference's
// formulas), the counter-based dropout mask (Philox4x32-10, bit-equal to Triton's tl.rand and
// pyadapt.reference.philox_uniform), and register-blocked row-times-matrix micro-kernels whose
// summation order depends on the shapes only (deterministic, thread-count independent).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

namespace pyadapt {
namespace cpu {

enum class Act { Relu, Gelu, QuickGelu, Silu, Identity };

inline Act parse_act(const std::string& name) {
  if (name == "relu") return Act::Relu;
  if (name == "gelu") return Act::Gelu;
  if (name == "quick_gelu") return Act::QuickGelu;
  if (name == "silu") return Act::Silu;
  if (name == "identity") return Act::Identity;
  TORCH_CHECK(false, "activation: unknown activation ", name);
}

template <typename T>
inline T act_fwd(T h, Act a) {
  switch (a) {
    case Act::Relu: return h > T(0) ? h : T(0);
    case Act::Gelu: return T(0.5) * h * (T(1) + std::erf(h * T(0.70710678118654752440)));
    case Act::QuickGelu: return h / (T(1) + std::exp(-T(1.702) * h));
    case Act::Silu: return h / (T(1) + std::exp(-h));
    default: return h;
  }
}

template <typename T>
inline T act_grad(T h, Act a) {
  switch (a) {
    case Act::Relu: return h > T(0) ? T(1) : T(0);
    case Act::Gelu: {
      T cdf = T(0.5) * (T(1) + std::erf(h * T(0.70710678118654752440)));
      T pdf = std::exp(T(-0.5) * h * h) * T(0.39894228040143267794);
      return cdf + h * pdf;
    }
    case Act::QuickGelu:
    case Act::Silu: {
      T k = a == Act::QuickGelu ? T(1.702) : T(1);
      T s = T(1) / (T(1) + std::exp(-k * h));
      return s + k * h * s * (T(1) - s);
    }
    default: return T(1);
  }
}

// Philox4x32-10, counter (offset_lo, offset_hi, 0, 0), key (seed_lo, seed_hi): Triton's tl.rand.
inline float philox_uniform(uint64_t seed, uint64_t offset) {
  uint32_t c0 = uint32_t(offset), c1 = uint32_t(offset >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int i = 0; i < 10; ++i) {
    uint64_t pb = uint64_t(c2) * 0xCD9E8D57u;
    uint64_t pa = uint64_t(c0) * 0xD2511F53u;
    uint32_t n0 = uint32_t(pb >> 32) ^ c1 ^ k0;
    uint32_t n1 = uint32_t(pb);
    uint32_t n2 = uint32_t(pa >> 32) ^ c3 ^ k1;
    uint32_t n3 = uint32_t(pa);
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  int32_t v = int32_t(c0);
  if (v < 0) v = -v - 1;
  return float(v) * 4.6566127342e-10f;
}


// out[j] = init[j] (or 0) + sum_k coef[k] * W[k * ld + j] for j < n, k < K: the row-vector times
// matrix product every pass is made of. Columns go in slices of kCols kept in registers across
// the k loop (a constant trip count that gcc vectorises and keeps in vector registers); k runs
// in blocks of kb whose sums are added to the total (a blocked sum, more accurate than one long
// running sum over d). The summation order depends on the shapes only: deterministic.
constexpr int64_t kCols = 32;

template <typename T, int64_t S>
inline void combo_slice(const T* __restrict__ coef, int64_t K, int64_t kb,
                        const T* __restrict__ W, int64_t ld, const T* __restrict__ init,
                        T* __restrict__ out) {
  T tot[S];
  for (int64_t t = 0; t < S; ++t) tot[t] = init ? init[t] : T(0);
  for (int64_t k0 = 0; k0 < K; k0 += kb) {
    const int64_t k1 = std::min(K, k0 + kb);
    T acc[S] = {};
    for (int64_t k = k0; k < k1; ++k) {
      const T c = coef[k];
      const T* __restrict__ w = W + k * ld;
      for (int64_t t = 0; t < S; ++t) acc[t] += c * w[t];
    }
    for (int64_t t = 0; t < S; ++t) tot[t] += acc[t];
  }
  for (int64_t t = 0; t < S; ++t) out[t] = tot[t];
}

template <typename T>
inline void combo(const T* __restrict__ coef, int64_t K, int64_t kb, const T* __restrict__ W,
                  int64_t ld, const T* __restrict__ init, T* __restrict__ out, int64_t n) {
  int64_t j0 = 0;
  for (; j0 + kCols <= n; j0 += kCols)
    combo_slice<T, kCols>(coef, K, kb, W + j0, ld, init ? init + j0 : nullptr, out + j0);
  for (; j0 + 8 <= n; j0 += 8)
    combo_slice<T, 8>(coef, K, kb, W + j0, ld, init ? init + j0 : nullptr, out + j0);
  for (; j0 < n; ++j0)
    combo_slice<T, 1>(coef, K, kb, W + j0, ld, init ? init + j0 : nullptr, out + j0);
}


// combo for `rows` rows at once: out[i * ldo + j] = init_i[j] + sum_k coef[i * ldc + k] W[k, j],
// init_i = init + i * ldi (ldi = 0: one init row shared by all, e.g. a bias; init null: 0).
// Groups of kRowGroup rows share each load of W and keep kRowGroup x S accumulators in
// registers (independent FMA chains instead of one latency-bound chain). Each row's sums are
// the same as combo's for that row, whatever the grouping.
constexpr int64_t kRowGroup = 4;

template <typename T, int64_t S, int64_t NR>
inline void combo_group_slice(const T* __restrict__ coef, int64_t ldc, int64_t K, int64_t kb,
                              const T* __restrict__ W, int64_t ld, const T* __restrict__ init,
                              int64_t ldi, T* __restrict__ out, int64_t ldo) {
  T tot[NR][S];
  for (int64_t q = 0; q < NR; ++q)
    for (int64_t t = 0; t < S; ++t) tot[q][t] = init ? init[q * ldi + t] : T(0);
  for (int64_t k0 = 0; k0 < K; k0 += kb) {
    const int64_t k1 = std::min(K, k0 + kb);
    T acc[NR][S] = {};
    for (int64_t k = k0; k < k1; ++k) {
      const T* __restrict__ w = W + k * ld;
      for (int64_t q = 0; q < NR; ++q) {
        const T c = coef[q * ldc + k];
        for (int64_t t = 0; t < S; ++t) acc[q][t] += c * w[t];
      }
    }
    for (int64_t q = 0; q < NR; ++q)
      for (int64_t t = 0; t < S; ++t) tot[q][t] += acc[q][t];
  }
  for (int64_t q = 0; q < NR; ++q)
    for (int64_t t = 0; t < S; ++t) out[q * ldo + t] = tot[q][t];
}

template <typename T, int64_t NR>
inline void combo_group(const T* __restrict__ coef, int64_t ldc, int64_t K, int64_t kb,
                        const T* __restrict__ W, int64_t ld, const T* __restrict__ init,
                        int64_t ldi, T* __restrict__ out, int64_t ldo, int64_t n) {
  int64_t j0 = 0;
  for (; j0 + kCols <= n; j0 += kCols)
    combo_group_slice<T, kCols, NR>(coef, ldc, K, kb, W + j0, ld, init ? init + j0 : nullptr,
                                    ldi, out + j0, ldo);
  for (; j0 + 8 <= n; j0 += 8)
    combo_group_slice<T, 8, NR>(coef, ldc, K, kb, W + j0, ld, init ? init + j0 : nullptr, ldi,
                                out + j0, ldo);
  for (; j0 < n; ++j0)
    combo_group_slice<T, 1, NR>(coef, ldc, K, kb, W + j0, ld, init ? init + j0 : nullptr, ldi,
                                out + j0, ldo);
}

template <typename T>
inline void combo_rows(int64_t rows, const T* coef, int64_t ldc, int64_t K, int64_t kb,
                       const T* W, int64_t ld, const T* init, int64_t ldi, T* out, int64_t ldo,
                       int64_t n) {
  int64_t i = 0;
  for (; i + kRowGroup <= rows; i += kRowGroup)
    combo_group<T, kRowGroup>(coef + i * ldc, ldc, K, kb, W, ld, init ? init + i * ldi : nullptr,
                              ldi, out + i * ldo, ldo, n);
  for (; i < rows; ++i)
    combo_group<T, 1>(coef + i * ldc, ldc, K, kb, W, ld, init ? init + i * ldi : nullptr, ldi,
                      out + i * ldo, ldo, n);
}

// G[j * ldg + t] += sum_i a[i * lda + j] * b[i * ldb + t] for j < J, t < n, i < rows: a
// rank-`rows` update of a partial weight gradient, each G slice loaded and stored once per block.
template <typename T, int64_t S, int64_t NJ>
inline void rank_update_slice(int64_t rows, const T* __restrict__ a, int64_t lda,
                              const T* __restrict__ b, int64_t ldb, T* __restrict__ g,
                              int64_t ldg) {
  T acc[NJ][S];
  for (int64_t q = 0; q < NJ; ++q)
    for (int64_t t = 0; t < S; ++t) acc[q][t] = g[q * ldg + t];
  for (int64_t i = 0; i < rows; ++i) {
    const T* __restrict__ bi = b + i * ldb;
    for (int64_t q = 0; q < NJ; ++q) {
      const T c = a[i * lda + q];
      for (int64_t t = 0; t < S; ++t) acc[q][t] += c * bi[t];
    }
  }
  for (int64_t q = 0; q < NJ; ++q)
    for (int64_t t = 0; t < S; ++t) g[q * ldg + t] = acc[q][t];
}

template <typename T, int64_t NJ>
inline void rank_update_group(int64_t rows, const T* __restrict__ a, int64_t lda,
                              const T* __restrict__ b, int64_t ldb, T* __restrict__ gj,
                              int64_t ldg, int64_t n) {
  int64_t t0 = 0;
  for (; t0 + kCols <= n; t0 += kCols)
    rank_update_slice<T, kCols, NJ>(rows, a, lda, b + t0, ldb, gj + t0, ldg);
  for (; t0 + 8 <= n; t0 += 8) rank_update_slice<T, 8, NJ>(rows, a, lda, b + t0, ldb, gj + t0, ldg);
  for (; t0 < n; ++t0) rank_update_slice<T, 1, NJ>(rows, a, lda, b + t0, ldb, gj + t0, ldg);
}

// Groups of kRowGroup rows j of G share each load of b (independent FMA chains). Every element
// of G sums its rows i in order: the result does not depend on the grouping.
template <typename T>
inline void rank_update(int64_t rows, int64_t J, const T* __restrict__ a, int64_t lda,
                        const T* __restrict__ b, int64_t ldb, T* __restrict__ G, int64_t ldg,
                        int64_t n) {
  int64_t j = 0;
  for (; j + kRowGroup <= J; j += kRowGroup)
    rank_update_group<T, kRowGroup>(rows, a + j, lda, b, ldb, G + j * ldg, ldg, n);
  for (; j < J; ++j) rank_update_group<T, 1>(rows, a + j, lda, b, ldb, G + j * ldg, ldg, n);
}


// ---------------------------------------------------------------------------------------------
// Register-tiled GEMM for the fused kernels: out[i, j] += sum_k A(i, k) * B[k * ldb + j], with
// A(i, k) = A[i * a_rs + k * a_cs] (a_rs = lda, a_cs = 1: A as stored; a_rs = 1, a_cs = lda: its
// transpose, for weight gradients). Columns come in tiles of two 32-byte vectors, so n must be a
// multiple of tile_cols<T>() and B/out must be readable/writable up to there: callers pad their
// buffers (zero columns). A micro tile keeps kMicroRows x 2 vector accumulators in registers
// (6 x 2 = 12 of the 16 AVX2 registers, the rest for the two B vectors and the broadcast A
// value). 32-byte vectors even where AVX-512 is available: these products are an adapter's
// rank wide (few columns, so many broadcasts of A per FMA), and measured on the AVX-512 CI
// machine (AMD EPYC, 2 threads, M 4096, d 768, r 32) the 64-byte variants were slower: forward +
// backward 9.6 ms (6 x 2 zmm) and 12.1 ms (12 x 2 zmm) against 8.5 ms. k runs in chunks of kGemmChunk; each chunk's sum starts from zero and is added to out
// (a blocked sum: more accurate than one running sum over d, and L1-sized B slices). The order
// of every sum depends on K only, never on m, the tiling of rows or the thread count.
// GCC vector extensions, not intrinsics: the `acc += b * s` lines become FMAs through GCC's
// default contraction in GNU mode (checked in the built .so: 12 ymm accumulators, no spills).
constexpr int kVecBytes = 32;

template <typename T>
struct Vec {
  // register type (naturally aligned) and an alias for unaligned loads and stores
  typedef T type __attribute__((vector_size(kVecBytes)));
  typedef T unaligned __attribute__((vector_size(kVecBytes), aligned(alignof(T))));
};

template <typename T>
constexpr int64_t vec_len() { return int64_t(kVecBytes / sizeof(T)); }

template <typename T>
constexpr int64_t tile_cols() { return 2 * vec_len<T>(); }

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

constexpr int kMicroRows = 6;
constexpr int64_t kGemmChunk = 64;

// The register tile's sums: lo/hi[q] = sum_k A(q, k) B[k * ldb + (0..2L)], k in order.
template <typename T, int MR>
__attribute__((always_inline)) inline void micro_sums(
    int64_t K, const T* __restrict__ A, int64_t a_rs, int64_t a_cs, const T* __restrict__ B,
    int64_t ldb, typename Vec<T>::type (&lo)[MR], typename Vec<T>::type (&hi)[MR]) {
  using V = typename Vec<T>::type;
  using U = typename Vec<T>::unaligned;
  constexpr int64_t L = vec_len<T>();
#pragma GCC unroll 8
  for (int q = 0; q < MR; ++q) {
    lo[q] = V{};
    hi[q] = V{};
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* b = B + k * ldb;
    const V b0 = *reinterpret_cast<const U*>(b);
    const V b1 = *reinterpret_cast<const U*>(b + L);
    const T* a = A + k * a_cs;
#pragma GCC unroll 8
    for (int q = 0; q < MR; ++q) {
      const T s = a[q * a_rs];
      lo[q] += b0 * s;
      hi[q] += b1 * s;
    }
  }
}

template <typename T, int MR>
inline void gemm_micro(int64_t K, const T* __restrict__ A, int64_t a_rs, int64_t a_cs,
                       const T* __restrict__ B, int64_t ldb, T* __restrict__ out, int64_t ldo) {
  using V = typename Vec<T>::type;
  using U = typename Vec<T>::unaligned;
  constexpr int64_t L = vec_len<T>();
  V lo[MR], hi[MR];
  micro_sums<T, MR>(K, A, a_rs, a_cs, B, ldb, lo, hi);
#pragma GCC unroll 8
  for (int q = 0; q < MR; ++q) {
    U* o = reinterpret_cast<U*>(out + q * ldo);
    U* o1 = reinterpret_cast<U*>(out + q * ldo + L);
    *o = *o + lo[q];
    *o1 = *o1 + hi[q];
  }
}

// Calls f(std::integral_constant<int, rows>) for a run-time rows in 1..MAX: the remainder rows
// of a block, each count its own fully unrolled micro tile.
template <int MAX, typename F>
inline void for_rows(int rows, F&& f) {
  if constexpr (MAX >= 1) {
    if (rows == MAX) {
      f(std::integral_constant<int, MAX>{});
      return;
    }
    for_rows<MAX - 1>(rows, f);
  }
}

template <typename T>
inline void gemm_acc(int64_t m, int64_t n, int64_t K, const T* A, int64_t a_rs, int64_t a_cs,
                     const T* B, int64_t ldb, T* out, int64_t ldo) {
  constexpr int64_t NC = tile_cols<T>();
  for (int64_t k0 = 0; k0 < K; k0 += kGemmChunk) {
    const int64_t kk = std::min(kGemmChunk, K - k0);
    for (int64_t j0 = 0; j0 < n; j0 += NC) {
      const T* b = B + k0 * ldb + j0;
      int64_t i0 = 0;
      for (; i0 + kMicroRows <= m; i0 += kMicroRows)
        gemm_micro<T, kMicroRows>(kk, A + i0 * a_rs + k0 * a_cs, a_rs, a_cs, b, ldb,
                                  out + i0 * ldo + j0, ldo);
      if (i0 < m)
        for_rows<kMicroRows - 1>(int(m - i0), [&](auto mr) {
          gemm_micro<T, decltype(mr)::value>(kk, A + i0 * a_rs + k0 * a_cs, a_rs, a_cs, b, ldb,
                                             out + i0 * ldo + j0, ldo);
        });
    }
  }
}

// The same product with the epilogue fused: acc(i, j..j+2L) = sum_k A(i, k) B[k * ldb + j..]
// is summed in registers over all of K in one pass (K is an adapter's rank: short), then
// epi(i, j, lo, hi) gets the two accumulator vectors of columns j..j+2L of row i and writes the
// finished values itself (bias, scale, residual, rounding to the storage type). Every output is
// written once, by the epilogue: no zero or bias fill, no read-modify-write of the output.
// Columns up to n (a multiple of tile_cols<T>(), B padded); the epilogue clips to the real width.
// Sums run over k in order: the result depends on K only, not on m or the thread count.
template <typename T, int MR, typename Epi>
inline void gemm_micro_epi(int64_t K, const T* __restrict__ A, int64_t a_rs, int64_t a_cs,
                           const T* __restrict__ B, int64_t ldb, int64_t i0, int64_t j0,
                           Epi& epi) {
  typename Vec<T>::type lo[MR], hi[MR];
  micro_sums<T, MR>(K, A, a_rs, a_cs, B, ldb, lo, hi);
  for (int q = 0; q < MR; ++q) epi(i0 + q, j0, lo[q], hi[q]);
}

template <typename T, typename Epi>
inline void gemm_epi(int64_t m, int64_t n, int64_t K, const T* A, int64_t a_rs, int64_t a_cs,
                     const T* B, int64_t ldb, Epi&& epi) {
  constexpr int64_t NC = tile_cols<T>();
  for (int64_t j0 = 0; j0 < n; j0 += NC) {
    const T* b = B + j0;
    int64_t i0 = 0;
    for (; i0 + kMicroRows <= m; i0 += kMicroRows)
      gemm_micro_epi<T, kMicroRows>(K, A + i0 * a_rs, a_rs, a_cs, b, ldb, i0, j0, epi);
    if (i0 < m)
      for_rows<kMicroRows - 1>(int(m - i0), [&](auto mr) {
        gemm_micro_epi<T, decltype(mr)::value>(K, A + i0 * a_rs, a_rs, a_cs, b, ldb, i0, j0, epi);
      });
  }
}

}  // namespace cpu
}  // namespace pyadapt
