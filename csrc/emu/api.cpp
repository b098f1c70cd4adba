// api.cpp: the emulated library's entry table (api.h). Each entry opens a call scope whose buffers
// are exactly the extents params.h lets the kernels reach (a tensor's extent is computed from its
// sizes and strides, so an access past a strided view's last element is out of bounds even when
// the storage behind it is larger), poisons what the kernels must write (outputs and workspaces
// become NaN bytes, as fresh device memory holds garbage), then runs the real launcher.
#include <cstring>
#include <initializer_list>
#include <vector>

#include "../kernels/launchers.h"
#include "api.h"
#include "runtime.h"

namespace tx_kernels::emu {
namespace {

size_t element_bytes(DType t) {
  switch (t) {
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    case DType::kFloat64: return 8;
    case DType::kBool: return 1;
    default: return 4;
  }
}

// Bytes from the first to one past the last element of a strided view (0 if it has none).
size_t extent(DType t, std::initializer_list<int64_t> sizes, std::initializer_list<int64_t> strides, int64_t inner) {
  int64_t last = 0;
  auto st = strides.begin();
  for (int64_t n : sizes) {
    if (n <= 0) return 0;
    last += (n - 1) * *st++;
  }
  if (inner <= 0) return 0;
  return static_cast<size_t>(last + inner) * element_bytes(t);
}

class Scope {
 public:
  explicit Scope(const Device& d) : device_{d.name, d.num_sms, d.max_smem_per_block_optin} {}
  void add(const void* p, size_t bytes, const char* name) {
    if (p != nullptr && bytes > 0) buffers_.push_back(txemu::Buffer{p, bytes, name});
  }
  // A buffer the launch must write in full before reading it: all-ones bytes are NaN in every
  // floating type, so an element a kernel forgets stays NaN.
  void output(void* p, size_t bytes, const char* name) {
    add(p, bytes, name);
    if (p != nullptr && bytes > 0) std::memset(p, 0xFF, bytes);
  }
  template <typename F>
  int run(F&& launch) {
    txemu::set_call(device_, buffers_.data(), static_cast<int>(buffers_.size()));
    const cudaError_t err = launch();
    txemu::clear_call();
    return static_cast<int>(err);
  }

 private:
  txemu::DeviceDesc device_;
  std::vector<txemu::Buffer> buffers_;
};

// The statistics type of params.h: logsumexp, mask gradient, LayerNorm parameters and statistics,
// bias-act bias are fp64 for fp64 data, fp32 otherwise.
DType stats_type(DType data) { return data == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32; }

// A packed batch (params.h: cu_seqlens set, batch strides 0) is one (1, heads, total rows) view
// whose totals are the last offsets (host memory here); a padded one is (batch, heads, length).
int64_t views(const AttentionParams& p) { return p.cu_seqlens_q ? 1 : p.batch; }
int64_t q_rows(const AttentionParams& p) { return p.cu_seqlens_q ? p.cu_seqlens_q[p.batch] : p.q_len; }
int64_t k_rows(const AttentionParams& p) { return p.cu_seqlens_k ? p.cu_seqlens_k[p.batch] : p.kv_len; }
size_t out_bytes(const AttentionParams& p) {
  return extent(p.dtype, {views(p), p.heads, q_rows(p)}, {p.out_stride[0], p.out_stride[1], p.out_stride[2]}, p.v_head_dim);
}
size_t lse_bytes(const AttentionParams& p) {
  if (p.cu_seqlens_q != nullptr) return extent(stats_type(p.dtype), {p.heads}, {q_rows(p)}, q_rows(p));  // (H, total_q)
  return extent(stats_type(p.dtype), {p.batch, p.heads}, {p.heads * p.q_len, p.q_len}, p.q_len);
}

void add_attention_inputs(Scope& s, const AttentionParams& p) {
  const DType t = p.dtype;
  s.add(p.q, extent(t, {views(p), p.heads, q_rows(p)}, {p.q_stride[0], p.q_stride[1], p.q_stride[2]}, p.head_dim), "query");
  s.add(p.k, extent(t, {views(p), p.kv_heads, k_rows(p)}, {p.k_stride[0], p.k_stride[1], p.k_stride[2]}, p.head_dim), "key");
  s.add(p.v, extent(t, {views(p), p.kv_heads, k_rows(p)}, {p.v_stride[0], p.v_stride[1], p.v_stride[2]}, p.v_head_dim), "value");
  if (p.cu_seqlens_q != nullptr) {
    s.add(p.cu_seqlens_q, (p.batch + 1) * sizeof(int32_t), "cu_seqlens_q");
    s.add(p.cu_seqlens_k, (p.batch + 1) * sizeof(int32_t), "cu_seqlens_k");
  }
  if (p.mask_kind != MaskKind::kNone) {
    const int64_t* m = p.mask_stride;
    s.add(p.mask, extent(p.mask_dtype, {p.batch, p.heads, p.q_len, p.kv_len}, {m[0], m[1], m[2], m[3]}, 1), "attn_mask");
  }
}

DeviceInfo info_of(const Device& d) { return DeviceInfo{d.num_sms, d.max_smem_per_block_optin}; }

size_t attention_fwd_workspace_bytes(const AttentionParams& p, const Device& d) {
  return tx_kernels::attention_fwd_workspace_bytes(p, info_of(d));
}

int attention_fwd(const AttentionParams& p, void* workspace, size_t workspace_bytes, const Device& d) {
  Scope s(d);
  add_attention_inputs(s, p);
  s.output(p.out, out_bytes(p), "out");
  s.output(p.lse, lse_bytes(p), "logsumexp");
  s.output(workspace, workspace_bytes, "workspace");
  return s.run([&] { return attention_fwd_cuda(p, info_of(d), workspace, workspace_bytes, nullptr); });
}

size_t attention_bwd_workspace_bytes(const AttentionBwdParams& p, const Device& d) {
  return tx_kernels::attention_bwd_workspace_bytes(p, info_of(d));
}

int attention_bwd(const AttentionBwdParams& p, void* workspace, size_t workspace_bytes, const Device& d) {
  Scope s(d);
  add_attention_inputs(s, p);
  s.add(p.out, out_bytes(p), "out");
  s.add(p.lse, lse_bytes(p), "logsumexp");
  const DType t = p.dtype;
  const int64_t* g = p.grad_out_stride;
  s.add(p.grad_out, extent(t, {views(p), p.heads, q_rows(p)}, {g[0], g[1], g[2]}, p.v_head_dim), "grad_out");
  s.output(p.dq, extent(t, {views(p), p.heads, q_rows(p)}, {p.dq_stride[0], p.dq_stride[1], p.dq_stride[2]}, p.head_dim), "grad_query");
  s.output(p.dk, extent(t, {views(p), p.kv_heads, k_rows(p)}, {p.dk_stride[0], p.dk_stride[1], p.dk_stride[2]}, p.head_dim), "grad_key");
  s.output(p.dv, extent(t, {views(p), p.kv_heads, k_rows(p)}, {p.dv_stride[0], p.dv_stride[1], p.dv_stride[2]}, p.v_head_dim), "grad_value");
  // dmask arrives zero-filled from the binding (entries of skipped tiles are never written).
  s.add(p.dmask, extent(stats_type(t), {p.batch * p.heads * p.q_len}, {p.kv_len}, p.kv_len), "grad_attn_mask");
  s.output(workspace, workspace_bytes, "workspace");
  return s.run([&] { return attention_bwd_cuda(p, info_of(d), workspace, workspace_bytes, nullptr); });
}

size_t rows_bytes(DType t, int64_t rows, int64_t row_stride, int64_t cols) {
  return extent(t, {rows}, {row_stride}, cols);
}

size_t layer_norm_fwd_workspace_bytes(const LayerNormParams& p, const Device& d) {
  return tx_kernels::layer_norm_fwd_workspace_bytes(p, info_of(d));
}

int layer_norm_fwd(const LayerNormParams& p, void* workspace, size_t workspace_bytes, const Device& d) {
  Scope s(d);
  const DType t = p.dtype, st = stats_type(t);
  s.add(p.input, rows_bytes(t, p.rows, p.input_row_stride, p.cols), "input");
  s.add(p.residual, rows_bytes(t, p.rows, p.residual_row_stride, p.cols), "residual");
  s.add(p.weight, rows_bytes(st, 1, 0, p.cols), "weight");
  s.add(p.bias, rows_bytes(st, 1, 0, p.cols), "bias");
  s.output(p.out, rows_bytes(t, p.rows, p.cols, p.cols), "out");
  s.output(p.residual_out, rows_bytes(t, p.rows, p.cols, p.cols), "residual_out");
  s.output(p.mean, rows_bytes(st, 1, 0, p.rows), "mean");
  s.output(p.rstd, rows_bytes(st, 1, 0, p.rows), "rstd");
  s.output(workspace, workspace_bytes, "workspace");
  return s.run([&] { return layer_norm_fwd_cuda(p, info_of(d), workspace, workspace_bytes, nullptr); });
}

size_t layer_norm_bwd_workspace_bytes(const LayerNormBwdParams& p, const Device& d) {
  return tx_kernels::layer_norm_bwd_workspace_bytes(p, info_of(d));
}

int layer_norm_bwd(const LayerNormBwdParams& p, void* workspace, size_t workspace_bytes, const Device& d) {
  Scope s(d);
  const DType t = p.dtype, st = stats_type(t);
  const size_t matrix = rows_bytes(t, p.rows, p.cols, p.cols);
  s.add(p.grad_out, matrix, "grad_out");
  s.add(p.grad_residual_out, matrix, "grad_residual_out");
  s.add(p.input, matrix, "input");
  s.add(p.residual, matrix, "residual");
  s.add(p.mean, rows_bytes(st, 1, 0, p.rows), "mean");
  s.add(p.rstd, rows_bytes(st, 1, 0, p.rows), "rstd");
  s.add(p.weight, rows_bytes(st, 1, 0, p.cols), "weight");
  s.output(p.grad_input, matrix, "grad_input");
  s.output(p.grad_weight, rows_bytes(st, 1, 0, p.cols), "grad_weight");
  s.output(p.grad_bias, rows_bytes(st, 1, 0, p.cols), "grad_bias");
  s.output(workspace, workspace_bytes, "workspace");
  return s.run([&] { return layer_norm_bwd_cuda(p, info_of(d), workspace, workspace_bytes, nullptr); });
}

void add_bias_act_inputs(Scope& s, const BiasActParams& p) {
  s.add(p.input, rows_bytes(p.dtype, p.rows, p.input_row_stride, p.cols), "input");
  s.add(p.bias, rows_bytes(stats_type(p.dtype), 1, 0, p.cols), "bias");
}

size_t bias_act_fwd_workspace_bytes(const BiasActParams& p, const Device& d) {
  return tx_kernels::bias_act_fwd_workspace_bytes(p, info_of(d));
}

int bias_act_fwd(const BiasActParams& p, void* workspace, size_t workspace_bytes, const Device& d) {
  Scope s(d);
  add_bias_act_inputs(s, p);
  s.output(p.out, rows_bytes(p.dtype, p.rows, p.cols, p.cols), "out");
  s.output(workspace, workspace_bytes, "workspace");
  return s.run([&] { return bias_act_fwd_cuda(p, info_of(d), workspace, workspace_bytes, nullptr); });
}

size_t bias_act_bwd_workspace_bytes(const BiasActBwdParams& p, const Device& d) {
  return tx_kernels::bias_act_bwd_workspace_bytes(p, info_of(d));
}

int bias_act_bwd(const BiasActBwdParams& p, void* workspace, size_t workspace_bytes, const Device& d) {
  Scope s(d);
  add_bias_act_inputs(s, p);
  const size_t matrix = rows_bytes(p.dtype, p.rows, p.cols, p.cols);
  s.add(p.grad_out, matrix, "grad_out");
  s.output(p.grad_input, matrix, "grad_input");
  s.output(p.grad_bias, rows_bytes(stats_type(p.dtype), 1, 0, p.cols), "grad_bias");
  s.output(workspace, workspace_bytes, "workspace");
  return s.run([&] { return bias_act_bwd_cuda(p, info_of(d), workspace, workspace_bytes, nullptr); });
}

const char* error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

const Api kApi = {
    kApiVersion,
    &attention_fwd_workspace_bytes,
    &attention_fwd,
    &attention_bwd_workspace_bytes,
    &attention_bwd,
    &layer_norm_fwd_workspace_bytes,
    &layer_norm_fwd,
    &layer_norm_bwd_workspace_bytes,
    &layer_norm_bwd,
    &bias_act_fwd_workspace_bytes,
    &bias_act_fwd,
    &bias_act_bwd_workspace_bytes,
    &bias_act_bwd,
    &error_string,
};

}  // namespace
}  // namespace tx_kernels::emu

extern "C" __attribute__((visibility("default"))) const tx_kernels::emu::Api* tx_kernels_emu_api() {
  return &tx_kernels::emu::kApi;
}
