// int8 values (per-output-channel scales) on AMX: the kept codes of a group are expanded under
// their mask with vpexpandb, moved into the top bytes of dwords by vpermb and converted to fp32
// (code * 2^24, exact), as in int8_avx512.cpp, then rounded to bf16, which holds every code * 2^24
// exactly. Position j is column j, so the pairs of a B tile row are consecutive columns. The 2^-24
// is folded into the row's scale, applied once per row after the tile products. Loops: amx.h.

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,avx512bf16,popcnt,amx-tile,amx-bf16")

#include <immintrin.h>

#include "amx.h"

namespace sparsefit::amx {
namespace {

// vpermb controls: for the codes 16q .. 16q + 15, byte 4i + 3 selects code 16q + i (the other bytes
// are zeroed by the write mask).
struct TopByteControls {
  alignas(64) uint8_t c[4][64];
  constexpr TopByteControls() : c{} {
    for (int q = 0; q < 4; ++q)
      for (int i = 0; i < 16; ++i) c[q][4 * i + 3] = static_cast<uint8_t>(16 * q + i);
  }
};
constexpr TopByteControls kControls;

struct Int8 {
  using Value = int8_t;
  static constexpr bool kScaled = true;
  static constexpr float kUnit = 0x1p-24f;  // the codes arrive as code * 2^24
  static constexpr bool kSplitHalves = false;
  static constexpr bool kDirectDense = false;
  static constexpr uint64_t kTopBytes = 0x8888888888888888ull;

  static inline __m512 quarter(__m512i codes, int q) {
    const __m512i control = _mm512_load_si512(kControls.c[q]);
    return _mm512_cvtepi32_ps(_mm512_maskz_permutexvar_epi8(kTopBytes, control, codes));
  }
  static inline void widen(__m512i codes, uint16_t a[2][32]) {
    // cvtne2ps puts its second operand in the low 16 words: columns 0..15, then 16..31.
    _mm512_store_si512(a[0], (__m512i)_mm512_cvtne2ps_pbh(quarter(codes, 1), quarter(codes, 0)));
    _mm512_store_si512(a[1], (__m512i)_mm512_cvtne2ps_pbh(quarter(codes, 3), quarter(codes, 2)));
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
