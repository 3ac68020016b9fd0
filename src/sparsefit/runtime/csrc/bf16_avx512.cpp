// bf16 values on AVX-512 (F, BW, VBMI2): the kept values of 64 positions are expanded under their
// mask with vpexpandw (32 lanes at a time). A bf16 is the top half of an fp32, and the packer
// stores column i of each 32-column half at position 2i and column 16 + i at 2i + 1 (packed.h), so
// a 16-bit left shift of the expanded dwords gives columns 0..15 as fp32 and clearing their low
// halves gives columns 16..31: no shuffle beyond the expand. Then fp32 FMA. Loops: avx512.h.

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,popcnt,fma")

#include <immintrin.h>

#include "avx512.h"

namespace sparsefit::avx512 {
namespace {

struct Bf16 : Fp32Fma {
  using Value = uint16_t;
  static constexpr bool kScaled = false;

  static inline void widen(__m512i a, __m512 w[2]) {
    w[0] = _mm512_castsi512_ps(_mm512_slli_epi32(a, 16));  // even positions: columns 0..15
    w[1] = _mm512_castsi512_ps(_mm512_and_si512(a, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  static inline void load(const Value* p, uint64_t mask, __m512 w[4]) {
    const uint32_t lo = static_cast<uint32_t>(mask), hi = static_cast<uint32_t>(mask >> 32);
    widen(_mm512_maskz_expand_epi16(lo, _mm512_loadu_si512(p)), w);
    widen(_mm512_maskz_expand_epi16(hi, _mm512_loadu_si512(p + _mm_popcnt_u32(lo))), w + 2);
  }
  static inline void load_dense(const Value* p, __m512 w[4]) {
    widen(_mm512_loadu_si512(p), w);
    widen(_mm512_loadu_si512(p + 32), w + 2);
  }
};

}  // namespace

void bf16(const PackedView& w, const float* x, int64_t batch, int64_t xs, float* y, int64_t ys, int64_t b0,
          int64_t b1) {
  run<Bf16>(w, x, batch, xs, y, ys, b0, b1);
}

}  // namespace sparsefit::avx512
