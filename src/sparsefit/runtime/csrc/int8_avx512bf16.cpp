// int8 values (per-output-channel scales) on AVX-512 with AVX512_BF16: the kept codes of 64 columns
// are expanded under their mask with vpexpandb and turned into fp32 code * 2^24 as in
// int8_avx512.cpp (int8_codes.h), then into bf16, exactly (a code has at most 8 significant bits),
// and multiplied by vdpbf16ps with the inputs rounded to bf16 (round to nearest even, once per
// call). Positions are columns here (packed.h), so each vector holds 32 consecutive columns and the
// inputs need no reordering. The 2^-24 is folded into the row's scale. Loops: avx512.h.

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,avx512bf16,popcnt,fma")

#include <immintrin.h>

#include "int8_codes.h"
#include "avx512.h"
#include "bf16_dot.h"

namespace sparsefit::avx512bf16 {
namespace {

using avx512::Lanes;

struct Int8Dot : Bf16DotUnit {
  using Value = int8_t;
  static constexpr bool kScaled = true;
  static constexpr float kUnit = kInt8Unit;

  static inline void widen(__m512i codes, W w[2]) {
    // vcvtne2ps2bf16(b, a): a in the low 16 lanes, b in the high 16.
    w[0] = _mm512_cvtne2ps_pbh(int8_quarter(codes, 1), int8_quarter(codes, 0));
    w[1] = _mm512_cvtne2ps_pbh(int8_quarter(codes, 3), int8_quarter(codes, 2));
  }
  static inline void load(const Value* p, uint64_t mask, W w[2]) {
    widen(_mm512_maskz_expand_epi8(mask, _mm512_loadu_si512(p)), w);
  }
  static inline void load_dense(const Value* p, W w[2]) { widen(_mm512_loadu_si512(p), w); }
  static inline void inputs(const float* x, Lanes out[2]) {
    for (int h = 0; h < 2; ++h)
      _mm512_store_si512(out[h].f, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + 32 * h + 16),
                                                                 _mm512_loadu_ps(x + 32 * h)));
  }
};

}  // namespace

void int8(const PackedView& w, const float* x, int64_t batch, int64_t xs, float* y, int64_t ys, int64_t b0,
          int64_t b1) {
  avx512::run<Int8Dot>(w, x, batch, xs, y, ys, b0, b1);
}

}  // namespace sparsefit::avx512bf16
