// The dispatch table (one row per instruction set, a kernel per value type) and `matmul`, which
// runs a kernel over a packed weight split into row blocks on torch's thread pool.

#pragma once

#include <ATen/core/Tensor.h>

#include <string>

#include "packed.h"

namespace sparsefit {

struct IsaRow {
  const char* name;
  bool (*supported)();
  Kernel bf16;
  Kernel int8;
};

// The row named `name` if this CPU can run it, else nullptr.
const IsaRow* find_isa(const std::string& name);
// The best row this CPU supports ("none" when there is none).
std::string best_isa();

// A packed linear as the operators receive it: tensors checked once, viewed as a PackedView.
struct PackedLinear {
  PackedView view;
  bool int8 = false;
};

// Check the tensors of one packed weight (`what` names it in errors) and view them.
PackedLinear packed_linear(const at::Tensor& masks, const at::Tensor& values, const at::Tensor& block_offsets,
                           const at::Tensor& scales, const at::Tensor& bias, int64_t rows, int64_t cols,
                           int64_t row_block, const char* what);

// y (batch x rows, rows y_stride apart) = x (batch x groups*64, zero-padded, rows x_stride apart) W^T + b.
void matmul(const IsaRow& isa, const PackedLinear& w, const float* x, int64_t batch, int64_t x_stride, float* y,
            int64_t y_stride);

}  // namespace sparsefit
