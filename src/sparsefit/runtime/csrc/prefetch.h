// Software prefetch for the kernels of every instruction set (avx512.h, avx2.h). The hardware
// prefetchers lose track of a packed weight's two streams (masks, and values whose addresses depend
// on the masks' popcounts), so without these the loops wait on memory at every density. Include
// after <immintrin.h>.

#pragma once

#include <cstdint>

#include "packed.h"

namespace sparsefit {
// Internal linkage (unnamed namespace): each kernel file compiles its own copy under its own
// `#pragma GCC target`, so the linker never hands one instruction set's code to another's row.
namespace {

// Batch-1 distances, ahead of where the loop reads. Measured on a Xeon with AVX-512 over a rotation
// of weights larger than L3: 2 KiB ahead in the values and 512 B in the masks reach ~95% of the DRAM
// read bandwidth at 30-50% density (benchmarks/runtime.py).
constexpr int64_t kAheadValues = 2048;  // bytes
constexpr int64_t kAheadMasks = 512;    // bytes

// Brings the next block into L2 while a batched loop works on this one, a few lines per step: the
// batched loops visit a block's values out of their stored order (row by row, or row pairs within
// column chunks), which the hardware prefetchers do not follow from DRAM.
struct NextBlock {
  const char* at = nullptr;
  const char* end = nullptr;
  int64_t per_step = 0;
  inline void step() {
    for (int64_t k = 0; k < per_step && at < end; ++k, at += 64) _mm_prefetch(at, _MM_HINT_T1);
  }
};

// The prefetcher of block b + 1 (none after the last block), spread over `steps` calls of step();
// its masks are prefetched at once (they sit apart from the values).
template <class V, int R>
inline NextBlock next_block(const PackedView& w, int64_t b, int64_t steps) {
  NextBlock n;
  if (b + 1 >= w.blocks) return n;
  if (w.masks != nullptr) {
    const char* m = reinterpret_cast<const char*>(w.masks + (b + 1) * w.groups * R);
    for (int64_t k = 0; k < w.groups * R * 8; k += 64) _mm_prefetch(m + k, _MM_HINT_T1);
  }
  const V* values = static_cast<const V*>(w.values);
  n.at = reinterpret_cast<const char*>(values + w.block_offsets[b + 1]);
  n.end = reinterpret_cast<const char*>(values + w.block_offsets[b + 2]);
  n.per_step = ((n.end - n.at) / 64 + steps) / steps;
  return n;
}

}  // namespace
}  // namespace sparsefit
