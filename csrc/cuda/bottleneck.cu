// Elementwise kernels of the bottleneck op, shared by the R-Adapter and low-rank ops: the
// rank-space bias + activation + dropout pass and its backward, the output epilogue
// (residual + scale * row_scale * (u + bias)) and the row-scaled gradient. The matrix products
// around them are cuBLAS calls made by the torch-side glue (ops.cpp). Every element is computed
// in the accumulation type (float; double for double) and rounded once when stored. The two
// (rows x d) passes move 16 bytes per access when the row length and the pointers allow.
#include "common.cuh"

namespace pyadapt {
namespace cuda {
namespace {

template <typename T>
__global__ void bias_act_forward_kernel(const T* pre, const T* __restrict__ bias, T* pre_out,
                                        T* h, int64_t rows, int64_t cols, Act act,
                                        Dropout drop) {
  // pre, pre_out and h may alias (in-place passes): no __restrict__ on them.
  using A = acc_t<T>;
  const int64_t n = rows * cols;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x) {
    A v = to_acc(pre[e]);
    if (bias) v += to_acc(bias[e % cols]);
    if (pre_out) {
      // The backward differentiates at the stored (rounded) pre-activation, as the reference
      // differentiates at its own rounded one.
      const T stored = from_acc<T>(v);
      pre_out[e] = stored;
      v = to_acc(stored);
    }
    h[e] = from_acc<T>(act_forward(v, act) * dropout_factor<A>(drop, uint64_t(e)));
  }
}

template <typename T>
__global__ void act_backward_kernel(const T* dh, const T* __restrict__ pre, T* dpre,
                                    int64_t rows, int64_t cols, Act act, Dropout drop) {
  using A = acc_t<T>;
  const int64_t n = rows * cols;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x) {
    A g = to_acc(dh[e]) * dropout_factor<A>(drop, uint64_t(e));
    if (act != Act::Identity) g *= act_derivative(to_acc(pre[e]), act);
    dpre[e] = from_acc<T>(g);
  }
}

template <typename T>
__device__ __forceinline__ acc_t<T> scale_of(const T* scale, double scale_value) {
  return scale ? to_acc(*scale) : acc_t<T>(scale_value);
}

// V elements per thread; V divides cols, so a vector never crosses a row.
template <typename T, int V>
__global__ void output_epilogue_kernel(const T* u, const T* __restrict__ bias, const T* residual,
                                       const T* __restrict__ scale, double scale_value,
                                       const T* __restrict__ row_scale, T* y, int64_t rows,
                                       int64_t cols) {
  using A = acc_t<T>;
  const A s = scale_of(scale, scale_value);
  const int64_t nvec = rows * cols / V;
  for (int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; q < nvec;
       q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = q * V, row = e / cols, col = e - row * cols;
    const Vec<T, V> uv = reinterpret_cast<const Vec<T, V>*>(u)[q];
    const Vec<T, V> rv = reinterpret_cast<const Vec<T, V>*>(residual)[q];
    const A f = row_scale ? s * to_acc(row_scale[row]) : s;
    Vec<T, V> out;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      A delta = to_acc(uv.v[k]);
      if (bias) delta += to_acc(bias[col + k]);
      out.v[k] = from_acc<T>(to_acc(rv.v[k]) + f * delta);
    }
    reinterpret_cast<Vec<T, V>*>(y)[q] = out;
  }
}

template <typename T, int V>
__global__ void scale_rows_kernel(const T* g, const T* __restrict__ scale, double scale_value,
                                  const T* __restrict__ row_scale, T* out, int64_t rows,
                                  int64_t cols) {
  using A = acc_t<T>;
  const A s = scale_of(scale, scale_value);
  const int64_t nvec = rows * cols / V;
  for (int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; q < nvec;
       q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = q * V / cols;
    const A f = row_scale ? s * to_acc(row_scale[row]) : s;
    const Vec<T, V> gv = reinterpret_cast<const Vec<T, V>*>(g)[q];
    Vec<T, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) o.v[k] = from_acc<T>(f * to_acc(gv.v[k]));
    reinterpret_cast<Vec<T, V>*>(out)[q] = o;
  }
}

// 16-byte vectors when every row starts 16-byte aligned, else one element per thread.
template <typename T>
bool can_vectorise(int64_t cols, std::initializer_list<const void*> ptrs) {
  constexpr int V = 16 / sizeof(T);
  if (cols % V != 0) return false;
  for (const void* p : ptrs)
    if (p && !aligned16(p)) return false;
  return true;
}

}  // namespace

void bias_act_forward(DType dtype, const void* pre, const void* bias, void* pre_out, void* h,
                      int64_t rows, int64_t cols, Act act, Dropout drop, cudaStream_t stream) {
  if (rows * cols == 0) return;
  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    bias_act_forward_kernel<T><<<grid_for(rows * cols), kThreads, 0, stream>>>(
        static_cast<const T*>(pre), static_cast<const T*>(bias), static_cast<T*>(pre_out),
        static_cast<T*>(h), rows, cols, act, drop);
  });
}

void act_backward(DType dtype, const void* dh, const void* pre, void* dpre, int64_t rows,
                  int64_t cols, Act act, Dropout drop, cudaStream_t stream) {
  if (rows * cols == 0) return;
  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    act_backward_kernel<T><<<grid_for(rows * cols), kThreads, 0, stream>>>(
        static_cast<const T*>(dh), static_cast<const T*>(pre), static_cast<T*>(dpre), rows, cols,
        act, drop);
  });
}

void output_epilogue(DType dtype, const void* u, const void* bias, const void* residual,
                     const void* scale, double scale_value, const void* row_scale, void* y,
                     int64_t rows, int64_t cols, cudaStream_t stream) {
  if (rows * cols == 0) return;
  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = 16 / sizeof(T);
    const T* ut = static_cast<const T*>(u);
    const T* rt = static_cast<const T*>(residual);
    if (can_vectorise<T>(cols, {u, residual, y})) {
      output_epilogue_kernel<T, V><<<grid_for(rows * cols / V), kThreads, 0, stream>>>(
          ut, static_cast<const T*>(bias), rt, static_cast<const T*>(scale), scale_value,
          static_cast<const T*>(row_scale), static_cast<T*>(y), rows, cols);
    } else {
      output_epilogue_kernel<T, 1><<<grid_for(rows * cols), kThreads, 0, stream>>>(
          ut, static_cast<const T*>(bias), rt, static_cast<const T*>(scale), scale_value,
          static_cast<const T*>(row_scale), static_cast<T*>(y), rows, cols);
    }
  });
}

void scale_rows(DType dtype, const void* g, const void* scale, double scale_value,
                const void* row_scale, void* out, int64_t rows, int64_t cols,
                cudaStream_t stream) {
  if (rows * cols == 0) return;
  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = 16 / sizeof(T);
    if (can_vectorise<T>(cols, {g, out})) {
      scale_rows_kernel<T, V><<<grid_for(rows * cols / V), kThreads, 0, stream>>>(
          static_cast<const T*>(g), static_cast<const T*>(scale), scale_value,
          static_cast<const T*>(row_scale), static_cast<T*>(out), rows, cols);
    } else {
      scale_rows_kernel<T, 1><<<grid_for(rows * cols), kThreads, 0, stream>>>(
          static_cast<const T*>(g), static_cast<const T*>(scale), scale_value,
          static_cast<const T*>(row_scale), static_cast<T*>(out), rows, cols);
    }
  });
}

}  // namespace cuda
}  // namespace pyadapt
