// Launchers of the pyadapt CUDA kernels, callable from plain C++ (no CUDA or torch headers
// here): the .cu files that define them include only the CUDA runtime, so nvcc compiles them in
// seconds, and the torch-side glue (ops.cpp) is compiled by the host compiler. Pointers are raw
// device pointers of contiguous row-major matrices; `dtype` names their element type.
#pragma once

#include <cstdint>

typedef struct CUstream_st* cudaStream_t;

namespace pyadapt {
namespace cuda {

enum class DType : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };
enum class Act : int { Relu = 0, Gelu = 1, QuickGelu = 2, Silu = 3, Identity = 4 };

// Inverted dropout on a (rows x cols) matrix: element (i, j) is kept iff
// philox_uniform(*seed, i * cols + j) >= p and then multiplied by 1 / (1 - p). p == 0: no
// dropout (seed may be null). The seed stays on the device: no host synchronisation.
struct Dropout {
  const int64_t* seed;
  float p;            // compared in float32, as the reference does
  double keep_scale;  // 1 / (1 - p), computed in double on the host like the reference
};

// h = dropout(act(pre + bias)); when pre_out is not null it receives pre + bias (in place on
// pre is allowed). bias may be null.
void bias_act_forward(DType dtype, const void* pre, const void* bias, void* pre_out, void* h,
                      int64_t rows, int64_t cols, Act act, Dropout drop, cudaStream_t stream);

// dpre = dropout(dh) * act'(pre) (in place on dh is allowed); pre may be null for identity.
void act_backward(DType dtype, const void* dh, const void* pre, void* dpre, int64_t rows,
                  int64_t cols, Act act, Dropout drop, cudaStream_t stream);

// y = residual + s * row_scale[i] * (u + bias) with s = *scale (a 0-dim tensor of `dtype`) when
// scale is not null, else scale_value. bias, row_scale may be null; row_scale is of `dtype`.
// One rounding to `dtype` at the end. In place on u or residual is allowed.
void output_epilogue(DType dtype, const void* u, const void* bias, const void* residual,
                     const void* scale, double scale_value, const void* row_scale, void* y,
                     int64_t rows, int64_t cols, cudaStream_t stream);

// out = s * row_scale[i] * g (same scale convention as output_epilogue).
void scale_rows(DType dtype, const void* g, const void* scale, double scale_value,
                const void* row_scale, void* out, int64_t rows, int64_t cols,
                cudaStream_t stream);

// Deterministic reductions (no atomics: fixed per-block partials, then a fixed-order sum).
// Accumulation type: double for F64, float otherwise; `out` and `workspace` are of that type.
// col_sum: out[j] = sum_i a[i, j]; workspace holds col_sum_workspace(rows, cols) elements.
int64_t col_sum_workspace(int64_t rows, int64_t cols);
void col_sum(DType dtype, const void* a, int64_t rows, int64_t cols, void* workspace, void* out,
             cudaStream_t stream);
// weighted_dot: *out = sum_ij a[i, j] * b[i, j] * (row_scale ? row_scale[i] : 1).
int64_t weighted_dot_workspace(int64_t rows, int64_t cols);
void weighted_dot(DType dtype, const void* a, const void* b, const void* row_scale, int64_t rows,
                  int64_t cols, void* workspace, void* out, cudaStream_t stream);

// Fused tensor-core bottleneck (bottleneck_fused.cu): bfloat16 / float16 only, sm_80 or newer,
// 1 <= r <= kFusedMaxRank, d a multiple of 8 and every matrix 16-byte aligned (the caller
// checks). W_s and W_u have rows of ld_rank elements: r rounded up to a multiple of 8, the
// extra columns zero.
constexpr int64_t kFusedMaxRank = 128;

struct FusedBottleneck {
  const void* W_d;        // (r, d)
  const void* b_d;        // (r) or null
  const void* W_s;        // (r, ld_rank) or null: no shared layer
  const void* b_s;        // (r) or null
  const void* W_u;        // (d, ld_rank)
  const void* b_u;        // (d) or null
  const void* scale;      // 0-dim of the storage type, or null: scale_value
  double scale_value;
  const void* row_scale;  // (rows) or null
  int64_t rows, d, r, ld_rank;
  Act act;
  Dropout drop;  // on the input of up
};

// y = residual + s * row_scale * up(drop(act(shared?(act(down(x)))))); residual null: x. The
// float32 pre-activations (M x r) go to pre1 (and pre2 after the shared layer) when not null; y
// null computes only those (the backward's recomputation).
void fused_bottleneck_forward(DType dtype, const FusedBottleneck& p, const void* x,
                              const void* residual, void* y, float* pre1, float* pre2,
                              cudaStream_t stream);

// The backward's row pass: inputs, and outputs (null: not wanted). The M x r inputs of the
// weight gradients keep float32 accuracy: dpre1 and hin come as hi and lo halves of the storage
// type (cuBLAS takes them: dW_d = hi^T x + lo^T x), dpre2 and h1 as float32 (dW_s = dpre2^T h1),
// and the bias and scale gradients as float32 sums per strip of 16 rows
// (fused_bottleneck_strips(rows) strips), for a fixed-order reduction.
struct FusedBackwardOut {
  const void* g;       // grad_y (rows, d)
  const float* pre1;   // (rows, r), from fused_bottleneck_forward
  const float* pre2;   // (rows, r), shared layer only
  bool add_g;          // dx += g: the residual is x itself
  void* dx;            // (rows, d) = dpre1 W_d (+ g)
  void* dpre1;         // (rows, 2 r): hi | lo
  float* dpre2;        // (rows, r)
  float* h1;           // (rows, r): act(pre1), shared layer only
  void* hin;           // (rows, 2 hin_cols): hi | lo of h_in = row_scale * (the input of up);
  int64_t hin_cols;    // r, or r + 1 with the row scale in column r (its lo half 0)
  float* db_d;         // (strips, r): column sums of dpre1
  float* db_s;         // (strips, r): column sums of dpre2
  float* dscale;       // (strips): sum_i <h_in_i, (g W_u)_i>
};

int64_t fused_bottleneck_strips(int64_t rows);
void fused_bottleneck_backward(DType dtype, const FusedBottleneck& p, const FusedBackwardOut& out,
                               cudaStream_t stream);

// out = round_to(dtype)(w + (*scale) * lr): w, out of `dtype`; lr of the accumulation type
// (float, double for F64); scale a double on the device.
void fold_epilogue(DType dtype, const void* w, const void* lr, const double* scale, void* out,
                   int64_t n, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyadapt
