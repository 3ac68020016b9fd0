// int8 values (per-output-channel scales) on AVX-512 (F, BW, VBMI, VBMI2): the kept codes of 64
// columns are expanded under their mask with vpexpandb; for each 16 of them one vpermb moves code i
// into the top byte of dword i (the rest zeroed), which vcvtdq2ps turns into the exact fp32
// code * 2^24. The 2^-24 is folded into the row's scale (an exact power-of-two step), applied once
// per row after the fp32 FMAs. Loops: avx512.h.

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,popcnt,fma")

#include <immintrin.h>

#include "avx512.h"

namespace sparsefit::avx512 {
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
  static constexpr uint64_t kTopBytes = 0x8888888888888888ull;

  static inline void widen(__m512i a, __m512 w[4]) {
    for (int q = 0; q < 4; ++q) {
      const __m512i control = _mm512_load_si512(kControls.c[q]);
      w[q] = _mm512_cvtepi32_ps(_mm512_maskz_permutexvar_epi8(kTopBytes, control, a));
    }
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
