// The AVX-512 loops over a packed weight (packed.h), shared by the value types and multiply units:
// bf16_avx512.cpp and int8_avx512.cpp (fp32 FMA) and bf16_avx512bf16.cpp (bf16 pair dot products)
// each define a Loader and instantiate `run` with it. Include after `#pragma GCC target(...)` and
// <immintrin.h>.
//
// Loader concept:
//   using Value = ...;                      the stored element type
//   static constexpr bool kScaled;          multiply each row's sum by kUnit, then by scales[row]
//   static constexpr int kVecs;             vectors per 64 columns (4 of fp32, 2 of bf16 pairs)
//   using W = ...;                          one vector of weights or inputs as multiplied (__m512, __m512bh)
//   static void load(const Value* p, uint64_t mask, W w[kVecs]);  expand the popcount(mask) values at p
//   static void load_dense(const Value* p, W w[kVecs]);           64 stored values at p
//   static void inputs(const float* x, Lanes out[kVecs]);          64 fp32 inputs as madd takes them
//   static W in(const Lanes& x);                                   one vector of those inputs
//   static __m512 madd(__m512 acc, W w, W x);                      acc + w * x, lane by lane
// (Fp32Fma below is the multiply unit of the fp32 loaders.)

#pragma once

#include <cstdint>
#include <vector>

#include "packed.h"
#include "prefetch.h"

namespace sparsefit::avx512 {
// Internal linkage (unnamed namespace): each kernel file compiles its own copy under its own
// `#pragma GCC target`, so the linker never hands one instruction set's code to another's row.
namespace {

// 64 bytes of lanes (16 fp32 or 32 bf16), as an element type a std::vector aligns.
struct alignas(64) Lanes {
  float f[16];
};

// fp32 inputs as they are, multiplied by fp32 weights with FMA.
struct Fp32Fma {
  static constexpr int kVecs = 4;
  using W = __m512;
  static inline __m512 in(const Lanes& x) { return _mm512_load_ps(x.f); }
  static inline __m512 madd(__m512 acc, __m512 w, __m512 x) { return _mm512_fmadd_ps(w, x, acc); }
  static inline void inputs(const float* x, Lanes out[4]) {
    for (int q = 0; q < 4; ++q) _mm512_store_ps(out[q].f, _mm512_loadu_ps(x + 16 * q));
  }
};

template <class L>
inline float finish(const PackedView& w, __m512 acc, int64_t n) {
  float s = _mm512_reduce_add_ps(acc);
  if constexpr (L::kScaled) s = s * L::kUnit * w.scales[n];
  if (w.bias != nullptr) s += w.bias[n];
  return s;
}

template <class L, bool Dense>
inline void load_row(const typename L::Value* p, uint64_t mask, typename L::W v[L::kVecs]) {
  if constexpr (Dense) {
    L::load_dense(p, v);
  } else {
    L::load(p, mask, v);
  }
}

// Batch 1: the R rows of block b side by side, so each group's inputs are loaded once for R rows
// and R independent accumulation chains are in flight. `xv`: the inputs as `L::inputs` gives them,
// kVecs per group.
template <class L, bool Dense, int R>
inline void gemv_block(const PackedView& w, const Lanes* xv, float* y, int64_t b) {
  using V = typename L::Value;
  constexpr int K = L::kVecs;
  const V* p = static_cast<const V*>(w.values) + w.block_offsets[b];
  const uint64_t* m = Dense ? nullptr : w.masks + b * w.groups * R;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < w.groups; ++g) {
    typename L::W xg[K];
    for (int q = 0; q < K; ++q) xg[q] = L::in(xv[g * K + q]);
    if constexpr (!Dense) _mm_prefetch(reinterpret_cast<const char*>(m + g * R) + kAheadMasks, _MM_HINT_T0);
    for (int r = 0; r < R; ++r) {
      typename L::W v[K];
      const uint64_t mask = Dense ? ~0ull : m[g * R + r];
      _mm_prefetch(reinterpret_cast<const char*>(p) + kAheadValues, _MM_HINT_T0);
      load_row<L, Dense>(p, mask, v);
      p += Dense ? kGroup : _mm_popcnt_u64(mask);
#pragma GCC unroll 4
      for (int q = 0; q < K; ++q) acc[r] = L::madd(acc[r], v[q], xg[q]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const int64_t n = b * R + r;
    if (n < w.rows) y[n] = finish<L>(w, acc[r], n);
  }
}

// Where each (group, row) of block b starts in its values: one pass over the block's masks.
template <int R>
inline void row_starts(const PackedView& w, int64_t b, std::vector<int64_t>& starts) {
  starts.resize(w.groups * R);
  const uint64_t* m = w.masks + b * w.groups * R;
  int64_t at = w.block_offsets[b];
  for (int64_t i = 0; i < w.groups * R; ++i) {
    starts[i] = at;
    at += _mm_popcnt_u64(m[i]);
  }
}

// Batch B (2..8) per pass: a register tile of 2 weight rows x B batch rows (2B accumulators), so
// each expanded piece of weight meets B inputs and each input vector loaded meets 2 rows. The
// inputs come interleaved (`interleave`: xt[(g * kVecs + q) * B + i] is batch row i's vector q of
// group g) so the tile reads them at fixed offsets from one pointer. Columns go in chunks of
// kChunkGroups groups (B x 512 inputs, 16 KiB, stay in L1 while the block's row pairs pass over
// them); a tile's accumulators wait in `acc` between chunks, unchanged, so each output is still
// summed in gemv_block's order.
constexpr int kBatchTile = 8;
constexpr int64_t kChunkGroups = 8;

template <class L, bool Dense, int R, int B>
inline void gemm_block(const PackedView& w, const Lanes* xt, float* y, int64_t ys, int64_t b,
                       const std::vector<int64_t>& starts, __m512* acc) {
  using V = typename L::Value;
  constexpr int K = L::kVecs;
  const V* base = static_cast<const V*>(w.values);
  const uint64_t* m = Dense ? nullptr : w.masks + b * w.groups * R;
  auto row_at = [&](int64_t g, int r) -> const V* {
    return base + (Dense ? w.block_offsets[b] + (g * R + r) * kGroup : starts[g * R + r]);
  };
  for (int i = 0; i < R * B; ++i) acc[i] = _mm512_setzero_ps();
  NextBlock next = next_block<V, R>(w, b, w.groups * R / 2);
  for (int64_t g0 = 0; g0 < w.groups; g0 += kChunkGroups) {
    const int64_t g1 = g0 + kChunkGroups < w.groups ? g0 + kChunkGroups : w.groups;
    for (int r = 0; r < R; r += 2) {
      __m512 a0[B], a1[B];
#pragma GCC unroll 8
      for (int i = 0; i < B; ++i) a0[i] = acc[r * B + i], a1[i] = acc[(r + 1) * B + i];
      const Lanes* xg = xt + g0 * K * B;
      for (int64_t g = g0; g < g1; ++g, xg += K * B) {
        next.step();
        typename L::W v0[K], v1[K];
        load_row<L, Dense>(row_at(g, r), Dense ? ~0ull : m[g * R + r], v0);
        load_row<L, Dense>(row_at(g, r + 1), Dense ? ~0ull : m[g * R + r + 1], v1);
#pragma GCC unroll 4
        for (int q = 0; q < K; ++q) {
#pragma GCC unroll 8
          for (int i = 0; i < B; ++i) {
            const typename L::W xi = L::in(xg[q * B + i]);
            a0[i] = L::madd(a0[i], v0[q], xi);
            a1[i] = L::madd(a1[i], v1[q], xi);
          }
        }
      }
#pragma GCC unroll 8
      for (int i = 0; i < B; ++i) acc[r * B + i] = a0[i], acc[(r + 1) * B + i] = a1[i];
    }
  }
  for (int r = 0; r < R; ++r) {
    const int64_t n = b * R + r;
    if (n >= w.rows) break;
    for (int i = 0; i < B; ++i) y[i * ys + n] = finish<L>(w, acc[r * B + i], n);
  }
}

// x (B rows, xs apart) as L::inputs gives it, in gemm_block's interleaved order (B = 1: gemv_block's).
template <class L>
inline void interleave(const float* x, int64_t xs, int64_t batch, int64_t groups, Lanes* xt) {
  constexpr int K = L::kVecs;
  Lanes v[K];
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t i = 0; i < batch; ++i) {
      L::inputs(x + i * xs + g * kGroup, v);
      for (int q = 0; q < K; ++q) xt[(g * K + q) * batch + i] = v[q];
    }
}

template <class L, bool Dense, int R>
inline void run_r(const PackedView& w, const float* x, int64_t batch, int64_t xs, float* y, int64_t ys, int64_t b0,
                  int64_t b1) {
  // Each pass of up to 8 batch rows gets its own interleaved copy of its inputs. Blocks outermost,
  // so each block streams from memory once and the passes re-read it from cache.
  constexpr int K = L::kVecs;
  const int64_t passes = (batch + kBatchTile - 1) / kBatchTile;
  static thread_local std::vector<Lanes> xt;
  xt.resize(batch * w.groups * K);
  for (int64_t k = 0; k < passes; ++k) {
    const int64_t n = batch - k * kBatchTile < kBatchTile ? batch - k * kBatchTile : kBatchTile;
    interleave<L>(x + k * kBatchTile * xs, xs, n, w.groups, xt.data() + k * kBatchTile * w.groups * K);
  }
  if (batch == 1) {
    for (int64_t b = b0; b < b1; ++b) gemv_block<L, Dense, R>(w, xt.data(), y, b);
    return;
  }
  std::vector<int64_t> starts;
  __m512 acc[R * kBatchTile];
  for (int64_t b = b0; b < b1; ++b) {
    if (!Dense) row_starts<R>(w, b, starts);
    for (int64_t k = 0; k < passes; ++k) {
      const int64_t n = batch - k * kBatchTile < kBatchTile ? batch - k * kBatchTile : kBatchTile;
      const Lanes* xk = xt.data() + k * kBatchTile * w.groups * K;
      float* yk = y + k * kBatchTile * ys;
      switch (n) {
#define SPARSEFIT_CASE(B) \
  case B:                 \
    gemm_block<L, Dense, R, B>(w, xk, yk, ys, b, starts, acc); \
    break;
        SPARSEFIT_CASE(1) SPARSEFIT_CASE(2) SPARSEFIT_CASE(3) SPARSEFIT_CASE(4)
        SPARSEFIT_CASE(5) SPARSEFIT_CASE(6) SPARSEFIT_CASE(7) SPARSEFIT_CASE(8)
#undef SPARSEFIT_CASE
      }
    }
  }
}

template <class L>
void run(const PackedView& w, const float* x, int64_t batch, int64_t xs, float* y, int64_t ys, int64_t b0,
         int64_t b1) {
  const bool dense = w.masks == nullptr;
  switch (w.row_block) {
    case 4:
      return dense ? run_r<L, true, 4>(w, x, batch, xs, y, ys, b0, b1) : run_r<L, false, 4>(w, x, batch, xs, y, ys, b0, b1);
    case 8:
      return dense ? run_r<L, true, 8>(w, x, batch, xs, y, ys, b0, b1) : run_r<L, false, 8>(w, x, batch, xs, y, ys, b0, b1);
    case 16:
      return dense ? run_r<L, true, 16>(w, x, batch, xs, y, ys, b0, b1)
                   : run_r<L, false, 16>(w, x, batch, xs, y, ys, b0, b1);
  }
}

}  // namespace
}  // namespace sparsefit::avx512
