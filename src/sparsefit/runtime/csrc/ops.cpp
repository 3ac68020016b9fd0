// The torch operators: argument checks and the unpacking of tensors into kernel views. The kernels
// run on torch's thread pool (dispatch.cpp), so torch.set_num_threads governs them too.
//
//   linear(x, masks, values, block_offsets, scales, bias, rows, cols, row_block, isa) -> y
//   packed_rows(values, block_offsets, scales, rows, cols, row_block, indices) -> the rows, fp32
//   llama_decoder(x, rows, positions, cos, sin, k_cache[], v_cache[], weights[], config[], eps, isa)
//   isa_supported(isa) -> bool ; best_isa() -> str

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstring>
#include <string>

#include "dispatch.h"

namespace sparsefit {

at::Tensor llama_decoder(const at::Tensor& x, const at::Tensor& rows, const at::Tensor& positions,
                         const at::Tensor& cos, const at::Tensor& sin, at::TensorList k_cache,
                         at::TensorList v_cache, at::TensorList weights, at::IntArrayRef config, double eps,
                         std::string isa);

namespace {

at::Tensor opt(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

at::Tensor linear(const at::Tensor& x, const at::Tensor& masks, const at::Tensor& values,
                  const at::Tensor& block_offsets, const std::optional<at::Tensor>& scales,
                  const std::optional<at::Tensor>& bias, int64_t rows, int64_t cols, int64_t row_block,
                  std::string isa_name) {
  const IsaRow* isa = find_isa(isa_name);
  TORCH_CHECK(isa != nullptr, "sparsefit: instruction set '", isa_name, "' is not available here");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "sparsefit: x must be a float32 CPU tensor");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == cols, "sparsefit: x has ", x.size(-1), " features, the weight ", cols);
  const PackedLinear w = packed_linear(masks, values, block_offsets, opt(scales), opt(bias), rows, cols, row_block,
                                       "linear");
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = rows;
  const int64_t batch = x.numel() / cols;
  at::Tensor y = at::empty({batch, rows}, x.options());
  if (batch == 0) return y.view(out_shape);
  // The kernels read whole groups of 64 inputs: pad the columns with zeros (and make rows contiguous).
  at::Tensor xin = x.reshape({batch, cols});
  const int64_t width = w.view.groups * kGroup;
  if (cols != width || !xin.is_contiguous()) {
    at::Tensor padded = at::zeros({batch, width}, x.options());
    padded.narrow(1, 0, cols).copy_(xin);
    xin = padded;
  }
  matmul(*isa, w, xin.data_ptr<float>(), batch, xin.stride(0), y.data_ptr<float>(), rows);
  return y.view(out_shape);
}

// Rows of a dense-layout packed weight as fp32 (an embedding table tied to its output layer).
at::Tensor packed_rows(const at::Tensor& values, const at::Tensor& block_offsets,
                       const std::optional<at::Tensor>& scales, int64_t rows, int64_t cols, int64_t row_block,
                       const at::Tensor& indices) {
  const PackedLinear w = packed_linear(at::Tensor(), values, block_offsets, opt(scales), at::Tensor(), rows, cols,
                                       row_block, "packed_rows");
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.dim() == 1 && indices.is_contiguous(),
              "sparsefit: indices must be a 1-D int64 tensor");
  const int64_t n = indices.numel(), groups = w.view.groups;
  const int64_t* idx = indices.data_ptr<int64_t>();
  at::Tensor out = at::empty({n, cols}, indices.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < rows, "sparsefit: row ", idx[i], " outside 0..", rows - 1);
    const int64_t b = idx[i] / row_block, r = idx[i] % row_block;
    const float scale = w.int8 ? w.view.scales[idx[i]] : 1.0f;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t at = w.view.block_offsets[b] + (g * row_block + r) * kGroup;
      for (int64_t p = 0; p < kGroup; ++p) {
        // position -> column (packed.h): bf16 interleaves each 32-column half
        const int64_t t = p & 31, col = g * kGroup + (p & ~int64_t{31}) + (w.int8 ? t : (t & 1 ? 16 + t / 2 : t / 2));
        if (col >= cols) continue;
        float v;
        if (w.int8) {
          v = static_cast<float>(static_cast<const int8_t*>(w.view.values)[at + p]) * scale;
        } else {
          const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(w.view.values)[at + p]) << 16;
          std::memcpy(&v, &bits, 4);
        }
        o[i * cols + col] = v;
      }
    }
  }
  return out;
}

bool isa_supported(std::string name) { return find_isa(name) != nullptr; }

std::string best(){ return best_isa(); }

}  // namespace

TORCH_LIBRARY(sparsefit, m) {
  m.def(
      "linear(Tensor x, Tensor masks, Tensor values, Tensor block_offsets, Tensor? scales, Tensor? bias, "
      "int rows, int cols, int row_block, str isa) -> Tensor");
  m.def(
      "packed_rows(Tensor values, Tensor block_offsets, Tensor? scales, int rows, int cols, int row_block, "
      "Tensor indices) -> Tensor");
  m.def(
      "llama_decoder(Tensor x, Tensor rows, Tensor positions, Tensor cos, Tensor sin, Tensor(a!)[] k_cache, "
      "Tensor(b!)[] v_cache, Tensor[] weights, int[] config, float eps, str isa) -> Tensor");
  m.def("isa_supported(str isa) -> bool", isa_supported);
  m.def("best_isa() -> str", best);
}

TORCH_LIBRARY_IMPL(sparsefit, CPU, m) {
  m.impl("linear", linear);
  m.impl("packed_rows", packed_rows);
  m.impl("llama_decoder", llama_decoder);
}

}  // namespace sparsefit
