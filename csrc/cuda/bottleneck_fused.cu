// Fused tensor-core kernels of the bottleneck adapter for bfloat16 / float16 storage:
//   y = residual + s * row_scale * (drop(act(shared?(act(x W_d^T + b_d)))) W_u^T + b_u).
// One CTA owns kBM rows, one warp a 16-row strip of them. The forward streams x over d through
// shared memory (cp.async, 16-byte chunks, double buffered) into pre = x W_d^T on tensor cores
// (WMMA, float32 accumulation), applies bias, activation, the shared layer and the dropout to
// the kBM x r block in shared memory, then computes y one kBN-column tile at a time: x, residual
// and y are its only M x d traffic. The backward row kernel computes dh = g W_u, dpre (through
// the shared layer) and dx = dpre1 W_d the same way and writes the M x r inputs of the weight
// gradients, which ops.cpp forms with cuBLAS and fixed-order reductions (no atomics anywhere).
// r is padded with zeros to RP in {32, 64, 128}: WMMA tiles are 16 wide and each warp's strip
// is read a row of 32 lanes at a time.
// Precision: the rank-space values (pre-activations, h, dpre) stay float32. Where one is a
// tensor-core operand it goes in as hi + lo, two values of the storage type (two products),
// and the M x r inputs of the weight gradients leave the same way; so every output is rounded
// once, from float32. Rounding h or dpre to bfloat16 instead would cost little on y and dx but
// decides the scalar-like gradients (dscale, a sum with heavy cancellation; r = 1 biases).
#include <mma.h>

#include "common.cuh"

namespace pyadapt {
namespace cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kBM = 64;  // rows per CTA: enough CTAs for mid-sized M, 4 warps each
constexpr int kWarps = kBM / 16;
constexpr int kFusedThreads = kWarps * 32;
constexpr int kBK = 64;  // d-chunk of the streamed products x W_d^T and g W_u
constexpr int kBN = 64;  // d-tile of the output products h W_u^T and dpre1 W_d
constexpr int kPad = 8;  // elements of padding per shared row of T (16 bytes): consecutive rows
                         // start on different 16-byte bank groups, so a fragment's 8 rows do too
constexpr int kStagePad = 4;  // the same for float32 staging rows

constexpr size_t round_up(size_t bytes) { return (bytes + 127) / 128 * 128; }
constexpr size_t max_of(size_t a, size_t b) { return a > b ? a : b; }

// Shared-memory layout. Both kernels keep one kBM x RP block (the hi halves of h, or of dpre)
// for the whole CTA, followed by a work area that each phase reuses: the streamed chunks; the
// float32 staging rows of the rank-space epilogues, W_s and, past both, the lo halves; the
// output tiles with their staging rows. Every region and fragment starts on a 32-byte boundary,
// as WMMA loads and stores require. In all 32-33, 45 and 70-71 KB for RP = 32, 64, 128: the
// last opts in past the default 48 KB.
template <typename T, int RP>
struct Tiles {
  static constexpr int LDK = kBK + kPad;       // x / g / W_d chunks, kBK columns
  static constexpr int LDR = RP + kPad;        // rank-wide rows: h, dpre, W_u, W_s
  static constexpr int LDN = kBN + kPad;       // W_d tiles of the backward, kBN columns
  static constexpr int LDS_R = RP + kStagePad;  // float32 staging of a 16 x RP strip
  static constexpr int LDS_N = kBN + kStagePad; // float32 staging of a 16 x kBN strip
  static constexpr size_t kBlock = round_up(size_t(kBM) * LDR * sizeof(T));
  static constexpr size_t kStageR = size_t(kWarps) * 16 * LDS_R * sizeof(float);
  static constexpr size_t kShared = size_t(RP) * LDR * sizeof(T);
  static constexpr size_t kStageN = size_t(kWarps) * 16 * LDS_N * sizeof(float);
  static constexpr size_t kFwdStream = 2 * size_t(kBM + RP) * LDK * sizeof(T);
  static constexpr size_t kFwdTiles = round_up(2 * size_t(kBN) * LDR * sizeof(T));
  static constexpr size_t kBwdStream = 2 * (size_t(kBM) * LDK + size_t(kBK) * LDR) * sizeof(T);
  static constexpr size_t kBwdTiles = round_up(2 * size_t(RP) * LDN * sizeof(T));
  static constexpr size_t kLoOffset = round_up(max_of(kStageR, kShared));
  static constexpr size_t kFwdBytes =
      kBlock + max_of(max_of(kFwdStream, kLoOffset + kBlock), kFwdTiles + kStageN);
  static constexpr size_t kBwdBytes =
      kBlock + max_of(max_of(kBwdStream, kLoOffset + kBlock), kBwdTiles + kStageN);
  // Within the opt-in limit of every sm_8x / sm_9x part (99 KB on sm_86 / sm_89).
  static_assert(kFwdBytes <= 96 * 1024 && kBwdBytes <= 96 * 1024, "shared memory");
  static_assert(RP % 32 == 0 && RP <= 128, "RP: a multiple of the 32 lanes, at most 128");
};

// CTAs per SM the kernels are compiled for (4 warps each): ptxas then holds the registers to
// 128 / 168 / 255 per thread for RP = 32 / 64 / 128, without spills (ptxas -v), and the
// smaller ranks keep the occupancy their smaller shared memory allows.
template <int RP>
constexpr int kMinBlocks = RP == 32 ? 4 : RP == 64 ? 3 : 2;

template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T, typename Layout>
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, Layout>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// 16-byte asynchronous copy global -> shared; src-size 0 writes 16 zero bytes instead, which is
// how rows past M and columns past d or r become the zero padding of the tensor-core tiles.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const unsigned to = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(to), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most N of this thread's copy groups are in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Starts copying the ROWS x COLS tile at (row0, col0) of a row-major matrix with leading
// dimension ld into shared memory (row stride lds), by all threads in 16-byte chunks. Chunks at
// rows >= row_end or columns >= col_end read as zeros; col_end is a multiple of 8, so a chunk
// is all in or all out.
template <int ROWS, int COLS, typename T>
__device__ __forceinline__ void load_tile(T* dst, int lds, const T* src, int64_t ld,
                                          int64_t row0, int64_t row_end, int64_t col0,
                                          int64_t col_end) {
  constexpr int kPerRow = COLS / 8, kChunks = ROWS * kPerRow;
  static_assert(kChunks % kFusedThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int k = 0; k < kChunks / kFusedThreads; ++k) {
    const int q = k * kFusedThreads + int(threadIdx.x);
    const int row = q / kPerRow, col = (q % kPerRow) * 8;
    const int64_t grow = row0 + row, gcol = col0 + col;
    const bool valid = grow < row_end && gcol < col_end;
    cp_async16(dst + row * lds + col, valid ? src + grow * ld + gcol : src, valid);
  }
}

// Hands every element of the warp's 16 x RP accumulators to f(rr, c, j, value), strip row rr,
// column j = 32 c + lane, through the warp's float32 staging rows (the fragment layout is
// opaque). A lane always gets the same columns, so f can keep per-column sums in registers
// (indexed by c, a constant once unrolled); a warp reads 32 consecutive floats at a time.
template <int RP, typename F>
__device__ __forceinline__ void for_each_rank_element(FragC (&acc)[RP / 16], float* stage, F&& f) {
  constexpr int ld = RP + kStagePad;
#pragma unroll
  for (int n = 0; n < RP / 16; ++n)
    wmma::store_matrix_sync(stage + n * 16, acc[n], ld, wmma::mem_row_major);
  __syncwarp();
  const int lane = int(threadIdx.x % 32);
#pragma unroll 1
  for (int rr = 0; rr < 16; ++rr) {
#pragma unroll
    for (int c = 0; c < RP / 32; ++c) f(rr, c, 32 * c + lane, stage[rr * ld + 32 * c + lane]);
  }
  __syncwarp();  // f's shared-memory writes are visible to the warp; the staging rows are free
}

// Hands the warp's 16 x kBN accumulators to f(rr, c, v) as runs v of 8 consecutive columns
// starting at column c of strip row rr: 8 lanes cover one 128-byte row segment of the output,
// so the caller's 16-byte loads and stores coalesce.
template <typename F>
__device__ __forceinline__ void for_each_output_run(FragC (&acc)[kBN / 16], float* stage, F&& f) {
  constexpr int ld = kBN + kStagePad;
  constexpr int kRuns = kBN / 8;
  static_assert(kRuns == 8, "a quarter-warp reads one staging row");
#pragma unroll
  for (int n = 0; n < kBN / 16; ++n)
    wmma::store_matrix_sync(stage + n * 16, acc[n], ld, wmma::mem_row_major);
  __syncwarp();
  const int lane = int(threadIdx.x % 32);
  // A quarter-warp reads 8 runs of one row, 32 bytes apart: lanes 4-7 read their upper half
  // first, so each 16-byte read of the quarter-warp falls on its own 4 banks.
  const int first = (lane >> 2) & 1;
#pragma unroll
  for (int k = 0; k < 16 * kRuns / 32; ++k) {
    const int q = k * 32 + lane, rr = q / kRuns, c = (q % kRuns) * 8;
    const float* run = stage + rr * ld + c;
    const float4 a = *reinterpret_cast<const float4*>(run + 4 * first);
    const float4 b = *reinterpret_cast<const float4*>(run + 4 * (first ^ 1));
    const float4 lo = first ? b : a, hi = first ? a : b;
    const float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    f(rr, c, v);
  }
  __syncwarp();  // the staging rows are free for the next tile
}

template <int RP>
__device__ __forceinline__ void zero(FragC (&acc)[RP / 16]) {
#pragma unroll
  for (int n = 0; n < RP / 16; ++n) wmma::fill_fragment(acc[n], 0.0f);
}

// v as hi + lo, both of the storage type (hi = v rounded, lo = the rest rounded): a tensor-core
// product over hi and lo keeps about 16 (bfloat16) or 22 (float16) bits of the float32 value
// instead of 8 or 11, so what is computed in float32 is rounded once, at the output.
template <typename T>
struct Split {
  T hi, lo;
};

template <typename T>
__device__ __forceinline__ Split<T> split(float v) {
  const T hi = from_acc<T>(v);
  return {hi, from_acc<T>(v - to_acc(hi))};
}

template <typename T>
__device__ __forceinline__ float scale_of(const FusedBottleneck& p) {
  return p.scale ? to_acc(*static_cast<const T*>(p.scale)) : float(p.scale_value);
}

// Offset of the 16 x 16 tile (kk, n) of an RP x RP matrix B with row stride ld, stored as B
// (row_major) or as B^T (col_major).
template <typename Layout>
__device__ __forceinline__ int tile_of(int kk, int n, int ld);
template <>
__device__ __forceinline__ int tile_of<wmma::row_major>(int kk, int n, int ld) {
  return kk * 16 * ld + n * 16;
}
template <>
__device__ __forceinline__ int tile_of<wmma::col_major>(int kk, int n, int ld) {
  return n * 16 * ld + kk * 16;
}

// FusedBackwardOut with typed pointers.
template <typename T>
struct FusedBackward {
  const T* g;
  const float *pre1, *pre2;
  bool add_g;
  T* dx;
  T* dpre1;
  float *dpre2, *h1;
  T* hin;
  int64_t hin_cols;
  float *db_d, *db_s, *dscale;
};

// acc += A (the warp's 16 x RP strip, given as hi and lo rows of stride LDR) times B (RP x RP in
// shared memory, stride LDR), on tensor cores: the products of the rank-space layers.
template <typename T, int RP, typename Layout>
__device__ __forceinline__ void rank_product(FragC (&acc)[RP / 16], const T* a_hi, const T* a_lo,
                                             const T* b) {
  constexpr int LDR = RP + kPad;
#pragma unroll 1
  for (int kk = 0; kk < RP / 16; ++kk) {
    FragA<T> hi, lo;
    wmma::load_matrix_sync(hi, a_hi + kk * 16, LDR);
    wmma::load_matrix_sync(lo, a_lo + kk * 16, LDR);
#pragma unroll
    for (int n = 0; n < RP / 16; ++n) {
      FragB<T, Layout> w;
      wmma::load_matrix_sync(w, b + tile_of<Layout>(kk, n, LDR), LDR);
      wmma::mma_sync(acc[n], hi, w, acc[n]);
      wmma::mma_sync(acc[n], lo, w, acc[n]);
    }
  }
}

// Sum over the warp in a fixed butterfly order (deterministic); every lane gets the total.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

template <typename T, int RP>
__global__ void __launch_bounds__(kFusedThreads, kMinBlocks<RP>)
    bottleneck_fused_forward_kernel(FusedBottleneck p, const T* __restrict__ x,
                                    const T* __restrict__ residual, T* __restrict__ y,
                                    float* __restrict__ pre1, float* __restrict__ pre2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // no bfloat16 tensor cores or cp.async: ops.cpp never launches this before sm_80
#else
  using L = Tiles<T, RP>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = int(threadIdx.x / 32);
  const int64_t row0 = int64_t(blockIdx.x) * kBM + warp * 16;  // first row of the warp's strip
  const int64_t rows = p.rows, d = p.d, r = p.r, ld_rank = p.ld_rank;
  const T* W_d = static_cast<const T*>(p.W_d);
  const T* W_s = static_cast<const T*>(p.W_s);
  const T* W_u = static_cast<const T*>(p.W_u);
  const T* b_u = static_cast<const T*>(p.b_u);
  const T* row_scale = static_cast<const T*>(p.row_scale);
  unsigned char* work = smem + L::kBlock;
  // The warp's strip of h1, then of the input of up, as hi and lo halves.
  T* h_hi = reinterpret_cast<T*>(smem) + warp * 16 * L::LDR;
  T* h_lo = reinterpret_cast<T*>(work + L::kLoOffset) + warp * 16 * L::LDR;
  float* stage = reinterpret_cast<float*>(work) + warp * 16 * L::LDS_R;

  // pre1 = x W_d^T, x and W_d streamed in kBK-column chunks.
  FragC acc[RP / 16];
  zero<RP>(acc);
  {
    T* xs = reinterpret_cast<T*>(work);
    T* ws = xs + 2 * kBM * L::LDK;
    const int chunks = int((d + kBK - 1) / kBK);
    auto load = [&](int t) {
      const int b = t & 1;
      load_tile<kBM, kBK>(xs + b * kBM * L::LDK, L::LDK, x, d, row0 - warp * 16, rows,
                          int64_t(t) * kBK, d);
      load_tile<RP, kBK>(ws + b * RP * L::LDK, L::LDK, W_d, d, 0, r, int64_t(t) * kBK, d);
      cp_async_commit();
    };
    load(0);
    for (int t = 0; t < chunks; ++t) {
      if (t + 1 < chunks) load(t + 1);
      else cp_async_commit();  // an empty group keeps the wait below uniform
      cp_async_wait<1>();
      __syncthreads();
      const T* xt = xs + (t & 1) * kBM * L::LDK + warp * 16 * L::LDK;
      const T* wt = ws + (t & 1) * RP * L::LDK;
      // One k-step at a time: unrolled, the compiler hoists every B fragment of the chunk and
      // spills registers (ptxas -v). The n loop still gives RP / 16 independent products.
#pragma unroll 1
      for (int kk = 0; kk < kBK / 16; ++kk) {
        FragA<T> a;
        wmma::load_matrix_sync(a, xt + kk * 16, L::LDK);
#pragma unroll
        for (int n = 0; n < RP / 16; ++n) {
          FragB<T, wmma::col_major> b;  // W_d^T: column n of it is row n of W_d
          wmma::load_matrix_sync(b, wt + n * 16 * L::LDK + kk * 16, L::LDK);
          wmma::mma_sync(acc[n], a, b, acc[n]);
        }
      }
      __syncthreads();  // the next load overwrites this buffer
    }
  }

  const bool shared = W_s != nullptr;
  // h = act(pre + bias), times the dropout mask for the input of up, kept in float32 (pre too:
  // the backward differentiates at these values) and split into hi + lo for the next product.
  // Columns >= r and rows >= M are zeros.
  auto activate = [&](const T* bias, float* pre_out, bool dropout) {
    for_each_rank_element<RP>(acc, stage, [&](int rr, int, int j, float v) {
      const int64_t i = row0 + rr;
      float h = 0.0f;
      if (i < rows && j < r) {
        const int64_t e = i * r + j;
        const float pre = bias ? v + to_acc(bias[j]) : v;
        if (pre_out) pre_out[e] = pre;
        h = act_forward(pre, p.act);
        if (dropout) h *= dropout_factor<float>(p.drop, uint64_t(e));
      }
      const Split<T> hs = split<T>(h);
      h_hi[rr * L::LDR + j] = hs.hi;
      h_lo[rr * L::LDR + j] = hs.lo;
    });
  };
  activate(static_cast<const T*>(p.b_d), pre1, !shared);

  if (shared) {
    __syncthreads();  // W_s overwrites the staging rows of every warp (not the lo halves)
    T* ws = reinterpret_cast<T*>(work);
    load_tile<RP, RP>(ws, L::LDR, W_s, ld_rank, 0, r, 0, ld_rank);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    zero<RP>(acc);
    rank_product<T, RP, wmma::col_major>(acc, h_hi, h_lo, ws);  // h1 W_s^T
    __syncthreads();  // the staging rows overwrite W_s
    activate(static_cast<const T*>(p.b_s), pre2, true);
  }
  if (y == nullptr) return;  // the backward's recomputation of the pre-activations

  // y = residual + s * row_scale * (h W_u^T + b_u), one kBN-column tile of W_u at a time; the
  // warp's h strip (hi and lo) stays in registers across the tiles.
  FragA<T> ha_hi[RP / 16], ha_lo[RP / 16];
#pragma unroll
  for (int kk = 0; kk < RP / 16; ++kk) {
    wmma::load_matrix_sync(ha_hi[kk], h_hi + kk * 16, L::LDR);
    wmma::load_matrix_sync(ha_lo[kk], h_lo + kk * 16, L::LDR);
  }
  __syncthreads();  // W_u tiles overwrite every warp's staging rows and lo halves
  T* us = reinterpret_cast<T*>(work);
  float* stage_n = reinterpret_cast<float*>(work + L::kFwdTiles) + warp * 16 * L::LDS_N;
  const T* base = residual ? residual : x;
  const float s = scale_of<T>(p);
  const int tiles = int((d + kBN - 1) / kBN);
  auto load = [&](int t) {
    load_tile<kBN, RP>(us + (t & 1) * kBN * L::LDR, L::LDR, W_u, ld_rank, int64_t(t) * kBN, d,
                       0, ld_rank);
    cp_async_commit();
  };
  load(0);
  for (int t = 0; t < tiles; ++t) {
    if (t + 1 < tiles) load(t + 1);
    else cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* ut = us + (t & 1) * kBN * L::LDR;
    FragC out[kBN / 16];
#pragma unroll
    for (int n = 0; n < kBN / 16; ++n) {
      wmma::fill_fragment(out[n], 0.0f);
#pragma unroll
      for (int kk = 0; kk < RP / 16; ++kk) {
        FragB<T, wmma::col_major> b;  // W_u^T: column n of it is row n of the W_u tile
        wmma::load_matrix_sync(b, ut + n * 16 * L::LDR + kk * 16, L::LDR);
        wmma::mma_sync(out[n], ha_hi[kk], b, out[n]);
        wmma::mma_sync(out[n], ha_lo[kk], b, out[n]);
      }
    }
    __syncthreads();  // the next load overwrites this buffer (the staging rows are elsewhere)
    const int64_t col0 = int64_t(t) * kBN;
    for_each_output_run(out, stage_n, [&](int rr, int c, const float (&v)[8]) {
      const int64_t i = row0 + rr, col = col0 + c;
      if (i >= rows || col >= d) return;
      const float f = row_scale ? s * to_acc(row_scale[i]) : s;
      const Vec<T, 8> res = *reinterpret_cast<const Vec<T, 8>*>(base + i * d + col);
      float bias[8] = {};
      if (b_u) {
        const Vec<T, 8> b = *reinterpret_cast<const Vec<T, 8>*>(b_u + col);
#pragma unroll
        for (int k = 0; k < 8; ++k) bias[k] = to_acc(b.v[k]);
      }
      Vec<T, 8> o;
#pragma unroll
      for (int k = 0; k < 8; ++k) o.v[k] = from_acc<T>(to_acc(res.v[k]) + f * (v[k] + bias[k]));
      *reinterpret_cast<Vec<T, 8>*>(y + i * d + col) = o;
    });
  }
#endif
}

template <typename T, int RP>
__global__ void __launch_bounds__(kFusedThreads, kMinBlocks<RP>)
    bottleneck_fused_backward_kernel(FusedBottleneck p, FusedBackward<T> o) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // no bfloat16 tensor cores or cp.async: ops.cpp never launches this before sm_80
#else
  using L = Tiles<T, RP>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = int(threadIdx.x / 32), lane = int(threadIdx.x % 32);
  const int64_t strip = int64_t(blockIdx.x) * kWarps + warp;  // row of the per-warp partials
  const int64_t row0 = strip * 16;                             // first row of the warp's strip
  const int64_t rows = p.rows, d = p.d, r = p.r, ld_rank = p.ld_rank;
  const T* W_d = static_cast<const T*>(p.W_d);
  const T* W_s = static_cast<const T*>(p.W_s);
  const T* W_u = static_cast<const T*>(p.W_u);
  const T* row_scale = static_cast<const T*>(p.row_scale);
  unsigned char* work = smem + L::kBlock;
  // The warp's strip of dpre2 (shared layer), then of dpre1, as hi and lo halves.
  T* dpre_hi = reinterpret_cast<T*>(smem) + warp * 16 * L::LDR;
  T* dpre_lo = reinterpret_cast<T*>(work + L::kLoOffset) + warp * 16 * L::LDR;
  float* stage = reinterpret_cast<float*>(work) + warp * 16 * L::LDS_R;
  const bool shared = W_s != nullptr;
  const bool need_dpre1 = o.dx || o.dpre1 || o.db_d;
  const bool need_dpre2 = shared && (need_dpre1 || o.dpre2 || o.db_s);
  const bool need_dpre = shared ? need_dpre2 : need_dpre1;  // of the layer feeding up
  const bool need_gW = need_dpre || o.dscale;

  // gW = g W_u (s * row_scale applied to the float32 result: g is read as stored), g and W_u
  // streamed in kBK-row chunks of d.
  FragC acc[RP / 16];
  zero<RP>(acc);
  if (need_gW) {
    T* gs = reinterpret_cast<T*>(work);
    T* us = gs + 2 * kBM * L::LDK;
    const int chunks = int((d + kBK - 1) / kBK);
    auto load = [&](int t) {
      const int b = t & 1;
      load_tile<kBM, kBK>(gs + b * kBM * L::LDK, L::LDK, o.g, d, row0 - warp * 16, rows,
                          int64_t(t) * kBK, d);
      load_tile<kBK, RP>(us + b * kBK * L::LDR, L::LDR, W_u, ld_rank, int64_t(t) * kBK, d, 0,
                         ld_rank);
      cp_async_commit();
    };
    load(0);
    for (int t = 0; t < chunks; ++t) {
      if (t + 1 < chunks) load(t + 1);
      else cp_async_commit();  // an empty group keeps the wait below uniform
      cp_async_wait<1>();
      __syncthreads();
      const T* gt = gs + (t & 1) * kBM * L::LDK + warp * 16 * L::LDK;
      const T* ut = us + (t & 1) * kBK * L::LDR;
#pragma unroll 1
      for (int kk = 0; kk < kBK / 16; ++kk) {  // one k-step at a time, as in the forward
        FragA<T> a;
        wmma::load_matrix_sync(a, gt + kk * 16, L::LDK);
#pragma unroll
        for (int n = 0; n < RP / 16; ++n) {
          FragB<T, wmma::row_major> b;  // W_u itself: rows over d, columns over r
          wmma::load_matrix_sync(b, ut + kk * 16 * L::LDR + n * 16, L::LDR);
          wmma::mma_sync(acc[n], a, b, acc[n]);
        }
      }
      __syncthreads();  // the next load overwrites this buffer
    }
  }

  // The layer feeding up (the shared one when present): its dropout mask and act', and the
  // inputs of the weight gradients. h_in = row_scale * (the input of up), so that
  // g^T h_in = dW_u / s; sum_i <h_in_i, gW_i> is the part of dscale that is not b_u's.
  const float s = scale_of<T>(p);
  const int64_t hin_ld = 2 * o.hin_cols;
  float col[RP / 32] = {};  // this lane's sums over the strip of its columns of dpre
  float dot = 0.0f;         // this lane's share of sum_i <h_in_i, gW_i>
  for_each_rank_element<RP>(acc, stage, [&](int rr, int c, int j, float gW) {
    const int64_t i = row0 + rr, e = i * r + j;
    const bool inside = i < rows && j < r;
    float dpre = 0.0f;
    if (inside) {
      const float p1 = o.pre1[e];
      const float p_in = shared ? o.pre2[e] : p1;
      const float keep = dropout_factor<float>(p.drop, uint64_t(e));
      const float rs = row_scale ? to_acc(row_scale[i]) : 1.0f;
      const float h_in = rs * act_forward(p_in, p.act) * keep;
      dot += h_in * gW;
      if (o.hin) {
        const Split<T> hs = split<T>(h_in);
        o.hin[i * hin_ld + j] = hs.hi;
        o.hin[i * hin_ld + o.hin_cols + j] = hs.lo;
      }
      if (o.h1) o.h1[e] = act_forward(p1, p.act);
      if (need_dpre) {
        dpre = s * rs * gW * keep * act_derivative(p_in, p.act);
        col[c] += dpre;
        if (shared && o.dpre2) o.dpre2[e] = dpre;
      }
    }
    const Split<T> ds = split<T>(dpre);
    dpre_hi[rr * L::LDR + j] = ds.hi;
    dpre_lo[rr * L::LDR + j] = ds.lo;
    if (inside && !shared && o.dpre1) {
      o.dpre1[i * 2 * r + j] = ds.hi;
      o.dpre1[i * 2 * r + r + j] = ds.lo;
    }
  });
  float* col_out = shared ? o.db_s : o.db_d;
  if (col_out) {
#pragma unroll
    for (int c = 0; c < RP / 32; ++c)
      if (32 * c + lane < r) col_out[strip * r + 32 * c + lane] = col[c];
  }
  if (o.dscale) {
    const float total = warp_sum(dot);
    if (lane == 0) o.dscale[strip] = total;
  }
  if (o.hin && o.hin_cols > r && lane < 16 && row0 + lane < rows) {
    // Column r holds the row's scale (exact: it is stored in T), so that g^T h_in also gives
    // sum_i row_scale_i g_i (db_u).
    o.hin[(row0 + lane) * hin_ld + r] = row_scale ? row_scale[row0 + lane] : from_acc<T>(1.0f);
    o.hin[(row0 + lane) * hin_ld + o.hin_cols + r] = from_acc<T>(0.0f);
  }

  if (shared && need_dpre1) {
    // dpre1 = (dpre2 W_s) * act'(pre1)
    __syncthreads();  // W_s overwrites the staging rows of every warp (not the lo halves)
    T* ws = reinterpret_cast<T*>(work);
    load_tile<RP, RP>(ws, L::LDR, W_s, ld_rank, 0, r, 0, ld_rank);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    zero<RP>(acc);
    rank_product<T, RP, wmma::row_major>(acc, dpre_hi, dpre_lo, ws);  // dpre2 W_s
    __syncthreads();  // the staging rows overwrite W_s
    float col1[RP / 32] = {};
    for_each_rank_element<RP>(acc, stage, [&](int rr, int c, int j, float dh1) {
      const int64_t i = row0 + rr, e = i * r + j;
      const bool inside = i < rows && j < r;
      float dpre = 0.0f;
      if (inside) {
        dpre = dh1 * act_derivative(o.pre1[e], p.act);
        col1[c] += dpre;
      }
      const Split<T> ds = split<T>(dpre);
      dpre_hi[rr * L::LDR + j] = ds.hi;
      dpre_lo[rr * L::LDR + j] = ds.lo;
      if (inside && o.dpre1) {
        o.dpre1[i * 2 * r + j] = ds.hi;
        o.dpre1[i * 2 * r + r + j] = ds.lo;
      }
    });
    if (o.db_d) {
#pragma unroll
      for (int c = 0; c < RP / 32; ++c)
        if (32 * c + lane < r) o.db_d[strip * r + 32 * c + lane] = col1[c];
    }
  }
  if (o.dx == nullptr) return;

  // dx = dpre1 W_d (+ g when the residual is x), one kBN-column tile of W_d at a time; the
  // warp's dpre1 strip (hi and lo) stays in registers across the tiles.
  FragA<T> da_hi[RP / 16], da_lo[RP / 16];
#pragma unroll
  for (int kk = 0; kk < RP / 16; ++kk) {
    wmma::load_matrix_sync(da_hi[kk], dpre_hi + kk * 16, L::LDR);
    wmma::load_matrix_sync(da_lo[kk], dpre_lo + kk * 16, L::LDR);
  }
  __syncthreads();  // W_d tiles overwrite every warp's staging rows and lo halves
  T* ws = reinterpret_cast<T*>(work);
  float* stage_n = reinterpret_cast<float*>(work + L::kBwdTiles) + warp * 16 * L::LDS_N;
  const int tiles = int((d + kBN - 1) / kBN);
  auto load = [&](int t) {
    load_tile<RP, kBN>(ws + (t & 1) * RP * L::LDN, L::LDN, W_d, d, 0, r, int64_t(t) * kBN, d);
    cp_async_commit();
  };
  load(0);
  for (int t = 0; t < tiles; ++t) {
    if (t + 1 < tiles) load(t + 1);
    else cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* wt = ws + (t & 1) * RP * L::LDN;
    FragC out[kBN / 16];
#pragma unroll
    for (int n = 0; n < kBN / 16; ++n) {
      wmma::fill_fragment(out[n], 0.0f);
#pragma unroll
      for (int kk = 0; kk < RP / 16; ++kk) {
        FragB<T, wmma::row_major> b;  // W_d itself: rows over r, columns over d
        wmma::load_matrix_sync(b, wt + kk * 16 * L::LDN + n * 16, L::LDN);
        wmma::mma_sync(out[n], da_hi[kk], b, out[n]);
        wmma::mma_sync(out[n], da_lo[kk], b, out[n]);
      }
    }
    __syncthreads();  // the next load overwrites this buffer (the staging rows are elsewhere)
    const int64_t col0 = int64_t(t) * kBN;
    for_each_output_run(out, stage_n, [&](int rr, int c, const float (&v)[8]) {
      const int64_t i = row0 + rr, col = col0 + c;
      if (i >= rows || col >= d) return;
      float skip[8] = {};  // g itself when the residual is x
      if (o.add_g) {
        const Vec<T, 8> gv = *reinterpret_cast<const Vec<T, 8>*>(o.g + i * d + col);
#pragma unroll
        for (int k = 0; k < 8; ++k) skip[k] = to_acc(gv.v[k]);
      }
      Vec<T, 8> out8;
#pragma unroll
      for (int k = 0; k < 8; ++k) out8.v[k] = from_acc<T>(v[k] + skip[k]);
      *reinterpret_cast<Vec<T, 8>*>(o.dx + i * d + col) = out8;
    });
  }
#endif
}

template <int R>
struct Rank {
  static constexpr int value = R;
};

// Calls fn(Rank<RP>{}) with r padded to 32, 64 or 128.
template <typename Fn>
void dispatch_rank(int64_t r, Fn&& fn) {
  if (r <= 32) fn(Rank<32>{});
  else if (r <= 64) fn(Rank<64>{});
  else fn(Rank<128>{});
}

// Calls fn(TypeTag<T>{}) for the two storage types the fused kernels serve.
template <typename Fn>
void dispatch_half(DType dtype, Fn&& fn) {
  if (dtype == DType::BF16) fn(TypeTag<__nv_bfloat16>{});
  if (dtype == DType::F16) fn(TypeTag<__half>{});
}

// Lets kernel use `bytes` of dynamic shared memory (past the default 48 KB it must opt in). A
// failure stays the runtime's last error, which the caller's launch check reports.
template <typename Kernel>
bool allow_shared_memory(Kernel kernel, size_t bytes) {
  return bytes <= 48 * 1024 ||
         cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              int(bytes)) == cudaSuccess;
}

unsigned blocks_for(int64_t rows) { return unsigned((rows + kBM - 1) / kBM); }

}  // namespace

int64_t fused_bottleneck_strips(int64_t rows) { return int64_t(blocks_for(rows)) * kWarps; }

void fused_bottleneck_forward(DType dtype, const FusedBottleneck& p, const void* x,
                              const void* residual, void* y, float* pre1, float* pre2,
                              cudaStream_t stream) {
  if (p.rows == 0) return;
  dispatch_half(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_rank(p.r, [&](auto rank) {
      constexpr int RP = decltype(rank)::value;
      constexpr size_t bytes = Tiles<T, RP>::kFwdBytes;
      auto kernel = bottleneck_fused_forward_kernel<T, RP>;
      if (!allow_shared_memory(kernel, bytes)) return;
      kernel<<<blocks_for(p.rows), kFusedThreads, bytes, stream>>>(
          p, static_cast<const T*>(x), static_cast<const T*>(residual), static_cast<T*>(y), pre1,
          pre2);
    });
  });
}

void fused_bottleneck_backward(DType dtype, const FusedBottleneck& p, const FusedBackwardOut& out,
                               cudaStream_t stream) {
  if (p.rows == 0) return;
  dispatch_half(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const FusedBackward<T> o{static_cast<const T*>(out.g), out.pre1, out.pre2, out.add_g,
                             static_cast<T*>(out.dx), static_cast<T*>(out.dpre1), out.dpre2,
                             out.h1, static_cast<T*>(out.hin), out.hin_cols, out.db_d, out.db_s,
                             out.dscale};
    dispatch_rank(p.r, [&](auto rank) {
      constexpr int RP = decltype(rank)::value;
      constexpr size_t bytes = Tiles<T, RP>::kBwdBytes;
      auto kernel = bottleneck_fused_backward_kernel<T, RP>;
      if (!allow_shared_memory(kernel, bytes)) return;
      kernel<<<blocks_for(p.rows), kFusedThreads, bytes, stream>>>(p, o);
    });
  });
}

}  // namespace cuda
}  // namespace pyadapt
