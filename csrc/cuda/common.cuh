// Device helpers shared by the pyadapt CUDA kernels: element types and their accumulation type,
// 16-byte vector access, the activations and the counter-based dropout generator (Philox4x32-10
// keyed by the seed, counter = flat element index; bit-equal to pyadapt.reference.philox_uniform
// and Triton's tl.rand). Only CUDA runtime headers: these TUs compile without torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace pyadapt {
namespace cuda {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // grid-stride loops cover the rest

// Accumulation type: float for float / half / bfloat16, double for double.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// V consecutive elements moved as one access (16 bytes when V * sizeof(T) == 16).
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline int grid_for(int64_t work) {
  int64_t blocks = (work + kThreads - 1) / kThreads;
  if (blocks < 1) blocks = 1;
  return int(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

// High 32 bits of a 32 x 32-bit product (host twin for csrc/cuda/check/host_check.cu).
__host__ __device__ __forceinline__ uint32_t mulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return uint32_t((uint64_t(a) * uint64_t(b)) >> 32);
#endif
}

// Uniform float in [0, 1) for (seed, offset): Philox4x32-10, counter (offset lo, offset hi, 0, 0),
// key (seed lo, seed hi), the top 31 bits of the first output word folded to non-negative.
__host__ __device__ __forceinline__ float philox_uniform(uint64_t seed, uint64_t offset) {
  uint32_t c0 = uint32_t(offset), c1 = uint32_t(offset >> 32), c2 = 0u, c3 = 0u;
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
#pragma unroll
  for (int i = 0; i < 10; ++i) {
    const uint32_t hb = mulhi32(c2, 0xCD9E8D57u), lb = c2 * 0xCD9E8D57u;
    const uint32_t ha = mulhi32(c0, 0xD2511F53u), la = c0 * 0xD2511F53u;
    c0 = hb ^ c1 ^ k0;
    c1 = lb;
    c2 = ha ^ c3 ^ k1;
    c3 = la;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  int32_t v = int32_t(c0);
  if (v < 0) v = -v - 1;
  return float(v) * 4.6566127342e-10f;
}

// The activations and the dropout factor are host-callable too, so that a host build of them
// (csrc/cuda/check/host_check.cu) can be checked against the reference without a GPU.
template <typename A>
__host__ __device__ __forceinline__ A sigmoid(A h) { return A(1) / (A(1) + exp(-h)); }

template <typename A>
__host__ __device__ __forceinline__ A act_forward(A h, Act act) {
  switch (act) {
    case Act::Relu: return h > A(0) ? h : A(0);
    case Act::Gelu: return A(0.5) * h * (A(1) + erf(h * A(0.70710678118654752440)));
    case Act::QuickGelu: return h * sigmoid(A(1.702) * h);
    case Act::Silu: return h * sigmoid(h);
    default: return h;
  }
}

template <typename A>
__host__ __device__ __forceinline__ A act_derivative(A h, Act act) {
  switch (act) {
    case Act::Relu: return h > A(0) ? A(1) : A(0);
    case Act::Gelu: {
      const A cdf = A(0.5) * (A(1) + erf(h * A(0.70710678118654752440)));
      const A pdf = exp(A(-0.5) * h * h) * A(0.39894228040143267794);
      return cdf + h * pdf;
    }
    case Act::QuickGelu:
    case Act::Silu: {
      const A k = act == Act::QuickGelu ? A(1.702) : A(1);
      const A s = sigmoid(k * h);
      return s + k * h * s * (A(1) - s);
    }
    default: return A(1);
  }
}

// Dropout factor of flat element `offset`: 0 or 1 / (1 - p); 1 without dropout.
template <typename A>
__host__ __device__ __forceinline__ A dropout_factor(const Dropout& drop, uint64_t offset) {
  if (drop.p <= 0.0f) return A(1);
  const float u = philox_uniform(uint64_t(*drop.seed), offset);
  return u >= drop.p ? A(drop.keep_scale) : A(0);
}

template <typename T> struct TypeTag { using type = T; };

// Calls fn(TypeTag<T>{}) with the element type T of `dtype`.
template <typename Fn>
void dispatch(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::F32: fn(TypeTag<float>{}); break;
    case DType::F64: fn(TypeTag<double>{}); break;
    case DType::F16: fn(TypeTag<__half>{}); break;
    case DType::BF16: fn(TypeTag<__nv_bfloat16>{}); break;
  }
}

}  // namespace cuda
}  // namespace pyadapt
