// The AMX loops over a packed weight (packed.h), shared by the value types: bf16_amx.cpp and
// int8_amx.cpp each define a Loader (how 64 positions of one row become two 32-value bf16 halves of
// an A tile row) and instantiate `run` with it. Include after `#pragma GCC target(...)` and
// <immintrin.h>.
//
// The weight rows are the A tile, the inputs the B tile, so one TDPBF16PS multiplies R weight rows
// by up to 16 batch rows over 32 positions. For each group, each row's values are expanded under
// its mask into a 64-byte row of a small L1 buffer the A tile is loaded from (a Loader may load a
// dense layout's tile straight from the packed values). The inputs are rounded to bf16 (round to
// nearest even) once per call and laid out as B tiles: row k of the tile for (group g, half h)
// holds, for each batch row i, the two inputs that meet positions 2k and 2k + 1 of the half.
//
// Each output (i, n) accumulates in one order whatever the batch: C starts at zero and takes
// groups g = 0.. and halves h = 0, 1 in turn, each a TDPBF16PS adding its 32 products in position
// order, and a tile element depends only on its own row of A and column of B. So a row's result is
// bitwise the same alone or in a batch, as on the other paths; it differs from theirs in that the
// inputs are bf16 here (the products are exact in fp32; AMX also flushes fp32 denormals).
//
// Loader concept:
//   using Value = ...;                       the stored element type
//   static constexpr bool kScaled;           multiply each row's sum by kUnit, then by scales[row]
//   static constexpr bool kSplitHalves;      position 2k / 2k + 1 of a half is column k / 16 + k
//                                            (else column 2k / 2k + 1)
//   static constexpr bool kDirectDense;      the dense layout's values are A tile rows as stored
//   static void expand(const Value* p, uint64_t mask, uint16_t a[2][32]);  popcount(mask) values at p
//   static void dense(const Value* p, uint16_t a[2][32]);                  64 stored values at p

#pragma once

#include <cstdint>
#include <vector>

#include "packed.h"
#include "prefetch.h"

namespace sparsefit::amx {
// Internal linkage (unnamed namespace): each kernel file compiles its own copy under its own
// `#pragma GCC target`, so the linker never hands one instruction set's code to another's row.
namespace {
namespace detail {

constexpr int kTileN = 16;  // batch rows per C tile (16 fp32 = 64 bytes, a tile row's maximum)

// The tile configuration (palette 1): tmm0 = A (R rows x 64 bytes), tmm1 / tmm2 = B for batch rows
// 0..15 / 16..31 of a pass (16 rows x 4n bytes), tmm4 / tmm5 = their C tiles (R rows x 4n bytes).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// ldtilecfg from inline asm with the config as a memory input, so the compiler cannot drop the
// stores that fill it (GCC has dropped a stack-built config passed to the _tile_loadconfig builtin).
inline void load_config(int R, int n0, int n1) {
  TileConfig c;
  c.rows[0] = static_cast<uint8_t>(R), c.colsb[0] = 64;
  c.rows[1] = 16, c.colsb[1] = static_cast<uint16_t>(4 * n0);
  c.rows[4] = static_cast<uint8_t>(R), c.colsb[4] = static_cast<uint16_t>(4 * n0);
  if (n1 > 0) {
    c.rows[2] = 16, c.colsb[2] = static_cast<uint16_t>(4 * n1);
    c.rows[5] = static_cast<uint8_t>(R), c.colsb[5] = static_cast<uint16_t>(4 * n1);
  }
  asm volatile("ldtilecfg %0" : : "m"(c));
}

// x rows [i0, i0 + n) as B tiles: xb[((g * 2 + h) * 16 + k) * n + i] is the dword of batch row i0 + i
// holding the bf16 inputs of positions 2k and 2k + 1 of half h of group g, the first in the low half.
template <bool SplitHalves>
inline void b_tiles(const float* x, int64_t xs, int64_t i0, int64_t n, int64_t groups, uint32_t* xb) {
  // Word j of the cvtne2ps result is column j of the half; SplitHalves pairs column k with 16 + k.
  alignas(64) static constexpr uint16_t kPairs[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i pairs = _mm512_load_si512(kPairs);
  alignas(64) uint32_t tmp[16];
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x + (i0 + i) * xs;
    for (int64_t gh = 0; gh < groups * 2; ++gh) {
      const float* p = xi + gh * 32;
      const __m512i bf = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + 16), _mm512_loadu_ps(p));
      _mm512_store_si512(tmp, SplitHalves ? _mm512_permutexvar_epi16(pairs, bf) : bf);
      uint32_t* dst = xb + gh * 16 * n + i;
      for (int k = 0; k < 16; ++k) dst[k * n] = tmp[k];
    }
  }
}

// One row block: C (R x n0, and R x n1) = W_block x^T over every group, then y.
template <class L, int R, bool Dense>
inline void block(const PackedView& w, const uint32_t* xb, int64_t n, int n1, float* y, int64_t ys, int64_t b,
                  uint16_t (*abuf)[2][32]) {
  using V = typename L::Value;
  const V* p = static_cast<const V*>(w.values) + w.block_offsets[b];
  const uint64_t* m = Dense ? nullptr : w.masks + b * w.groups * R;
  const int64_t bstride = 4 * n;  // bytes between rows of a B tile
  _tile_zero(4);
  if (n1 > 0) _tile_zero(5);
  for (int64_t g = 0; g < w.groups; ++g) {
    const void* a[2];
    int64_t astride;
    if constexpr (Dense && L::kDirectDense) {
      a[0] = p + g * R * kGroup, a[1] = p + g * R * kGroup + 32, astride = kGroup * sizeof(V);
    } else {
      if constexpr (!Dense) _mm_prefetch(reinterpret_cast<const char*>(m + g * R) + kAheadMasks, _MM_HINT_T0);
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(p) + kAheadValues, _MM_HINT_T0);
        if constexpr (Dense) {
          L::dense(p, abuf[r]);
          p += kGroup;
        } else {
          const uint64_t mask = m[g * R + r];
          L::expand(p, mask, abuf[r]);
          p += _mm_popcnt_u64(mask);
        }
      }
      a[0] = abuf[0][0], a[1] = abuf[0][1], astride = 2 * 64;
    }
    for (int h = 0; h < 2; ++h) {
      const uint32_t* bt = xb + (g * 2 + h) * 16 * n;
      _tile_loadd(0, a[h], astride);
      _tile_loadd(1, bt, bstride);
      _tile_dpbf16ps(4, 0, 1);
      if (n1 > 0) {
        _tile_loadd(2, bt + kTileN, bstride);
        _tile_dpbf16ps(5, 0, 2);
      }
    }
  }
  alignas(64) float c[16][kTileN];
  for (int t = 0; t < (n1 > 0 ? 2 : 1); ++t) {
    if (t == 0) {
      _tile_stored(4, c, sizeof(c[0]));
    } else {
      _tile_stored(5, c, sizeof(c[0]));
    }
    const int nt = t == 0 ? static_cast<int>(n - n1) : n1;
    for (int r = 0; r < R; ++r) {
      const int64_t row = b * R + r;
      if (row >= w.rows) break;
      const float bias = w.bias != nullptr ? w.bias[row] : 0.0f;
      for (int i = 0; i < nt; ++i) {
        float s = c[r][i];
        if constexpr (L::kScaled) s = s * L::kUnit * w.scales[row];
        if (w.bias != nullptr) s += bias;
        y[(t * kTileN + i) * ys + row] = s;
      }
    }
  }
}

template <class L, int R>
void run_r(const PackedView& w, const float* x, int64_t batch, int64_t xs, float* y, int64_t ys, int64_t b0,
           int64_t b1) {
  static thread_local std::vector<uint32_t> xb;
  alignas(64) uint16_t abuf[R][2][32];
  // Passes of up to 32 batch rows: two C tiles share each expanded A tile.
  for (int64_t i0 = 0; i0 < batch; i0 += 2 * kTileN) {
    const int64_t n = batch - i0 < 2 * kTileN ? batch - i0 : 2 * kTileN;
    const int n0 = static_cast<int>(n < kTileN ? n : kTileN), n1 = static_cast<int>(n - n0);
    xb.resize(w.groups * 2 * 16 * n);
    b_tiles<L::kSplitHalves>(x, xs, i0, n, w.groups, xb.data());
    load_config(R, n0, n1);
    float* yi = y + i0 * ys;
    for (int64_t b = b0; b < b1; ++b) {
      if (w.masks == nullptr) {
        block<L, R, true>(w, xb.data(), n, n1, yi, ys, b, abuf);
      } else {
        block<L, R, false>(w, xb.data(), n, n1, yi, ys, b, abuf);
      }
    }
    _tile_release();
  }
}

}  // namespace detail

template <class L>
void run(const PackedView& w, const float* x, int64_t batch, int64_t xs, float* y, int64_t ys, int64_t b0,
         int64_t b1) {
  switch (w.row_block) {
    case 4:
      return detail::run_r<L, 4>(w, x, batch, xs, y, ys, b0, b1);
    case 8:
      return detail::run_r<L, 8>(w, x, batch, xs, y, ys, b0, b1);
    case 16:
      return detail::run_r<L, 16>(w, x, batch, xs, y, ys, b0, b1);
  }
}

}  // namespace
}  // namespace sparsefit::amx
