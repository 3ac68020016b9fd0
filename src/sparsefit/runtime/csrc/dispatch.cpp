// The dispatch table and the threaded launch of the kernels (dispatch.h).

#include "dispatch.h"

#include <ATen/Parallel.h>

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>

namespace sparsefit {
namespace {

bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi") &&
         __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("fma");
}

bool has_avx512bf16() { return has_avx512() && __builtin_cpu_supports("avx512bf16"); }

// AMX needs the CPU's AMX-TILE and AMX-BF16 (and AVX512-BF16 for the input rounding), the OS's tile
// state enabled (XCR0 bits 17-18), and Linux's per-process permission to use it (arch_prctl).
bool has_amx() {
  if (!has_avx512() || !__builtin_cpu_supports("avx512bf16")) return false;
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22))) return false;
  unsigned lo, hi;
  asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & (3u << 17)) != (3u << 17)) return false;
  constexpr long kReqPerm = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  static const bool granted = syscall(SYS_arch_prctl, kReqPerm, kTileData) == 0;
  return granted;
}

bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
}

// Best first: `auto` takes the first this CPU supports.
const IsaRow kIsas[] = {
    // Both value types by vdpbf16ps on inputs rounded to bf16: twice the multiply-adds per
    // instruction of the fp32 FMA, which makes sparsity pay where the avx512 row is compute-bound.
    // Rounding the inputs moves the logits by a few tenths at most, and greedy decodes part from
    // the fp32 ones only at near-ties (tests/runtime/test_real_model.py).
    {"avx512bf16", has_avx512bf16, avx512bf16::bf16, avx512bf16::int8},
    // fp32 inputs as they are (--isa avx512): the AVX-512 CPUs without BF16.
    {"avx512", has_avx512, avx512::bf16, avx512::int8},
    // Opt-in (--isa amx): faster from batch 2 up, slower at batch 1 on 70% sparse weights.
    {"amx", has_amx, amx::bf16, amx::int8},
    {"avx2", has_avx2, avx2::bf16, avx2::int8},
};

// Work below this many multiply-adds per thread is not worth a thread's wake-up.
constexpr int64_t kMinWorkPerThread = 1 << 16;

}  // namespace

const IsaRow* find_isa(const std::string& name) {
  for (const IsaRow& row : kIsas) {
    if (name == row.name) return row.supported() ? &row : nullptr;
  }
  return nullptr;
}

std::string best_isa() {
  for (const IsaRow& row : kIsas) {
    if (row.supported()) return row.name;
  }
  return "none";
}

PackedLinear packed_linear(const at::Tensor& masks, const at::Tensor& values, const at::Tensor& block_offsets,
                           const at::Tensor& scales, const at::Tensor& bias, int64_t rows, int64_t cols,
                           int64_t row_block, const char* what) {
  TORCH_CHECK(row_block == 4 || row_block == 8 || row_block == 16, "sparsefit: ", what, ": row_block must be 4, 8 or 16");
  TORCH_CHECK(rows > 0 && cols > 0, "sparsefit: ", what, ": empty weight");
  const bool int8 = values.scalar_type() == at::kChar;
  TORCH_CHECK(int8 || values.scalar_type() == at::kBFloat16, "sparsefit: ", what, ": values must be bfloat16 or int8");
  const int64_t groups = (cols + kGroup - 1) / kGroup, blocks = (rows + row_block - 1) / row_block;
  const bool dense = masks.numel() == 0;
  TORCH_CHECK(dense || (masks.scalar_type() == at::kLong && masks.numel() == blocks * groups * row_block &&
                        masks.is_contiguous()),
              "sparsefit: ", what, ": masks must be int64, blocks * groups * row_block words");
  TORCH_CHECK(block_offsets.scalar_type() == at::kLong && block_offsets.numel() == blocks + 1 &&
                  block_offsets.is_contiguous(),
              "sparsefit: ", what, ": block_offsets must be int64, blocks + 1 entries");
  const int64_t* offsets = block_offsets.data_ptr<int64_t>();
  TORCH_CHECK(offsets[0] == 0 && (!dense || offsets[blocks] == blocks * groups * row_block * kGroup),
              "sparsefit: ", what, ": block_offsets do not describe this layout");
  TORCH_CHECK(values.is_contiguous() && values.numel() >= offsets[blocks] + kGroup,
              "sparsefit: ", what, ": values are shorter than block_offsets say (or lack the 64-value tail pad)");
  const bool scaled = scales.defined() && scales.numel() > 0;
  TORCH_CHECK(int8 == scaled && (!scaled || (scales.scalar_type() == at::kFloat && scales.numel() == rows &&
                                             scales.is_contiguous())),
              "sparsefit: ", what, ": int8 values need float32 scales, one per row (and only they)");
  const bool biased = bias.defined() && bias.numel() > 0;
  TORCH_CHECK(!biased || (bias.scalar_type() == at::kFloat && bias.numel() == rows && bias.is_contiguous()),
              "sparsefit: ", what, ": bias must be float32, one per row");
  PackedLinear p;
  p.int8 = int8;
  p.view.rows = rows;
  p.view.cols = cols;
  p.view.groups = groups;
  p.view.row_block = row_block;
  p.view.blocks = blocks;
  p.view.masks = dense ? nullptr : reinterpret_cast<const uint64_t*>(masks.data_ptr<int64_t>());
  p.view.values = values.data_ptr();
  p.view.block_offsets = offsets;
  p.view.scales = scaled ? scales.data_ptr<float>() : nullptr;
  p.view.bias = biased ? bias.data_ptr<float>() : nullptr;
  return p;
}

void matmul(const IsaRow& isa, const PackedLinear& w, const float* x, int64_t batch, int64_t x_stride, float* y,
            int64_t y_stride) {
  const Kernel kernel = w.int8 ? isa.int8 : isa.bf16;
  const int64_t work_per_block = w.view.row_block * w.view.groups * kGroup * batch;
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, work_per_block));
  at::parallel_for(0, w.view.blocks, grain,
                   [&](int64_t b0, int64_t b1) { kernel(w.view, x, batch, x_stride, y, y_stride, b0, b1); });
}

}  // namespace sparsefit
