// A deterministic, packed, register-tiled GEMM for the CPU kernels built around a frozen linear
// layer (lowrank.cpp, radapter.cpp, fold.cpp):  C (m x n) = epilogue(sum_k A(i, k) B(k, j)).
//
// Why our own: a BLAS picks its blocking, and so its summation order, from the number of threads
// it is given, and the tests demand bit-identical results across OMP thread counts. Here every
// output element is summed over k in blocks whose size depends on K only (kc_for): each block in
// k order in registers, added to the previous blocks' total. The threads split the output into
// tiles whose sizes depend on the shape only, so neither the thread count nor which thread runs
// a tile changes a bit. (It is also faster than MKL's sgemm on the 2-core AMD EPYC CI machine:
// measured side by side, 4096 x 768 x 768 fp32, 2 threads, 216 vs 197 GFLOP/s; peak 231.)
//
// Structure (the usual packed GEMM): B is packed once, in parallel, into column panels of NR
// columns (kc x NR per k-block, contiguous, zero columns past n), shared read-only by the
// threads; each thread packs the MR x kc panel of A it is about to use (zero rows past m) and
// runs the MR x NR micro-kernel over the column panels of its tile. The micro-kernel keeps
// MR x NV vectors of sums in registers, its shape picked per product from n: wide outputs use
// 6 x 4 vectors (24 of AVX-512's 32 registers; per k 4 loads and 6 broadcasts feed 24 FMAs, the
// fewest broadcasts per FMA of the shapes measured: 94% of one core's peak), narrow ones (an
// adapter's rank) narrower tiles with more rows, so little of a tile is padding. AVX2 targets
// (16 registers) use 6 x 2 and 12 x 1. The vector width follows the compile target
// (-march=native): 64 bytes with AVX-512, else 32.
// Operands are strided views (rs, cs): a matrix as stored, its transpose, a column slice; they
// are converted to the compute type T while packed. The epilogue receives each finished row
// segment as NV vectors and writes it (bias, scale, residual, rounding to the storage type): the
// output is written once, never zero-filled first.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

namespace pyadapt {
namespace cpu {

#if defined(__AVX512F__)
constexpr int kGemmVecBytes = 64;
#else
constexpr int kGemmVecBytes = 32;
#endif

template <typename T>
struct GemmVec {
  static constexpr int L = kGemmVecBytes / int(sizeof(T));  // lanes per vector
  typedef T V __attribute__((vector_size(kGemmVecBytes)));
  typedef T U __attribute__((vector_size(kGemmVecBytes), aligned(alignof(T))));  // unaligned
};

// A micro-tile shape: MR rows x NV vectors (NR = NV * L columns).
template <typename T, int NV_, int MR_>
struct Tile {
  static constexpr int NV = NV_, MR = MR_, L = GemmVec<T>::L, NR = NV_ * GemmVec<T>::L;
  using V = typename GemmVec<T>::V;
};

// Inner-dimension blocks: K itself up to kMaxKc, else equal blocks of at most kMaxKc (multiples
// of 8). A B panel (kc x NR) then stays in L2 while the A panel (MR x kc) sits in L1. Depends
// on K only.
constexpr int64_t kMaxKc = 768;

inline int64_t kc_for(int64_t K) {
  if (K <= kMaxKc) return std::max<int64_t>(K, 1);
  const int64_t blocks = (K + kMaxKc - 1) / kMaxKc;
  return ((K + blocks - 1) / blocks + 7) / 8 * 8;
}

// A strided matrix view: element (i, k) at p[i * rs + k * cs].
template <typename S>
struct View {
  const S* p;
  int64_t rs, cs;
  View<S> t() const { return {p, cs, rs}; }
};

// 64-byte aligned scratch (packed panels are read with aligned vector loads).
template <typename T>
struct AlignedBuf {
  T* p = nullptr;
  explicit AlignedBuf(size_t n) {
    if (n) p = static_cast<T*>(::operator new[](n * sizeof(T), std::align_val_t(64)));
  }
  ~AlignedBuf() {
    if (p) ::operator delete[](p, std::align_val_t(64));
  }
  AlignedBuf(AlignedBuf&& o) noexcept : p(o.p) { o.p = nullptr; }
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
};

// The micro-kernel: acc[q][v] = sum_{k < kc} A(q, k) * b[k * NR + v * L ..], k in order. A is
// a packed panel (A(q, k) = a[k * MR + q]) or, when a_rs > 0, read in place: A(q, k) =
// a[q * a_rs + k * a_cs] (narrow products, where packing A would cost as much as the FMAs).
template <typename T, typename Tl>
__attribute__((always_inline)) inline void gemm_ukernel(int64_t kc, const T* __restrict__ a,
                                                        int64_t a_rs, int64_t a_cs,
                                                        const T* __restrict__ b,
                                                        typename Tl::V (&acc)[Tl::MR][Tl::NV]) {
  using V = typename Tl::V;
  b = static_cast<const T*>(__builtin_assume_aligned(b, 64));
#pragma GCC unroll 32
  for (int q = 0; q < Tl::MR; ++q)
#pragma GCC unroll 8
    for (int v = 0; v < Tl::NV; ++v) acc[q][v] = V{};
  auto step = [&](const T* ak, int64_t rs, const T* bk) __attribute__((always_inline)) {
    V bv[Tl::NV];
#pragma GCC unroll 8
    for (int v = 0; v < Tl::NV; ++v) bv[v] = *reinterpret_cast<const V*>(bk + v * Tl::L);
#pragma GCC unroll 32
    for (int q = 0; q < Tl::MR; ++q) {
      const T s = ak[q * rs];
#pragma GCC unroll 8
      for (int v = 0; v < Tl::NV; ++v) acc[q][v] += bv[v] * s;
    }
  };
  if (a_rs == 0) {
    a = static_cast<const T*>(__builtin_assume_aligned(a, 64));
    for (int64_t k = 0; k < kc; ++k) step(a + k * Tl::MR, 1, b + k * Tl::NR);
  } else {
    for (int64_t k = 0; k < kc; ++k) step(a + k * a_cs, a_rs, b + k * Tl::NR);
  }
}

// Packs rows [i0, i0 + MR) x k in [k0, k0 + kc) of A into ap[k * MR + q] (zero rows past m).
template <typename T, int MR, typename S>
inline void pack_a(const View<S>& A, int64_t m, int64_t i0, int64_t k0, int64_t kc, T* ap) {
  const int rows = int(std::min<int64_t>(MR, m - i0));
  if (A.cs == 1) {
    for (int q = 0; q < rows; ++q) {
      const S* row = A.p + (i0 + q) * A.rs + k0;
      for (int64_t k = 0; k < kc; ++k) ap[k * MR + q] = T(row[k]);
    }
  } else {
    for (int64_t k = 0; k < kc; ++k) {
      const S* col = A.p + (k0 + k) * A.cs + i0 * A.rs;
      for (int q = 0; q < rows; ++q) ap[k * MR + q] = T(col[q * A.rs]);
    }
  }
  if (rows < MR)
    for (int64_t k = 0; k < kc; ++k)
      for (int q = rows; q < MR; ++q) ap[k * MR + q] = T(0);
}

// All of B, packed: the k-block starting at k0 (kcs = min(kc, K - k0) rows) holds npanels
// panels of kcs x NR, one after the other; columns past n are zero.
template <typename T, int NR>
struct PackedB {
  int64_t K, n, kc, nkb, npanels;
  AlignedBuf<T> buf;
  PackedB(int64_t K_, int64_t n_)
      : K(K_), n(n_), kc(kc_for(K_)), nkb(std::max<int64_t>(1, (K_ + kc - 1) / kc)),
        npanels((n_ + NR - 1) / NR),
        buf(size_t(std::max<int64_t>(K_, 1) * ((n_ + NR - 1) / NR) * NR)) {}
  T* panel(int64_t k0, int64_t jp) const {
    const int64_t kcs = std::min(kc, K - k0);
    return buf.p + k0 * npanels * NR + jp * kcs * NR;
  }
  int64_t packing_tasks() const { return K > 0 ? nkb * npanels : 0; }

  // Packs panel jp of k-block kb of B (task t = kb * npanels + jp).
  template <typename S>
  void pack_task(const View<S>& B, int64_t t) const {
    const int64_t kb = t / npanels, jp = t % npanels;
    const int64_t k0 = kb * kc, kcs = std::min(kc, K - k0);
    const int64_t j0 = jp * NR, cols = std::min<int64_t>(NR, n - j0);
    T* dst = panel(k0, jp);
    if (B.cs == 1) {
      for (int64_t k = 0; k < kcs; ++k) {
        const S* src = B.p + (k0 + k) * B.rs + j0;
        T* d = dst + k * NR;
        for (int64_t j = 0; j < cols; ++j) d[j] = T(src[j]);
        for (int64_t j = cols; j < NR; ++j) d[j] = T(0);
      }
    } else {
      // a transposed weight: each column's k run is contiguous in memory
      for (int64_t k = 0; k < kcs; ++k)
        for (int64_t j = cols; j < NR; ++j) dst[k * NR + j] = T(0);
      for (int64_t j = 0; j < cols; ++j) {
        const S* src = B.p + (j0 + j) * B.cs + k0 * B.rs;
        for (int64_t k = 0; k < kcs; ++k) dst[k * NR + j] = T(src[k * B.rs]);
      }
    }
  }

  // Packs all of B, the panels in parallel.
  template <typename S>
  void pack(const View<S>& B) const {
    at::parallel_for(0, packing_tasks(), 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) pack_task(B, t);
    });
  }
};

// The core loop: rows [pm0 * MR, pm1 * MR) (clipped to m) x column panels [jp0, jp1) of
// epi(A @ B), B packed in pb. Per k-block, each row panel of A is packed (or, when `pack` is
// false and A is already of the compute type, read in place) and the micro-kernel runs over the
// column panels. With several k-blocks the running sums wait in `tot` (row_panels * MR x ld).
// Single-threaded: callers split the work.
template <typename T, typename Tl, typename SA, typename Epi>
void gemm_panels(const View<SA>& A, int64_t m, const PackedB<T, Tl::NR>& pb, int64_t pm0,
                 int64_t pm1, int64_t jp0, int64_t jp1, bool pack, T* ap, T* tot, int64_t ld,
                 Epi& epi) {
  using V = typename Tl::V;
  constexpr int MR = Tl::MR, NR = Tl::NR, NV = Tl::NV;
  const int64_t K = pb.K, nkb = pb.nkb;
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const int64_t k0 = kb * pb.kc, kcs = K > 0 ? std::min(pb.kc, K - k0) : 0;
    const bool first = kb == 0, last = kb == nkb - 1;
    for (int64_t pm = pm0; pm < pm1; ++pm) {
      const int64_t i0 = pm * MR;
      const int rows = int(std::min<int64_t>(MR, m - i0));
      // this panel's A operand: packed, or read in place (a full panel of compute-type A)
      const T* a = ap;
      int64_t a_rs = 0, a_cs = 0;
      if (kcs > 0) {
        bool in_place = false;
        if constexpr (std::is_same_v<SA, T>) {
          if (!pack && rows == MR && A.rs != 0) {  // (a_rs = 0 would read as packed)
            a = A.p + i0 * A.rs + k0 * A.cs;
            a_rs = A.rs;
            a_cs = A.cs;
            in_place = true;
          }
        }
        if (!in_place) pack_a<T, MR, SA>(A, m, i0, k0, kcs, ap);
      }
      for (int64_t jp = jp0; jp < jp1; ++jp) {
        V acc[MR][NV];
        if (kcs > 0) {
          gemm_ukernel<T, Tl>(kcs, a, a_rs, a_cs, pb.panel(k0, jp), acc);
        } else {
          for (int q = 0; q < MR; ++q)
            for (int v = 0; v < NV; ++v) acc[q][v] = V{};
        }
        T* tp = nkb > 1 ? tot + (pm - pm0) * MR * ld + (jp - jp0) * NR : nullptr;
        for (int q = 0; q < rows; ++q) {
          V* run = reinterpret_cast<V*>(tp + q * ld);
          if (!first)
            for (int v = 0; v < NV; ++v) acc[q][v] = run[v] + acc[q][v];
          if (last)
            epi(i0 + q, jp * NR, acc[q]);
          else
            for (int v = 0; v < NV; ++v) run[v] = acc[q][v];
        }
      }
    }
  }
}

// Output tiles handed to the threads: row blocks of whole micro-panels (at most
// kGemmMaxRowPanels), split into column blocks of whole column panels when there are few rows;
// about kGemmTasks tiles where the shape allows, so that two or more threads get nearly equal
// shares (a static split of 98 tiles over 2 threads is 49 / 49; of 37, 19 / 18). Shape-only.
constexpr int64_t kGemmTasks = 128;
constexpr int64_t kGemmMaxRowPanels = 4;

struct GemmTiling {
  int64_t row_panels, col_panels;  // per tile
  int64_t tiles_m, tiles_n;
};

inline GemmTiling gemm_tiling(int64_t mpanels, int64_t npanels) {
  GemmTiling t{1, 1, 0, 0};
  if (mpanels <= 0 || npanels <= 0) return t;  // an empty output: no tiles
  t.row_panels =
      std::clamp<int64_t>((mpanels + kGemmTasks - 1) / kGemmTasks, 1, kGemmMaxRowPanels);
  t.tiles_m = (mpanels + t.row_panels - 1) / t.row_panels;
  const int64_t want_n = std::max<int64_t>(1, (kGemmTasks + t.tiles_m - 1) / t.tiles_m);
  t.col_panels = std::max<int64_t>(1, (npanels + want_n - 1) / want_n);
  t.tiles_n = (npanels + t.col_panels - 1) / t.col_panels;
  return t;
}

// Whether the A panels are packed: when the output has enough column panels to reuse each
// packed panel (packing costs MR x kc moves, a column panel MR x kc x NV FMAs), and always when
// A is not already in the compute type. Shape-only; both paths sum in the same order.
template <typename T, typename SA>
inline bool packs_a(int64_t npanels) {
  return !std::is_same_v<SA, T> || npanels >= 4;
}

// One product, planned: B's packed panels and the output tiles. The work comes in two lists of
// independent tasks, run by gemm (one product) or gemm_group (many) in parallel regions: first
// pack_task(0 .. packing_tasks()), then run_tile(0 .. tiles()). Which thread runs a task never
// changes a bit of the result.
template <typename T, typename Tl, typename SA, typename SB>
struct GemmPlan {
  static constexpr int MR = Tl::MR, NR = Tl::NR;
  int64_t m, n, K;
  View<SA> A;
  View<SB> B;
  PackedB<T, NR> pb;
  int64_t mpanels;
  GemmTiling tl;
  bool pack;

  GemmPlan(int64_t m_, int64_t n_, int64_t K_, const View<SA>& A_, const View<SB>& B_)
      : m(m_), n(n_), K(K_), A(A_), B(B_), pb(K_, n_), mpanels((m_ + MR - 1) / MR),
        tl(gemm_tiling(mpanels, pb.npanels)), pack(packs_a<T, SA>(pb.npanels)) {}

  int64_t packing_tasks() const { return pb.packing_tasks(); }
  void pack_task(int64_t t) const { pb.pack_task(B, t); }
  int64_t tiles() const { return tl.tiles_m * tl.tiles_n; }
  // multiply-adds of tile t (for scheduling the heaviest first)
  double tile_cost(int64_t t) const {
    const int64_t pm0 = (t / tl.tiles_n) * tl.row_panels, jp0 = (t % tl.tiles_n) * tl.col_panels;
    return double(std::min(mpanels, pm0 + tl.row_panels) - pm0) * MR *
           double(std::min(pb.npanels, jp0 + tl.col_panels) - jp0) * NR * double(K);
  }
  // per-thread scratch: a packed A panel, and a tile's running totals across k-blocks
  size_t a_scratch() const { return size_t(MR * pb.kc); }
  size_t tot_scratch() const {
    return pb.nkb > 1 ? size_t(tl.row_panels * MR * tl.col_panels * NR) : 0;
  }

  // Computes output tile t and hands each finished row segment to epi.
  template <typename Epi>
  void run_tile(int64_t t, T* ap, T* tot, Epi& epi) const {
    const int64_t pm0 = (t / tl.tiles_n) * tl.row_panels;
    const int64_t jp0 = (t % tl.tiles_n) * tl.col_panels;
    gemm_panels<T, Tl, SA>(A, m, pb, pm0, std::min(mpanels, pm0 + tl.row_panels), jp0,
                           std::min(pb.npanels, jp0 + tl.col_panels), pack, ap, tot,
                           tl.col_panels * NR, epi);
  }
};

template <typename T, typename Tl, typename SA, typename SB, typename Epi>
void gemm_tiled(int64_t m, int64_t n, int64_t K, const View<SA>& A, const View<SB>& B,
                Epi& epi) {
  const GemmPlan<T, Tl, SA, SB> plan(m, n, K, A, B);
  at::parallel_for(0, plan.packing_tasks(), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) plan.pack_task(t);
  });
  at::parallel_for(0, plan.tiles(), 1, [&](int64_t t0, int64_t t1) {
    AlignedBuf<T> ap(plan.a_scratch()), tot(plan.tot_scratch());
    for (int64_t t = t0; t < t1; ++t) plan.run_tile(t, ap.p, tot.p, epi);
  });
}

// Micro-tile shape by output width n (shape-only, so still deterministic): the widest tile
// whose padding is modest.
enum class TileKind { W4, W2, W1 };

template <typename T>
inline TileKind tile_kind(int64_t n) {
  constexpr int64_t L = GemmVec<T>::L;
  if (kGemmVecBytes == 64 && n > 3 * L) return TileKind::W4;
  if (n > L) return TileKind::W2;
  return TileKind::W1;
}

// C = epi(A (m x K) @ B (K x n)): epi(i, j, v) gets `v`, an array of NV vectors holding the
// finished sums of row i, columns j .. j + NV * L (columns past n hold zeros: B is zero-padded),
// and writes them; NV varies with the tile shape, so epi is generic (`const auto& v`). K = 0
// gives the epilogue zeros. SA, SB: storage types of A and B (converted while packing); T: the
// compute type.
template <typename T, typename SA, typename SB, typename Epi>
void gemm(int64_t m, int64_t n, int64_t K, const View<SA>& A, const View<SB>& B, Epi&& epi) {
  if (m <= 0 || n <= 0) return;
  switch (tile_kind<T>(n)) {
    case TileKind::W4:
      if constexpr (kGemmVecBytes == 64) gemm_tiled<T, Tile<T, 4, 6>>(m, n, K, A, B, epi);
      break;
    case TileKind::W2:
      gemm_tiled<T, Tile<T, 2, (kGemmVecBytes == 64 ? 12 : 6)>>(m, n, K, A, B, epi);
      break;
    case TileKind::W1:
      gemm_tiled<T, Tile<T, 1, (kGemmVecBytes == 64 ? 24 : 12)>>(m, n, K, A, B, epi);
      break;
  }
}

// The tile shapes of callers that keep their own packed weights (the bottleneck kernel): wide
// outputs (d columns) and narrow ones (an adapter's rank).
template <typename T>
using WideTile = std::conditional_t<kGemmVecBytes == 64, Tile<T, 4, 6>, Tile<T, 2, 6>>;
template <typename T>
using NarrowTile = Tile<T, 2, (kGemmVecBytes == 64 ? 12 : 6)>;

// Scratch of gemm_serial for products over pb with up to `rows` rows of A.
template <typename T, typename Tl>
struct SerialScratch {
  AlignedBuf<T> ap, tot;
  SerialScratch(const PackedB<T, Tl::NR>& pb, int64_t rows)
      : ap(size_t(Tl::MR * pb.kc)),
        tot(pb.nkb > 1 ? size_t(round_up_to(rows, Tl::MR) * pb.npanels * Tl::NR) : 0) {}
  static int64_t round_up_to(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
};

// Single-threaded: all of epi(A (m x K) @ B), B packed once by the caller (pb). For kernels that
// run their own parallel loop over row blocks and reuse a packed weight for every block.
template <typename T, typename Tl, typename SA, typename Epi>
void gemm_serial(int64_t m, const View<SA>& A, const PackedB<T, Tl::NR>& pb,
                 SerialScratch<T, Tl>& s, Epi&& epi) {
  if (m <= 0 || pb.n <= 0) return;
  gemm_panels<T, Tl, SA>(A, m, pb, 0, (m + Tl::MR - 1) / Tl::MR, 0, pb.npanels,
                         packs_a<T, SA>(pb.npanels), s.ap.p, s.tot.p, pb.npanels * Tl::NR, epi);
}

// Many independent products C_p = epis[p](A_p (m_p x K_p) @ B_p (K_p x n_p)) in two parallel
// regions in all (packing, then computing): small and large products share the threads instead
// of running one after the other. Tiles are taken from a shared counter, heaviest first (a static
// split could hand one thread all the large ones); which thread runs a tile changes no bit. One
// tile shape for all (the widest): a tile's shape never changes the summation order.
template <typename T>
struct GemmArgs {
  int64_t m, n, K;
  View<T> A, B;
};

template <typename T, typename Epi>
void gemm_group(const std::vector<GemmArgs<T>>& args, std::vector<Epi>& epis) {
  using Tl = std::conditional_t<kGemmVecBytes == 64, Tile<T, 4, 6>, Tile<T, 2, 6>>;
  using Plan = GemmPlan<T, Tl, T, T>;
  std::vector<std::unique_ptr<Plan>> plans;
  std::vector<int64_t> pack_start{0};
  std::vector<std::pair<int64_t, int64_t>> tiles;  // (product, tile)
  size_t a_size = 0, tot_size = 0;
  for (size_t p = 0; p < args.size(); ++p) {
    const GemmArgs<T>& g = args[p];
    plans.push_back(std::make_unique<Plan>(std::max<int64_t>(g.m, 0), std::max<int64_t>(g.n, 0),
                                           g.K, g.A, g.B));
    const Plan& pl = *plans.back();
    const bool empty = g.m <= 0 || g.n <= 0;
    pack_start.push_back(pack_start.back() + (empty ? 0 : pl.packing_tasks()));
    if (empty) continue;
    for (int64_t t = 0; t < pl.tiles(); ++t) tiles.emplace_back(int64_t(p), t);
    a_size = std::max(a_size, pl.a_scratch());
    tot_size = std::max(tot_size, pl.tot_scratch());
  }
  at::parallel_for(0, pack_start.back(), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const size_t p = size_t(std::upper_bound(pack_start.begin(), pack_start.end(), t) -
                              pack_start.begin()) - 1;
      plans[p]->pack_task(t - pack_start[p]);
    }
  });
  std::stable_sort(tiles.begin(), tiles.end(), [&](const auto& a, const auto& b) {
    return plans[size_t(a.first)]->tile_cost(a.second) >
           plans[size_t(b.first)]->tile_cost(b.second);
  });
  std::atomic<int64_t> next{0};
  const int64_t ntiles = int64_t(tiles.size());
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntiles));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    AlignedBuf<T> ap(a_size), tot(tot_size);
    for (int64_t i = next++; i < ntiles; i = next++) {
      const auto& [p, t] = tiles[size_t(i)];
      plans[size_t(p)]->run_tile(t, ap.p, tot.p, epis[size_t(p)]);
    }
  });
}

// out[i * ldo + j] = alpha * acc + beta * init(i, j) for j < n, converted to O; init: none, one
// row for every i (a bias, ldi = 0) or a matrix (row stride ldi; it may be out itself).
template <typename T, typename O, typename IT = O>
struct StoreEpi {
  O* out;
  int64_t ldo, n;
  T alpha = T(1), beta = T(0);
  const IT* init = nullptr;
  int64_t ldi = 0;

  template <typename VA>
  void operator()(int64_t i, int64_t j, const VA& v) const {
    using G = GemmVec<T>;
    constexpr int NV = int(sizeof(VA) / sizeof(typename G::V));
    const int64_t cols = std::min<int64_t>(NV * G::L, n - j);
    O* o = out + i * ldo + j;
    const IT* in = init ? init + i * ldi + j : nullptr;
    if constexpr (std::is_same_v<O, T> && std::is_same_v<IT, T>) {
      if (cols == NV * G::L) {  // a whole tile: vector loads and stores
        for (int k = 0; k < NV; ++k) {
          typename G::V r = v[k] * alpha;
          if (in) r += *reinterpret_cast<const typename G::U*>(in + k * G::L) * beta;
          *reinterpret_cast<typename G::U*>(o + k * G::L) = r;
        }
        return;
      }
    }
    alignas(64) T buf[NV * G::L];
    std::memcpy(buf, &v, sizeof(buf));
    for (int64_t c = 0; c < cols; ++c)
      o[c] = in ? O(alpha * buf[c] + beta * T(in[c])) : O(alpha * buf[c]);
  }
};

// The transposed store: C^T was computed (rows of the computation are columns of out), so
// element (i, j) of the computation goes to out[j * ldo + i]. For products with few output
// rows and many columns (an adapter's r x d weight gradient), computed as their transpose so
// that the small operand is the packed one.
template <typename T, typename O, typename IT = O>
struct StoreTransposedEpi {
  O* out;
  int64_t ldo, n;  // n: columns of the computation = rows of out
  T alpha = T(1), beta = T(0);
  const IT* init = nullptr;
  int64_t ldi = 0;  // init(j, i) at init[j * ldi + i]; ldi = 0 never (a bias is per column)

  template <typename VA>
  void operator()(int64_t i, int64_t j, const VA& v) const {
    using G = GemmVec<T>;
    constexpr int NV = int(sizeof(VA) / sizeof(typename G::V));
    const int64_t cols = std::min<int64_t>(NV * G::L, n - j);
    alignas(64) T buf[NV * G::L];
    std::memcpy(buf, &v, sizeof(buf));
    for (int64_t c = 0; c < cols; ++c) {
      O& o = out[(j + c) * ldo + i];
      o = init ? O(alpha * buf[c] + beta * T(init[(j + c) * ldi + i])) : O(alpha * buf[c]);
    }
  }
};

}  // namespace cpu
}  // namespace pyadapt
