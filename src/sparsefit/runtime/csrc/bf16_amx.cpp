// bf16 values on AMX: each row's kept values of a group are expanded under its mask with vpexpandw
// (32 positions at a time, as in bf16_avx512.cpp) into the A tile buffer; the dense layout is
// loaded into the tile straight from the packed values. Positions are in the bf16 layout's order
// (packed.h: position 2k / 2k + 1 of a half is column k / 16 + k), which the B tiles follow.
// Loops: amx.h.

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512bf16,popcnt,amx-tile,amx-bf16")

#include <immintrin.h>

#include "amx.h"

namespace sparsefit::amx {
namespace {

struct Bf16 {
  using Value = uint16_t;
  static constexpr bool kScaled = false;
  static constexpr float kUnit = 1.0f;
  static constexpr bool kSplitHalves = true;
  static constexpr bool kDirectDense = true;

  static inline void expand(const Value* p, uint64_t mask, uint16_t a[2][32]) {
    const uint32_t lo = static_cast<uint32_t>(mask), hi = static_cast<uint32_t>(mask >> 32);
    _mm512_store_si512(a[0], _mm512_maskz_expand_epi16(lo, _mm512_loadu_si512(p)));
    _mm512_store_si512(a[1], _mm512_maskz_expand_epi16(hi, _mm512_loadu_si512(p + _mm_popcnt_u32(lo))));
  }
  static inline void dense(const Value* p, uint16_t a[2][32]) {
    _mm512_store_si512(a[0], _mm512_loadu_si512(p));
    _mm512_store_si512(a[1], _mm512_loadu_si512(p + 32));
  }
};

}  // namespace

void bf16(const PackedView& w, const float* x, int64_t batch, int64_t xs, float* y, int64_t ys, int64_t b0,
          int64_t b1) {
  run<Bf16>(w, x, batch, xs, y, ys, b0, b1);
}

}  // namespace sparsefit::amx
