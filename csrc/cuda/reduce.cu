// Deterministic reductions for the gradients of biases and of the learnable scale. No float
// atomics: each block writes its partial sum to a workspace slot, and a second kernel adds the
// partials in a fixed order. The partitioning depends only on the shapes (never on the device or
// on timing), so results are bit-identical from run to run.
#include "common.cuh"

namespace pyadapt {
namespace cuda {
namespace {

constexpr int kColTile = 32;    // columns per block (one warp wide: coalesced rows)
constexpr int kRowLanes = 8;    // threads per column in a block
constexpr int64_t kMinChunkRows = 256;
constexpr int64_t kMaxChunks = 64;
constexpr int kDotMaxBlocks = 1024;

int64_t chunk_rows(int64_t rows) {
  const int64_t by_count = (rows + kMaxChunks - 1) / kMaxChunks;
  return by_count > kMinChunkRows ? by_count : kMinChunkRows;
}

int64_t chunks(int64_t rows) { return (rows + chunk_rows(rows) - 1) / chunk_rows(rows); }

template <typename T>
__global__ void col_partial_kernel(const T* __restrict__ a, int64_t rows, int64_t cols,
                                   int64_t rows_per_chunk, acc_t<T>* __restrict__ partial) {
  using A = acc_t<T>;
  __shared__ A lanes[kRowLanes][kColTile];
  const int64_t col = int64_t(blockIdx.x) * kColTile + threadIdx.x;
  const int64_t start = int64_t(blockIdx.y) * rows_per_chunk;
  const int64_t stop = start + rows_per_chunk < rows ? start + rows_per_chunk : rows;
  A sum = A(0);
  if (col < cols)
    for (int64_t i = start + threadIdx.y; i < stop; i += kRowLanes)
      sum += to_acc(a[i * cols + col]);
  lanes[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    A total = A(0);
#pragma unroll
    for (int k = 0; k < kRowLanes; ++k) total += lanes[k][threadIdx.x];
    partial[int64_t(blockIdx.y) * cols + col] = total;
  }
}

template <typename A>
__global__ void col_finish_kernel(const A* __restrict__ partial, int64_t n_chunks, int64_t cols,
                                  A* __restrict__ out) {
  for (int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; col < cols;
       col += int64_t(gridDim.x) * blockDim.x) {
    A total = A(0);
    for (int64_t c = 0; c < n_chunks; ++c) total += partial[c * cols + col];
    out[col] = total;
  }
}

int dot_blocks(int64_t n) {
  const int64_t per_block = int64_t(kThreads) * 4;
  int64_t b = (n + per_block - 1) / per_block;
  if (b < 1) b = 1;
  return int(b < kDotMaxBlocks ? b : kDotMaxBlocks);
}

// Tree sum of one value per thread; the result is valid in thread 0.
template <typename A>
__device__ A block_sum(A v, A* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) shared[threadIdx.x] += shared[threadIdx.x + width];
    __syncthreads();
  }
  return shared[0];
}

template <typename T>
__global__ void dot_partial_kernel(const T* __restrict__ a, const T* __restrict__ b,
                                   const T* __restrict__ row_scale, int64_t rows, int64_t cols,
                                   acc_t<T>* __restrict__ partial) {
  using A = acc_t<T>;
  __shared__ A shared[kThreads];
  const int64_t n = rows * cols;
  A sum = A(0);
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x) {
    A v = to_acc(a[e]) * to_acc(b[e]);
    if (row_scale) v *= to_acc(row_scale[e / cols]);
    sum += v;
  }
  const A total = block_sum(sum, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

template <typename A>
__global__ void dot_finish_kernel(const A* __restrict__ partial, int n, A* __restrict__ out) {
  __shared__ A shared[kThreads];
  A sum = A(0);
  for (int i = threadIdx.x; i < n; i += kThreads) sum += partial[i];
  const A total = block_sum(sum, shared);
  if (threadIdx.x == 0) out[0] = total;
}

}  // namespace

int64_t col_sum_workspace(int64_t rows, int64_t cols) {
  const int64_t n = chunks(rows) * cols;
  return n > 0 ? n : 1;
}

void col_sum(DType dtype, const void* a, int64_t rows, int64_t cols, void* workspace, void* out,
             cudaStream_t stream) {
  if (cols == 0) return;
  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const int64_t n_chunks = chunks(rows);
    if (n_chunks > 0) {
      const dim3 grid(unsigned((cols + kColTile - 1) / kColTile), unsigned(n_chunks));
      col_partial_kernel<T><<<grid, dim3(kColTile, kRowLanes), 0, stream>>>(
          static_cast<const T*>(a), rows, cols, chunk_rows(rows), static_cast<A*>(workspace));
    }
    col_finish_kernel<A><<<grid_for(cols), kThreads, 0, stream>>>(
        static_cast<const A*>(workspace), n_chunks, cols, static_cast<A*>(out));
  });
}

int64_t weighted_dot_workspace(int64_t rows, int64_t cols) { return dot_blocks(rows * cols); }

void weighted_dot(DType dtype, const void* a, const void* b, const void* row_scale, int64_t rows,
                  int64_t cols, void* workspace, void* out, cudaStream_t stream) {
  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const int blocks = dot_blocks(rows * cols);
    dot_partial_kernel<T><<<blocks, kThreads, 0, stream>>>(
        static_cast<const T*>(a), static_cast<const T*>(b), static_cast<const T*>(row_scale),
        rows, cols, static_cast<A*>(workspace));
    dot_finish_kernel<A><<<1, kThreads, 0, stream>>>(static_cast<const A*>(workspace), blocks,
                                                     static_cast<A*>(out));
  });
}

}  // namespace cuda
}  // namespace pyadapt
