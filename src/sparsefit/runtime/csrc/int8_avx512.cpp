// int8 values (per-output-channel scales) on AVX-512 (F, BW, VBMI, VBMI2): the kept codes of 64
// columns are expanded under their mask with vpexpandb; for each 16 of them one vpermb moves code i
// into the top byte of dword i (the rest zeroed), which vcvtdq2ps turns into the exact fp32
// code * 2^24. The 2^-24 is folded into the row's scale (an exact power-of-two step), applied once
// per row after the fp32 FMAs. Loops: avx512.h.

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,popcnt,fma")

#include <immintrin.h>

#include "int8_codes.h"
#include "avx512.h"

namespace sparsefit::avx512 {
namespace {

struct Int8 : Fp32Fma {
  using Value = int8_t;
  static constexpr bool kScaled = true;
  static constexpr float kUnit = kInt8Unit;

  static inline void widen(__m512i a, __m512 w[4]) {
    for (int q = 0; q < 4; ++q) w[q] = int8_quarter(a, q);
  }
  static inline void load(const Value* p, uint64_t mask, __m512 w[4]) {
    widen(_mm512_maskz_expand_epi8(mask, _mm512_loadu_si512(p)), w);
  }
  static inline void load_dense(const Value* p, __m512 w[4]) { widen(_mm512_loadu_si512(p), w); }
};

}  // namespace

void int8(const PackedView& w, const float* x, int64_t batch, int64_t xs, float* y, int64_t ys, int64_t b0,
          int64_t b1) {
  run<Int8>(w, x, batch, xs, y, ys, b0, b1);
}

}  // namespace sparsefit::avx512
