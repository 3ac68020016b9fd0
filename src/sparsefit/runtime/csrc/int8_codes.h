// int8 codes to fp32 on AVX-512 (VBMI), shared by int8_avx512.cpp and int8_amx.cpp: one vpermb
// moves codes 16q .. 16q + 15 into the top bytes of 16 dwords (the rest zeroed), which vcvtdq2ps
// turns into the exact fp32 code * 2^24 (the 2^-24 is folded into each row's scale). Include after
// `#pragma GCC target(...)` and <immintrin.h>.

#pragma once

#include <cstdint>

namespace sparsefit {
// Internal linkage (unnamed namespace): each kernel file compiles its own copy under its own
// `#pragma GCC target`, so the linker never hands one instruction set's code to another's row.
namespace {

constexpr float kInt8Unit = 0x1p-24f;  // the codes arrive as code * 2^24

// vpermb controls: for the codes 16q .. 16q + 15, byte 4i + 3 selects code 16q + i (the other bytes
// are zeroed by the write mask).
struct TopByteControls {
  alignas(64) uint8_t c[4][64];
  constexpr TopByteControls() : c{} {
    for (int q = 0; q < 4; ++q)
      for (int i = 0; i < 16; ++i) c[q][4 * i + 3] = static_cast<uint8_t>(16 * q + i);
  }
};
inline constexpr TopByteControls kTopByteControls;

// Codes 16q .. 16q + 15 of the 64 in `codes`, as fp32 code * 2^24.
inline __m512 int8_quarter(__m512i codes, int q) {
  constexpr uint64_t kTopBytes = 0x8888888888888888ull;
  const __m512i control = _mm512_load_si512(kTopByteControls.c[q]);
  return _mm512_cvtepi32_ps(_mm512_maskz_permutexvar_epi8(kTopBytes, control, codes));
}

}  // namespace
}  // namespace sparsefit
