// The multiply unit of the avx512bf16 row (bf16_avx512bf16.cpp, int8_avx512bf16.cpp), as avx512.h's
// Fp32Fma is the avx512 row's: 32 bf16 weights times 32 bf16 inputs by vdpbf16ps, each fp32 lane
// adding the products of its pair of positions (2k, 2k + 1). Include after
// `#pragma GCC target(...avx512bf16...)`, <immintrin.h> and avx512.h.

#pragma once

namespace sparsefit::avx512bf16 {
namespace {

struct Bf16DotUnit {
  static constexpr int kVecs = 2;
  using W = __m512bh;
  static inline W in(const avx512::Lanes& x) { return (__m512bh)_mm512_load_si512(x.f); }
  static inline __m512 madd(__m512 acc, W w, W x) { return _mm512_dpbf16_ps(acc, w, x); }
};

}  // namespace
}  // namespace sparsefit::avx512bf16
