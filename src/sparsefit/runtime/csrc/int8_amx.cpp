// int8 values (per-output-channel scales) on AMX: the kept codes of a group are expanded under
// their mask with vpexpandb, moved into the top bytes of dwords by vpermb and converted to fp32
// (code * 2^24, exact), as in int8_avx512.cpp, then rounded to bf16, which holds every code * 2^24
// exactly. Position j is column j, so the pairs of a B tile row are consecutive columns. The 2^-24
// is folded into the row's scale, applied once per row after the tile products. Loops: amx.h.

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,avx512bf16,popcnt,amx-tile,amx-bf16")

#include <immintrin.h>

#include "int8_codes.h"
#include "amx.h"

namespace sparsefit::amx {
namespace {

struct Int8 {
  using Value = int8_t;
  static constexpr bool kScaled = true;
  static constexpr float kUnit = kInt8Unit;
  static constexpr bool kSplitHalves = false;
  static constexpr bool kDirectDense = false;

  static inline void widen(__m512i codes, uint16_t a[2][32]) {
    // cvtne2ps puts its second operand in the low 16 words: columns 0..15, then 16..31.
    _mm512_store_si512(a[0], (__m512i)_mm512_cvtne2ps_pbh(int8_quarter(codes, 1), int8_quarter(codes, 0)));
    _mm512_store_si512(a[1], (__m512i)_mm512_cvtne2ps_pbh(int8_quarter(codes, 3), int8_quarter(codes, 2)));
  }
  static inline void expand(const Value* p, uint64_t mask, uint16_t a[2][32]) {
    widen(_mm512_maskz_expand_epi8(mask, _mm512_loadu_si512(p)), a);
  }
  static inline void dense(const Value* p, uint16_t a[2][32]) { widen(_mm512_loadu_si512(p), a); }
};

}  // namespace

void int8(const PackedView& w, const float* x, int64_t batch, int64_t xs, float* y, int64_t ys, int64_t b0,
          int64_t b1) {
  run<Int8>(w, x, batch, xs, y, ys, b0, b1);
}

}  // namespace sparsefit::amx
