// The packed weight layout the kernels read, and the one signature every kernel has.
//
// A weight W (rows x cols) is cut into row blocks of R rows and column groups of 64 columns
// (rows and columns padded with zeros to whole blocks and groups). For each block b and group g,
// in that order, the layout stores:
//   masks[(b * G + g) * R + r]   one 64-bit word per row r: bit j set = column g*64 + j is kept
//   values[...]                  the kept values of rows 0..R-1 of (b, g), row after row, each in
//                                column order (bf16 or int8 codes)
// `block_offsets[b]` is the index in `values` where block b starts. Within a block the kernel
// walks the groups in order, so masks and values are each read as one linear stream.
// A dense layout has no masks: every value is stored (R x 64 per group), so a group's row r
// starts at r * 64.
//
// Bit j of a mask word (and the j-th value slot) is a *position*, which maps to a column of the
// group in an order chosen per value type so the widening to fp32 is cheapest (bf16: within each
// 32-column half, position 2i is column i and 2i+1 is column 16 + i, so one shift and one AND turn
// 32 expanded values into two fp32 vectors of consecutive columns; int8: position j is column j).
//
// Every output (batch row i, weight row n) is accumulated in one fixed order, whatever the batch
// size: acc = 0 (one vector of lanes); for g: for each lane-chunk q of the group: acc = fma(w, x, acc);
// then one horizontal sum, times the row's scale (int8), plus the bias. So a row's result is bitwise
// the same alone or in a batch (a server's continuous batching relies on this).

#pragma once

#include <cstdint>

namespace sparsefit {

constexpr int64_t kGroup = 64;  // columns per group: one 64-bit mask word

struct PackedView {
  int64_t rows = 0, cols = 0;     // the logical weight shape
  int64_t groups = 0;             // ceil(cols / 64)
  int64_t row_block = 0;          // R
  int64_t blocks = 0;             // ceil(rows / R)
  const uint64_t* masks = nullptr;  // blocks * groups * R words; nullptr for the dense layout
  const void* values = nullptr;     // bf16 (uint16_t) or int8 codes
  const int64_t* block_offsets = nullptr;  // blocks + 1 entries, in values
  const float* scales = nullptr;    // per row (int8 values), else nullptr
  const float* bias = nullptr;      // per row, or nullptr
};

// y[i, n] = sum_k W[n, k] x[i, k] (+ bias[n]) for the rows n of blocks [block_begin, block_end),
// every batch row i < batch. x is (batch, groups * 64) fp32 with zeros past `cols`, rows x_stride
// apart; y is (batch, rows) fp32, rows y_stride apart. No threading inside: the caller splits blocks.
using Kernel = void (*)(const PackedView& w, const float* x, int64_t batch, int64_t x_stride, float* y,
                        int64_t y_stride, int64_t block_begin, int64_t block_end);

// One row of the dispatch table: a kernel per value type for one instruction set.
namespace avx512 {
void bf16(const PackedView&, const float*, int64_t, int64_t, float*, int64_t, int64_t, int64_t);
void int8(const PackedView&, const float*, int64_t, int64_t, float*, int64_t, int64_t, int64_t);
}  // namespace avx512
namespace avx512bf16 {
void bf16(const PackedView&, const float*, int64_t, int64_t, float*, int64_t, int64_t, int64_t);
void int8(const PackedView&, const float*, int64_t, int64_t, float*, int64_t, int64_t, int64_t);
}  // namespace avx512bf16
namespace amx {
void bf16(const PackedView&, const float*, int64_t, int64_t, float*, int64_t, int64_t, int64_t);
void int8(const PackedView&, const float*, int64_t, int64_t, float*, int64_t, int64_t, int64_t);
}  // namespace amx
namespace avx2 {
void bf16(const PackedView&, const float*, int64_t, int64_t, float*, int64_t, int64_t, int64_t);
void int8(const PackedView&, const float*, int64_t, int64_t, float*, int64_t, int64_t, int64_t);
}  // namespace avx2

}  // namespace sparsefit
