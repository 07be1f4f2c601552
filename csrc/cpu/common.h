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


// ---------------------------------------------------------------------------------------------
// Register-tiled GEMM for the fused kernels: out[i, j] += sum_k A(i, k) * B[k * ldb + j], with
// A(i, k) = A[i * a_rs + k * a_cs] (a_rs = lda, a_cs = 1: A as stored; a_rs = 1, a_cs = lda: its
// transpose, for weight gradients). Columns come in tiles of two 32-byte vectors, so n must be a
// multiple of tile_cols<T>() and B/out must be readable/writable up to there: callers pad their
// buffers (zero columns). A micro tile keeps kMicroRows x 2 vector accumulators in registers
// (6 x 2 = 12 of the 16 AVX2 registers, the rest for the two B vectors and the broadcast A
// value). 32-byte vectors even where AVX-512 is available: these products are an adapter's
// rank wide (few columns, so many broadcasts of A per FMA); when these tiles still ran every
// bottleneck product, the 64-byte variants measured slower on the AVX-512 CI machine (AMD EPYC,
// 2 threads, M 4096, d 768, r 32, forward + backward): 9.6 ms (6 x 2 zmm) and 12.1 ms (12 x 2)
// against 8.5 ms. The bottleneck kernel uses them for its weight gradients (rank-`rows` updates
// into partials) and the shared layer. k runs in chunks of kGemmChunk; each chunk's sum starts
// from zero and is added to out
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

}  // namespace cpu
}  // namespace pyadapt
