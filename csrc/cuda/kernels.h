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

// out = round_to(dtype)(w + (*scale) * lr): w, out of `dtype`; lr of the accumulation type
// (float, double for F64); scale a double on the device.
void fold_epilogue(DType dtype, const void* w, const void* lr, const double* scale, void* out,
                   int64_t n, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyadapt
