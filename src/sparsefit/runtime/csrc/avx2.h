// The AVX2 loops over a packed weight (packed.h), for CPUs without AVX-512 (or without VBMI2's
// expand instructions). There is no expand instruction here: each byte of a row's mask word (8
// positions) picks a vpshufb control from a 256-entry table (`ExpandTable`) that moves the byte's
// kept values, broadcast to both 128-bit lanes, straight into the top bytes of their fp32 lanes and
// zeroes the rest. bf16_avx2.cpp and int8_avx2.cpp define the Loader and instantiate `run`.
// Include after `#pragma GCC target(...)` and <immintrin.h>.
//
// Loader concept:
//   using Value = ...; static constexpr bool kScaled; static constexpr float kUnit;
//   static constexpr bool kPositions;   x must be read in the layout's position order (bf16)
//   static int64_t column(int64_t position);   the column of a position within its group
//   static __m256 load8(const Value* p, unsigned byte);   expand popcount(byte) values at p to 8 lanes
//   static __m256 load8_dense(const Value* p);             8 stored values at p
// Loads read 16 bytes at p, past the last kept value at the end: the packer pads `values`.

#pragma once

#include <cstdint>
#include <vector>

#include "packed.h"
#include "prefetch.h"

namespace sparsefit::avx2 {
// Internal linkage (unnamed namespace): each kernel file compiles its own copy under its own
// `#pragma GCC target`, so the linker never hands one instruction set's code to another's row.
namespace {

constexpr int kMaxBatch = 8;  // batch rows per pass of the batched loop (16 ymm registers in all)

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

template <class L>
inline float finish(const PackedView& w, __m256 acc, int64_t n) {
  float s = hsum(acc);
  if constexpr (L::kScaled) s = s * L::kUnit * w.scales[n];
  if (w.bias != nullptr) s += w.bias[n];
  return s;
}

template <class L, bool Dense>
inline __m256 load8(const typename L::Value* p, unsigned byte) {
  if constexpr (Dense) {
    return L::load8_dense(p);
  } else {
    return L::load8(p, byte);
  }
}

// Batch 1: up to 8 rows of block b side by side (R = 16 in two passes), so each 8 inputs are loaded
// once for all of them and their accumulation chains run in parallel.
template <class L, bool Dense, int R>
inline void gemv_block(const PackedView& w, const float* x, float* y, int64_t b) {
  using V = typename L::Value;
  constexpr int S = R < 8 ? R : 8;
  const V* base = static_cast<const V*>(w.values) + w.block_offsets[b];
  const uint64_t* m = Dense ? nullptr : w.masks + b * w.groups * R;
  for (int s0 = 0; s0 < R; s0 += S) {
    __m256 acc[S];
    for (int j = 0; j < S; ++j) acc[j] = _mm256_setzero_ps();
    const V* group = base;
    for (int64_t g = 0; g < w.groups; ++g) {
      const V* p[S];
      uint64_t mk[S];
      if constexpr (Dense) {
        for (int j = 0; j < S; ++j) p[j] = group + (s0 + j) * kGroup, mk[j] = ~0ull;
        group += R * kGroup;
      } else {
        const uint64_t* mg = m + g * R;
        const V* q = group;
        for (int r = 0; r < s0; ++r) q += _mm_popcnt_u64(mg[r]);
        for (int j = 0; j < S; ++j) p[j] = q, mk[j] = mg[s0 + j], q += _mm_popcnt_u64(mk[j]);
        for (int r = s0 + S; r < R; ++r) q += _mm_popcnt_u64(mg[r]);
        group = q;
      }
      // Software prefetch (prefetch.h: the hardware prefetchers lose these streams).
      for (int j = 0; j < S; ++j) _mm_prefetch(reinterpret_cast<const char*>(p[j]) + kAheadValues, _MM_HINT_T0);
      if constexpr (!Dense) _mm_prefetch(reinterpret_cast<const char*>(m + g * R) + kAheadMasks, _MM_HINT_T0);
      const float* xg = x + g * kGroup;
      for (int k = 0; k < 8; ++k) {
        const __m256 xk = _mm256_loadu_ps(xg + 8 * k);
        for (int j = 0; j < S; ++j) {
          const unsigned byte = static_cast<unsigned>(mk[j] >> (8 * k)) & 0xffu;
          acc[j] = _mm256_fmadd_ps(load8<L, Dense>(p[j], byte), xk, acc[j]);
          p[j] += Dense ? 8 : _mm_popcnt_u32(byte);
        }
      }
    }
    for (int j = 0; j < S; ++j) {
      const int64_t n = b * R + s0 + j;
      if (n < w.rows) y[n] = finish<L>(w, acc[j], n);
    }
  }
}

// Batch B (2..8): one row at a time, each 8 columns expanded once for all B batch rows, in the same
// per-output order as gemv_block.
template <class L, bool Dense, int R, int B>
inline void gemm_block(const PackedView& w, const float* x, int64_t xs, float* y, int64_t ys, int64_t b,
                       std::vector<int64_t>& starts) {
  using V = typename L::Value;
  const V* base = static_cast<const V*>(w.values);
  const uint64_t* m = Dense ? nullptr : w.masks + b * w.groups * R;
  if constexpr (!Dense) {
    starts.resize(w.groups * R);
    int64_t at = w.block_offsets[b];
    for (int64_t i = 0; i < w.groups * R; ++i) starts[i] = at, at += _mm_popcnt_u64(m[i]);
  }
  NextBlock next = next_block<V, R>(w, b, w.groups * R);  // one step per (row, group)
  for (int r = 0; r < R; ++r) {
    const int64_t n = b * R + r;
    if (n >= w.rows) break;
    __m256 acc[B];
    for (int i = 0; i < B; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < w.groups; ++g) {
      next.step();
      const V* p = base + (Dense ? w.block_offsets[b] + (g * R + r) * kGroup : starts[g * R + r]);
      const uint64_t mask = Dense ? ~0ull : m[g * R + r];
      const float* xg = x + g * kGroup;
      for (int k = 0; k < 8; ++k) {
        const unsigned byte = static_cast<unsigned>(mask >> (8 * k)) & 0xffu;
        const __m256 v = load8<L, Dense>(p, byte);
        p += Dense ? 8 : _mm_popcnt_u32(byte);
        for (int i = 0; i < B; ++i) acc[i] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xg + i * xs + 8 * k), acc[i]);
      }
    }
    for (int i = 0; i < B; ++i) y[i * ys + n] = finish<L>(w, acc[i], n);
  }
}

template <class L, bool Dense, int R>
inline void run_r(const PackedView& w, const float* x, int64_t batch, int64_t xs, float* y, int64_t ys, int64_t b0,
                  int64_t b1) {
  if (batch == 1) {
    for (int64_t b = b0; b < b1; ++b) gemv_block<L, Dense, R>(w, x, y, b);
    return;
  }
  std::vector<int64_t> starts;
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t i = 0; i < batch; i += kMaxBatch) {
      const int64_t n = batch - i < kMaxBatch ? batch - i : kMaxBatch;
      const float* xi = x + i * xs;
      float* yi = y + i * ys;
      switch (n) {
#define SPARSEFIT_CASE(B) \
  case B:                 \
    gemm_block<L, Dense, R, B>(w, xi, xs, yi, ys, b, starts); \
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
  if constexpr (L::kPositions) {  // lanes come out in position order: read x in that order too
    static thread_local std::vector<float> xp;
    const int64_t width = w.groups * kGroup;
    xp.resize(batch * width);
    for (int64_t i = 0; i < batch; ++i)
      for (int64_t g = 0; g < width; g += kGroup)
        for (int64_t j = 0; j < kGroup; ++j) xp[i * width + g + j] = x[i * xs + g + L::column(j)];
    x = xp.data();
    xs = width;
  }
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

// vpshufb controls, one per mask byte, for 8 lanes of fp32 from values broadcast to both 128-bit
// lanes: lane j takes value popcount(byte & ((1 << j) - 1)) into its top `Width` bytes when bit j is
// set; every other byte is zeroed (control 0x80).
template <int Width>
struct ExpandTable {
  alignas(32) uint8_t control[256][32];
  constexpr ExpandTable() : control{} {
    for (int byte = 0; byte < 256; ++byte) {
      int next = 0;
      for (int j = 0; j < 8; ++j) {
        const bool kept = (byte >> j) & 1;
        const int at = 16 * (j / 4) + 4 * (j % 4);
        for (int k = 0; k < 4; ++k) {
          const int from = k - (4 - Width);  // the value's bytes fill the top of the dword
          control[byte][at + k] = kept && from >= 0 ? static_cast<uint8_t>(next * Width + from) : 0x80;
        }
        next += kept;
      }
    }
  }
};

template <int Width>
inline __m256i expand8(const void* p, const ExpandTable<Width>& table, unsigned byte) {
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(static_cast<const __m128i*>(p)));
  return _mm256_shuffle_epi8(v, _mm256_load_si256(reinterpret_cast<const __m256i*>(table.control[byte])));
}

}  // namespace
}  // namespace sparsefit::avx2
