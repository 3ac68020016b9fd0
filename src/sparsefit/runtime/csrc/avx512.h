// The AVX-512 loops over a packed weight (packed.h), shared by the value types: bf16_avx512.cpp and
// int8_avx512.cpp each define a Loader (how 64 columns of one row become four 16-lane fp32 vectors)
// and instantiate `run` with it. Include after `#pragma GCC target(...)` and <immintrin.h>.
//
// Loader concept:
//   using Value = ...;                      the stored element type
//   static constexpr bool kScaled;          multiply each row's sum by kUnit, then by scales[row]
//   static void load(const Value* p, uint64_t mask, __m512 w[4]);  expand the popcount(mask) values at p
//   static void load_dense(const Value* p, __m512 w[4]);           64 stored values at p

#pragma once

#include <cstdint>
#include <vector>

#include "packed.h"
#include "prefetch.h"

namespace sparsefit::avx512 {

template <class L>
inline float finish(const PackedView& w, __m512 acc, int64_t n) {
  float s = _mm512_reduce_add_ps(acc);
  if constexpr (L::kScaled) s = s * L::kUnit * w.scales[n];
  if (w.bias != nullptr) s += w.bias[n];
  return s;
}

template <class L, bool Dense>
inline void load_row(const typename L::Value* p, uint64_t mask, __m512 v[4]) {
  if constexpr (Dense) {
    L::load_dense(p, v);
  } else {
    L::load(p, mask, v);
  }
}

// Batch 1: the R rows of block b side by side, so each group's 64 inputs are loaded once for R rows
// and R independent accumulation chains are in flight.
template <class L, bool Dense, int R>
inline void gemv_block(const PackedView& w, const float* x, float* y, int64_t b) {
  using V = typename L::Value;
  const V* p = static_cast<const V*>(w.values) + w.block_offsets[b];
  const uint64_t* m = Dense ? nullptr : w.masks + b * w.groups * R;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < w.groups; ++g) {
    const float* xg = x + g * kGroup;
    if constexpr (!Dense) _mm_prefetch(reinterpret_cast<const char*>(m + g * R) + kAheadMasks, _MM_HINT_T0);
    const __m512 x0 = _mm512_loadu_ps(xg), x1 = _mm512_loadu_ps(xg + 16);
    const __m512 x2 = _mm512_loadu_ps(xg + 32), x3 = _mm512_loadu_ps(xg + 48);
    for (int r = 0; r < R; ++r) {
      __m512 v[4];
      const uint64_t mask = Dense ? ~0ull : m[g * R + r];
      _mm_prefetch(reinterpret_cast<const char*>(p) + kAheadValues, _MM_HINT_T0);
      load_row<L, Dense>(p, mask, v);
      p += Dense ? kGroup : _mm_popcnt_u64(mask);
      acc[r] = _mm512_fmadd_ps(v[0], x0, acc[r]);
      acc[r] = _mm512_fmadd_ps(v[1], x1, acc[r]);
      acc[r] = _mm512_fmadd_ps(v[2], x2, acc[r]);
      acc[r] = _mm512_fmadd_ps(v[3], x3, acc[r]);
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
// inputs come interleaved (`interleave`: xt[(g * 4 + q) * B + i] is batch row i's 16 columns
// g * 64 + 16q ..) so the tile reads them at fixed offsets from one pointer. Columns go in chunks of
// kChunkGroups groups (B x 512 inputs, 16 KiB, stay in L1 while the block's row pairs pass over
// them); a tile's accumulators wait in `acc` between chunks, unchanged, so each output is still
// summed in gemv_block's order.
constexpr int kBatchTile = 8;
constexpr int64_t kChunkGroups = 8;

template <class L, bool Dense, int R, int B>
inline void gemm_block(const PackedView& w, const __m512* xt, float* y, int64_t ys, int64_t b,
                       const std::vector<int64_t>& starts, __m512* acc) {
  using V = typename L::Value;
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
      const __m512* xg = xt + g0 * 4 * B;
      for (int64_t g = g0; g < g1; ++g, xg += 4 * B) {
        next.step();
        __m512 v0[4], v1[4];
        load_row<L, Dense>(row_at(g, r), Dense ? ~0ull : m[g * R + r], v0);
        load_row<L, Dense>(row_at(g, r + 1), Dense ? ~0ull : m[g * R + r + 1], v1);
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) {
#pragma GCC unroll 8
          for (int i = 0; i < B; ++i) {
            a0[i] = _mm512_fmadd_ps(v0[q], xg[q * B + i], a0[i]);
            a1[i] = _mm512_fmadd_ps(v1[q], xg[q * B + i], a1[i]);
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

// 16 fp32 lanes, as an element type a std::vector aligns.
struct alignas(64) Lanes {
  float f[16];
};

// x (B rows, xs apart) in gemm_block's interleaved order, for groups * 64 columns.
inline void interleave(const float* x, int64_t xs, int64_t batch, int64_t groups, Lanes* xt) {
  for (int64_t g = 0; g < groups; ++g)
    for (int q = 0; q < 4; ++q)
      for (int64_t i = 0; i < batch; ++i)
        _mm512_store_ps(xt[(g * 4 + q) * batch + i].f, _mm512_loadu_ps(x + i * xs + g * kGroup + 16 * q));
}

template <class L, bool Dense, int R>
inline void run_r(const PackedView& w, const float* x, int64_t batch, int64_t xs, float* y, int64_t ys, int64_t b0,
                  int64_t b1) {
  if (batch == 1) {
    for (int64_t b = b0; b < b1; ++b) gemv_block<L, Dense, R>(w, x, y, b);
    return;
  }
  // Each pass of up to 8 batch rows gets its own interleaved copy of its inputs. Blocks outermost,
  // so each block streams from memory once and the passes re-read it from cache.
  const int64_t passes = (batch + kBatchTile - 1) / kBatchTile;
  static thread_local std::vector<Lanes> xt;
  xt.resize(batch * w.groups * 4);
  for (int64_t k = 0; k < passes; ++k) {
    const int64_t n = batch - k * kBatchTile < kBatchTile ? batch - k * kBatchTile : kBatchTile;
    interleave(x + k * kBatchTile * xs, xs, n, w.groups, xt.data() + k * kBatchTile * w.groups * 4);
  }
  std::vector<int64_t> starts;
  __m512 acc[R * kBatchTile];
  for (int64_t b = b0; b < b1; ++b) {
    if (!Dense) row_starts<R>(w, b, starts);
    for (int64_t k = 0; k < passes; ++k) {
      const int64_t n = batch - k * kBatchTile < kBatchTile ? batch - k * kBatchTile : kBatchTile;
      const __m512* xk = reinterpret_cast<const __m512*>(xt.data() + k * kBatchTile * w.groups * 4);
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

}  // namespace sparsefit::avx512
