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

namespace sparsefit::avx512 {

constexpr int kMaxBatch = 16;  // batch rows per pass of the batched loop (accumulators in registers)

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
    const __m512 x0 = _mm512_loadu_ps(xg), x1 = _mm512_loadu_ps(xg + 16);
    const __m512 x2 = _mm512_loadu_ps(xg + 32), x3 = _mm512_loadu_ps(xg + 48);
    for (int r = 0; r < R; ++r) {
      __m512 v[4];
      const uint64_t mask = Dense ? ~0ull : m[g * R + r];
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

// Batch B (2..16): one row of the block at a time, its 64-column pieces expanded once and multiplied
// into B accumulators (one per batch row), in the same per-output order as gemv_block.
template <class L, bool Dense, int R, int B>
inline void gemm_block(const PackedView& w, const float* x, int64_t xs, float* y, int64_t ys, int64_t b,
                       std::vector<int64_t>& starts) {
  using V = typename L::Value;
  const V* base = static_cast<const V*>(w.values);
  const uint64_t* m = Dense ? nullptr : w.masks + b * w.groups * R;
  for (int r = 0; r < R; ++r) {
    const int64_t n = b * R + r;
    if (n >= w.rows) break;
    __m512 acc[B];
    for (int i = 0; i < B; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < w.groups; ++g) {
      __m512 v[4];
      const int64_t at = Dense ? w.block_offsets[b] + (g * R + r) * kGroup : starts[g * R + r];
      load_row<L, Dense>(base + at, Dense ? ~0ull : m[g * R + r], v);
      const float* xg = x + g * kGroup;
      for (int i = 0; i < B; ++i) {
        const float* xi = xg + i * xs;
        acc[i] = _mm512_fmadd_ps(v[0], _mm512_loadu_ps(xi), acc[i]);
        acc[i] = _mm512_fmadd_ps(v[1], _mm512_loadu_ps(xi + 16), acc[i]);
        acc[i] = _mm512_fmadd_ps(v[2], _mm512_loadu_ps(xi + 32), acc[i]);
        acc[i] = _mm512_fmadd_ps(v[3], _mm512_loadu_ps(xi + 48), acc[i]);
      }
    }
    for (int i = 0; i < B; ++i) y[i * ys + n] = finish<L>(w, acc[i], n);
  }
}

template <class L, bool Dense, int R, int B>
inline void gemm_blocks(const PackedView& w, const float* x, int64_t xs, float* y, int64_t ys, int64_t b0,
                        int64_t b1) {
  std::vector<int64_t> starts;
  for (int64_t b = b0; b < b1; ++b) {
    if (!Dense) row_starts<R>(w, b, starts);
    gemm_block<L, Dense, R, B>(w, x, xs, y, ys, b, starts);
  }
}

template <class L, bool Dense, int R>
inline void run_r(const PackedView& w, const float* x, int64_t batch, int64_t xs, float* y, int64_t ys, int64_t b0,
                  int64_t b1) {
  if (batch == 1) {
    for (int64_t b = b0; b < b1; ++b) gemv_block<L, Dense, R>(w, x, y, b);
    return;
  }
  // Batches above 16 in passes of 16 rows; each pass re-reads the blocks, from cache for small ranges.
  for (int64_t i = 0; i < batch; i += kMaxBatch) {
    const int64_t n = batch - i < kMaxBatch ? batch - i : kMaxBatch;
    const float* xi = x + i * xs;
    float* yi = y + i * ys;
    switch (n) {
#define SPARSEFIT_CASE(B) \
  case B:                 \
    gemm_blocks<L, Dense, R, B>(w, xi, xs, yi, ys, b0, b1); \
    break;
      SPARSEFIT_CASE(1) SPARSEFIT_CASE(2) SPARSEFIT_CASE(3) SPARSEFIT_CASE(4) SPARSEFIT_CASE(5) SPARSEFIT_CASE(6)
      SPARSEFIT_CASE(7) SPARSEFIT_CASE(8) SPARSEFIT_CASE(9) SPARSEFIT_CASE(10) SPARSEFIT_CASE(11)
      SPARSEFIT_CASE(12) SPARSEFIT_CASE(13) SPARSEFIT_CASE(14) SPARSEFIT_CASE(15) SPARSEFIT_CASE(16)
#undef SPARSEFIT_CASE
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
