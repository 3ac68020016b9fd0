// bf16 values on AVX2: a mask byte's kept values (8 positions) go straight into the top halves of
// their fp32 lanes by one vpshufb with a table control (a bf16 is the top half of an fp32), then
// fp32 FMA. Positions are in the bf16 layout's order (packed.h), so x is read in that order.
// Loops: avx2.h.

#pragma GCC target("avx2,fma,popcnt")

#include <immintrin.h>

#include "avx2.h"

namespace sparsefit::avx2 {
namespace {

constexpr ExpandTable<2> kExpand;

struct Bf16 {
  using Value = uint16_t;
  static constexpr bool kScaled = false;
  static constexpr float kUnit = 1.0f;
  static constexpr bool kPositions = true;

  static inline int64_t column(int64_t position) {
    const int64_t half = position & ~int64_t{31}, t = position & 31;
    return half + (t & 1 ? 16 + t / 2 : t / 2);
  }
  static inline __m256 load8(const Value* p, unsigned byte) { return _mm256_castsi256_ps(expand8(p, kExpand, byte)); }
  static inline __m256 load8_dense(const Value* p) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  }
};

}  // namespace

void bf16(const PackedView& w, const float* x, int64_t batch, int64_t xs, float* y, int64_t ys, int64_t b0,
          int64_t b1) {
  run<Bf16>(w, x, batch, xs, y, ys, b0, b1);
}

}  // namespace sparsefit::avx2
