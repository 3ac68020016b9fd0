// int8 values (per-output-channel scales) on AVX2: a mask byte's kept codes (8 columns) go into the
// top bytes of their dword lanes by one vpshufb with a table control, so vcvtdq2ps gives the exact
// fp32 code * 2^24; fp32 FMA, then each row's sum is scaled once (the 2^-24 folded in, an exact
// power-of-two step). Loops: avx2.h.

#pragma GCC target("avx2,fma,popcnt")

#include <immintrin.h>

#include "avx2.h"

namespace sparsefit::avx2 {
namespace {

constexpr ExpandTable<1> kExpand;

struct Int8 {
  using Value = int8_t;
  static constexpr bool kScaled = true;
  static constexpr float kUnit = 0x1p-24f;
  static constexpr bool kPositions = false;

  static inline int64_t column(int64_t position) { return position; }
  static inline __m256 load8(const Value* p, unsigned byte) { return _mm256_cvtepi32_ps(expand8(p, kExpand, byte)); }
  static inline __m256 load8_dense(const Value* p) {
    const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm256_cvtepi32_ps(_mm256_slli_epi32(v, 24));
  }
};

}  // namespace

void int8(const PackedView& w, const float* x, int64_t batch, int64_t xs, float* y, int64_t ys, int64_t b0,
          int64_t b1) {
  run<Int8>(w, x, batch, xs, y, ys, b0, b1);
}

}  // namespace sparsefit::avx2
