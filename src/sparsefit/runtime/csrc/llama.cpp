// The decoder stack of the Llama family (Llama, Mistral, Qwen2, Qwen3 and those that kept their
// layout) for one step over a set of tokens, each in its own cache row at its own position, so
// one call serves a prefill, a decode step of many rows, or a mix (continuous batching).
//
// Per layer, as transformers' modeling_llama computes it (fp32 activations throughout):
//   h = rmsnorm(x) ; q, k, v = h Wqkv^T (+ bias: Qwen2) ; q, k = rmsnorm per head (Qwen3)
//   q, k = rope(q, k, position) ; cache[row, :, position] = k, v
//   a = softmax(q k^T / sqrt(d)) v over the row's positions 0..position (or the sliding window)
//   x = x + a Wo^T ; h = rmsnorm(x) ; g, u = h Wgu^T ; x = x + (silu(g) * u) Wdown^T
// The four linears run on the packed sparse kernels (dispatch.h). Every sum is taken in a fixed
// order that depends on nothing but the token's own row, so a token's result is the same whatever
// else is in the batch. `runtime/reference.py` is the same computation in torch, the test oracle.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "dispatch.h"

namespace sparsefit {
namespace {

// ---- small vector helpers: one clone per instruction set, chosen by the loader (ifunc) -------------

#define SPARSEFIT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

// sum_i a[i] b[i] in 16 interleaved partial sums, then added in a fixed order.
SPARSEFIT_CLONES float dot(const float* a, const float* b, int64_t n) {
  float part[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) part[j] += a[i + j] * b[i + j];
  for (; i < n; ++i) part[0] += a[i] * b[i];
  float s = 0;
  for (int j = 0; j < 16; ++j) s += part[j];
  return s;
}

SPARSEFIT_CLONES void axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// e^x for x <= 0 (softmax and sigmoid arguments are shifted there), about 1 ulp (Cephes' expf):
// x = k ln2 + f, |f| <= ln2 / 2, e^f by a degree-6 polynomial, times 2^k through the exponent bits.
// Plain arithmetic the compiler vectorises (k rounded by adding and taking away 1.5 * 2^23); below
// -80 the result is 0 (under 2e-35, nothing next to a softmax's largest term of 1).
SPARSEFIT_CLONES void exp_nonpositive(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i] < -80.0f ? -80.0f : x[i];
    const float k = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float f = (v - k * 0.693359375f) - k * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * f + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
    p = p * f * f + f + 1.0f;
    int32_t bits;
    std::memcpy(&bits, &p, 4);
    bits += static_cast<int32_t>(k) << 23;
    float r;
    std::memcpy(&r, &bits, 4);
    x[i] = x[i] < -80.0f ? 0.0f : r;
  }
}

// transformers' RMSNorm: w * (x / sqrt(mean(x^2) + eps)), the mean in fp32.
void rmsnorm(const float* x, const float* w, float* out, int64_t n, float eps) {
  const float inv = 1.0f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * inv);
}

// Rotary embedding as transformers applies it: x * cos + rotate_half(x) * sin.
void rope(float* x, const float* cos, const float* sin, int64_t d) {
  const int64_t h = d / 2;
  float tmp[1024];
  std::memcpy(tmp, x, d * sizeof(float));
  for (int64_t i = 0; i < h; ++i) x[i] = tmp[i] * cos[i] + (-tmp[i + h]) * sin[i];
  for (int64_t i = h; i < d; ++i) x[i] = tmp[i] * cos[i] + tmp[i - h] * sin[i];
}

struct Config {
  int64_t hidden, heads, kv_heads, head_dim, intermediate, row_block, window, layers;
  float eps;
};

constexpr int kTensorsPerLinear = 5;  // masks, values, block_offsets, scales, bias
constexpr int kTensorsPerLayer = 4 + 4 * kTensorsPerLinear;  // ln1, ln2, q_norm, k_norm, qkv, o, gate_up, down

int64_t padded(int64_t n) { return (n + kGroup - 1) / kGroup * kGroup; }

PackedLinear linear_at(const std::vector<at::Tensor>& w, int64_t base, int64_t rows, int64_t cols, int64_t rb,
                       const char* what) {
  return packed_linear(w[base], w[base + 1], w[base + 2], w[base + 3], w[base + 4], rows, cols, rb, what);
}

void check_vector(const at::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n, "sparsefit: ", what,
              " must be float32 with ", n, " values");
}

}  // namespace

at::Tensor llama_decoder(const at::Tensor& x_in, const at::Tensor& rows, const at::Tensor& positions,
                         const at::Tensor& cos, const at::Tensor& sin, at::TensorList k_cache,
                         at::TensorList v_cache, at::TensorList weights_in, at::IntArrayRef config, double eps,
                         std::string isa_name) {
  const IsaRow* isa = find_isa(isa_name);
  TORCH_CHECK(isa != nullptr, "sparsefit: instruction set '", isa_name, "' is not available here");
  TORCH_CHECK(config.size() == 8, "sparsefit: llama_decoder takes 8 config values");
  const Config c{config[0], config[1], config[2], config[3], config[4], config[5], config[6], config[7],
                 static_cast<float>(eps)};
  const int64_t n = x_in.size(0), d = c.head_dim, qdim = c.heads * d, kvdim = c.kv_heads * d;
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == c.hidden && x_in.scalar_type() == at::kFloat,
              "sparsefit: x must be float32 (tokens, hidden)");
  TORCH_CHECK(c.heads % c.kv_heads == 0 && d <= 1024 && d % 2 == 0, "sparsefit: unsupported head layout");
  TORCH_CHECK(rows.scalar_type() == at::kLong && positions.scalar_type() == at::kLong && rows.numel() == n &&
                  positions.numel() == n && rows.is_contiguous() && positions.is_contiguous(),
              "sparsefit: rows and positions must be int64, one per token");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.dim() == 2 &&
                  cos.size(1) == d && sin.sizes() == cos.sizes() && cos.is_contiguous() && sin.is_contiguous(),
              "sparsefit: cos and sin must be float32 (positions, head_dim)");
  TORCH_CHECK(static_cast<int64_t>(k_cache.size()) == c.layers && static_cast<int64_t>(v_cache.size()) == c.layers &&
                  static_cast<int64_t>(weights_in.size()) == c.layers * kTensorsPerLayer,
              "sparsefit: caches and weights must cover every layer");
  const int64_t* row = rows.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t slots = k_cache[0].size(0), capacity = k_cache[0].size(2);
  for (int64_t l = 0; l < c.layers; ++l) {
    for (const at::Tensor& t : {k_cache[l], v_cache[l]}) {
      TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 4 && t.size(0) == slots &&
                      t.size(1) == c.kv_heads && t.size(2) == capacity && t.size(3) == d,
                  "sparsefit: caches must be float32 (slots, kv_heads, capacity, head_dim), contiguous");
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(row[i] >= 0 && row[i] < slots && pos[i] >= 0 && pos[i] < capacity && pos[i] < cos.size(0),
                "sparsefit: token ", i, " has row ", row[i], " / position ", pos[i], " outside the cache");
  }
  std::vector<at::Tensor> w(weights_in.begin(), weights_in.end());
  std::vector<PackedLinear> qkv, o, gate_up, down;
  for (int64_t l = 0; l < c.layers; ++l) {
    const int64_t b = l * kTensorsPerLayer;
    check_vector(w[b], c.hidden, "input_layernorm");
    check_vector(w[b + 1], c.hidden, "post_attention_layernorm");
    if (w[b + 2].numel()) check_vector(w[b + 2], d, "q_norm");
    if (w[b + 3].numel()) check_vector(w[b + 3], d, "k_norm");
    qkv.push_back(linear_at(w, b + 4, qdim + 2 * kvdim, c.hidden, c.row_block, "qkv_proj"));
    o.push_back(linear_at(w, b + 9, c.hidden, qdim, c.row_block, "o_proj"));
    gate_up.push_back(linear_at(w, b + 14, 2 * c.intermediate, c.hidden, c.row_block, "gate_up_proj"));
    down.push_back(linear_at(w, b + 19, c.hidden, c.intermediate, c.row_block, "down_proj"));
  }

  // Scratch, padded to whole groups of 64 with zero tails (the kernels read whole groups).
  const auto opts = x_in.options();
  at::Tensor x = x_in.contiguous().clone();
  const int64_t hp = padded(c.hidden), qp = padded(qdim), ip = padded(c.intermediate);
  const int64_t qkv_n = qdim + 2 * kvdim;
  at::Tensor hbuf = at::zeros({n, hp}, opts), qkvbuf = at::empty({n, qkv_n}, opts);
  at::Tensor abuf = at::zeros({n, qp}, opts), obuf = at::empty({n, c.hidden}, opts);
  at::Tensor gubuf = at::empty({n, 2 * c.intermediate}, opts), mbuf = at::zeros({n, ip}, opts);
  float *xp = x.data_ptr<float>(), *h = hbuf.data_ptr<float>(), *qkvp = qkvbuf.data_ptr<float>();
  float *a = abuf.data_ptr<float>(), *op = obuf.data_ptr<float>(), *gu = gubuf.data_ptr<float>();
  float* m = mbuf.data_ptr<float>();
  const float* cs = cos.data_ptr<float>();
  const float* sn = sin.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int64_t group = c.heads / c.kv_heads;
  int64_t longest = 0;
  for (int64_t i = 0; i < n; ++i) longest = std::max(longest, pos[i] + 1);

  for (int64_t l = 0; l < c.layers; ++l) {
    const int64_t b = l * kTensorsPerLayer;
    const float* ln1 = w[b].data_ptr<float>();
    const float* ln2 = w[b + 1].data_ptr<float>();
    const float* qn = w[b + 2].numel() ? w[b + 2].data_ptr<float>() : nullptr;
    const float* kn = w[b + 3].numel() ? w[b + 3].data_ptr<float>() : nullptr;
    float* kc = k_cache[l].data_ptr<float>();
    float* vc = v_cache[l].data_ptr<float>();

    // attention: norm, q/k/v, per-head norm, rope, cache write
    for (int64_t i = 0; i < n; ++i) rmsnorm(xp + i * c.hidden, ln1, h + i * hp, c.hidden, c.eps);
    matmul(*isa, qkv[l], h, n, hp, qkvp, qkv_n);
    for (int64_t i = 0; i < n; ++i) {
      float* q = qkvp + i * qkv_n;
      float* k = q + qdim;
      const float* v = k + kvdim;
      const float* ci = cs + pos[i] * d;
      const float* si = sn + pos[i] * d;
      for (int64_t hh = 0; hh < c.heads; ++hh) {
        if (qn) rmsnorm(q + hh * d, qn, q + hh * d, d, c.eps);
        rope(q + hh * d, ci, si, d);
      }
      for (int64_t hh = 0; hh < c.kv_heads; ++hh) {
        if (kn) rmsnorm(k + hh * d, kn, k + hh * d, d, c.eps);
        rope(k + hh * d, ci, si, d);
        const int64_t at_ = ((row[i] * c.kv_heads + hh) * capacity + pos[i]) * d;
        std::memcpy(kc + at_, k + hh * d, d * sizeof(float));
        std::memcpy(vc + at_, v + hh * d, d * sizeof(float));
      }
    }
    // each (token, head): softmax over the row's positions up to its own, then the weighted values
    at::parallel_for(0, n * c.heads, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> s(longest);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t i = t / c.heads, hh = t % c.heads, kvh = hh / group;
        const float* q = qkvp + i * qkv_n + hh * d;
        const int64_t hi = pos[i], lo = c.window > 0 ? std::max<int64_t>(0, hi - c.window + 1) : 0;
        const float* kb = kc + (row[i] * c.kv_heads + kvh) * capacity * d;
        const float* vb = vc + (row[i] * c.kv_heads + kvh) * capacity * d;
        float top = -INFINITY;
        for (int64_t j = lo; j <= hi; ++j) {
          s[j - lo] = dot(q, kb + j * d, d) * scale;
          top = std::max(top, s[j - lo]);
        }
        const int64_t len = hi - lo + 1;
        for (int64_t j = 0; j < len; ++j) s[j] -= top;
        exp_nonpositive(s.data(), len);
        float total = 0;
        for (int64_t j = 0; j < len; ++j) total += s[j];
        float* out = a + i * qp + hh * d;
        std::memset(out, 0, d * sizeof(float));
        for (int64_t j = 0; j < len; ++j) axpy(s[j] / total, vb + (lo + j) * d, out, d);
      }
    });
    matmul(*isa, o[l], a, n, qp, op, c.hidden);
    for (int64_t i = 0; i < n * c.hidden; ++i) xp[i] += op[i];

    // MLP: norm, gate and up, silu(gate) * up, down, residual
    for (int64_t i = 0; i < n; ++i) rmsnorm(xp + i * c.hidden, ln2, h + i * hp, c.hidden, c.eps);
    matmul(*isa, gate_up[l], h, n, hp, gu, 2 * c.intermediate);
    for (int64_t i = 0; i < n; ++i) {
      const float* g = gu + i * 2 * c.intermediate;
      const float* u = g + c.intermediate;
      float* mi = m + i * ip;
      for (int64_t j = 0; j < c.intermediate; ++j) mi[j] = -g[j];
      // sigmoid(g) = 1 / (1 + e^-g): e^-g for g >= 0, e^g / (1 + e^g) for g < 0 (no overflow)
      for (int64_t j = 0; j < c.intermediate; ++j) mi[j] = mi[j] > 0 ? -mi[j] : mi[j];
      exp_nonpositive(mi, c.intermediate);
      for (int64_t j = 0; j < c.intermediate; ++j) {
        const float e = mi[j];
        const float sig = g[j] >= 0 ? 1.0f / (1.0f + e) : e / (1.0f + e);
        mi[j] = (g[j] * sig) * u[j];
      }
    }
    matmul(*isa, down[l], m, n, ip, op, c.hidden);
    for (int64_t i = 0; i < n * c.hidden; ++i) xp[i] += op[i];
  }
  return x;
}

}  // namespace sparsefit
