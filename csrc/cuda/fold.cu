// Epilogue of the grouped fold W' = W + s * (L @ R): L @ R arrives in the accumulation type
// (float; double for double weights) from a cuBLAS product made by the glue, so the result is
// rounded to the weight's dtype exactly once. 16-byte vector accesses when aligned.
#include "common.cuh"

namespace pyadapt {
namespace cuda {
namespace {

template <typename T, int V>
__global__ void fold_epilogue_kernel(const T* __restrict__ w, const acc_t<T>* __restrict__ lr,
                                     const double* __restrict__ scale, T* __restrict__ out,
                                     int64_t n) {
  using A = acc_t<T>;
  const A s = A(*scale);
  const int64_t nvec = n / V;
  for (int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; q < nvec;
       q += int64_t(gridDim.x) * blockDim.x) {
    const Vec<T, V> wv = reinterpret_cast<const Vec<T, V>*>(w)[q];
    Vec<T, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) o.v[k] = from_acc<T>(to_acc(wv.v[k]) + s * lr[q * V + k]);
    reinterpret_cast<Vec<T, V>*>(out)[q] = o;
  }
}

}  // namespace

void fold_epilogue(DType dtype, const void* w, const void* lr, const double* scale, void* out,
                   int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    constexpr int V = 16 / sizeof(T);
    if (n % V == 0 && aligned16(w) && aligned16(out) && aligned16(lr)) {
      fold_epilogue_kernel<T, V><<<grid_for(n / V), kThreads, 0, stream>>>(
          static_cast<const T*>(w), static_cast<const A*>(lr), scale, static_cast<T*>(out), n);
    } else {
      fold_epilogue_kernel<T, 1><<<grid_for(n), kThreads, 0, stream>>>(
          static_cast<const T*>(w), static_cast<const A*>(lr), scale, static_cast<T*>(out), n);
    }
  });
}

}  // namespace cuda
}  // namespace pyadapt
