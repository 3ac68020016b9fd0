// bf16 values on AVX-512 with AVX512_BF16 and VBMI2 (Sapphire Rapids and later, AMD Zen 4 and later): the
// kept values of 64 positions are expanded under their mask with vpexpandw (32 lanes at a time, as
// in bf16_avx512.cpp) and multiplied as they are by vdpbf16ps, which adds the products of each
// lane's pair of bf16 (positions 2k, 2k + 1) into one fp32 lane: twice the multiply-adds of an fp32
// FMA per instruction, and no widening. The inputs are rounded to bf16 (round to nearest even, once
// per call) and laid out in the values' position order (packed.h: in each 32-column half, position
// 2k is column k and 2k + 1 is column 16 + k), so a pair meets the two columns its weights hold.
// Products of two bf16 are exact in fp32; sums are fp32. Loops: avx512.h.

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,avx512bf16,popcnt,fma")

#include <immintrin.h>

#include "avx512.h"
#include "bf16_dot.h"

namespace sparsefit::avx512bf16 {
namespace {

using avx512::Lanes;

// vpermw controls: the 32 bf16 of (columns 0..15, columns 16..31) to positions 2k <- k, 2k + 1 <- 16 + k.
struct PairControls {
  alignas(64) uint16_t c[32];
  constexpr PairControls() : c{} {
    for (int k = 0; k < 16; ++k) c[2 * k] = static_cast<uint16_t>(k), c[2 * k + 1] = static_cast<uint16_t>(16 + k);
  }
};
inline constexpr PairControls kPairControls;

struct Bf16Dot : Bf16DotUnit {
  using Value = uint16_t;
  static constexpr bool kScaled = false;
  static constexpr float kUnit = 1.0f;

  static inline void load(const Value* p, uint64_t mask, W w[2]) {
    const uint32_t lo = static_cast<uint32_t>(mask), hi = static_cast<uint32_t>(mask >> 32);
    w[0] = (__m512bh)_mm512_maskz_expand_epi16(lo, _mm512_loadu_si512(p));
    w[1] = (__m512bh)_mm512_maskz_expand_epi16(hi, _mm512_loadu_si512(p + _mm_popcnt_u32(lo)));
  }
  static inline void load_dense(const Value* p, W w[2]) {
    w[0] = (__m512bh)_mm512_loadu_si512(p);
    w[1] = (__m512bh)_mm512_loadu_si512(p + 32);
  }
  static inline void inputs(const float* x, Lanes out[2]) {
    const __m512i control = _mm512_load_si512(kPairControls.c);
    for (int h = 0; h < 2; ++h) {
      // vcvtne2ps2bf16(b, a): a's 16 rounded values in the low half, b's in the high half.
      const __m512i halves = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + 32 * h + 16), _mm512_loadu_ps(x + 32 * h));
      _mm512_store_si512(out[h].f, _mm512_permutexvar_epi16(control, halves));
    }
  }
};

}  // namespace

void bf16(const PackedView& w, const float* x, int64_t batch, int64_t xs, float* y, int64_t ys, int64_t b0,
          int64_t b1) {
  avx512::run<Bf16Dot>(w, x, batch, xs, y, ys, b0, b1);
}

}  // namespace sparsefit::avx512bf16
