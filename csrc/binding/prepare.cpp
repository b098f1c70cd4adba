// prepare.cpp: argument checks, output allocation and params filling for every op (see prepare.h).
#include "prepare.h"

#include <limits>

#include <ATen/ATen.h>

#include "checks.h"

namespace tx_kernels::binding {
namespace {

// Makes the last dimension contiguous (the kernels' only layout requirement); other strides stay.
at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

void fill_strides3(const at::Tensor& t, int64_t* strides) {
  for (int d = 0; d < 3; ++d) strides[d] = t.stride(d);
}

// An output laid out like `like` in memory: (N, L, H, X) when `like` has its heads inner to its
// rows (a transposed (N, L, H, E) view), else (N, H, L, X). tx_kernels/ops.py mirrors this rule
// in the fake kernels so compiled graphs see the same strides.
at::Tensor empty_like_layout(const at::Tensor& like, int64_t last, at::ScalarType dtype) {
  const auto opts = like.options().dtype(dtype);
  if (like.stride(1) < like.stride(2)) {
    return at::empty({like.size(0), like.size(2), like.size(1), last}, opts).transpose(1, 2);
  }
  return at::empty({like.size(0), like.size(1), like.size(2), last}, opts);
}

DropoutRng read_rng(const std::optional<at::Tensor>& rng, double dropout_p) {
  DropoutRng out;
  if (dropout_p <= 0.0) return out;
  TORCH_CHECK_VALUE(rng.has_value() && rng->defined(),
                    "tx_kernels: `rng` ([seed, offset] int64 tensor) is required when dropout_p > 0");
  TORCH_CHECK_VALUE(rng->scalar_type() == at::kLong && rng->numel() == 2 && rng->is_cpu(),
                    "tx_kernels: `rng` must be an int64 CPU tensor of 2 elements, got ",
                    rng->scalar_type(), " of shape ", rng->sizes(), " on ", rng->device());
  const auto r = rng->contiguous();
  out.seed = static_cast<uint64_t>(r.data_ptr<int64_t>()[0]);
  out.offset = static_cast<uint64_t>(r.data_ptr<int64_t>()[1]);
  return out;
}

void check_dropout_p(double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, "tx_kernels: `dropout_p` must be in [0, 1], got ", p);
}

// The mask viewed as (N, H, L, S) with stride 0 on broadcast dims; never copied.
at::Tensor broadcast_mask(const at::Tensor& mask, const at::Tensor& query, int64_t N, int64_t H,
                          int64_t L, int64_t S) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool || at::isFloatingType(mask.scalar_type()),
                   "tx_kernels: `attn_mask` must be bool or floating point, got ",
                   mask.scalar_type());
  TORCH_CHECK_TYPE(mask.scalar_type() != at::kFloat8_e4m3fn && mask.scalar_type() != at::kFloat8_e5m2,
                   "tx_kernels: `attn_mask` of dtype ", mask.scalar_type(), " is not supported");
  check_same_device(mask, "attn_mask", query, "query");
  const int64_t target[4] = {N, H, L, S};
  TORCH_CHECK_VALUE(mask.dim() <= 4, "tx_kernels: `attn_mask` must have at most 4 dimensions, got shape ",
                    mask.sizes());
  const int64_t pad = 4 - mask.dim();
  for (int64_t d = 0; d < mask.dim(); ++d) {
    TORCH_CHECK_VALUE(mask.size(d) == 1 || mask.size(d) == target[d + pad],
                      "tx_kernels: `attn_mask` of shape ", mask.sizes(),
                      " does not broadcast to (N, H, L, S) = (", N, ", ", H, ", ", L, ", ", S, ")");
  }
  return mask.expand({N, H, L, S});
}

// What padded (N, H, L, E) and packed (total, H, E) attention inputs share: `dims` dimensions,
// one floating dtype and device, heads at dimension 1 (the query's a multiple of the key's), one
// query/key head dim last.
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t dims) {
  check_defined(q, "query");
  check_defined(k, "key");
  check_defined(v, "value");
  check_dim(q, "query", dims);
  check_dim(k, "key", dims);
  check_dim(v, "value", dims);
  check_floating(q, "query");
  check_same_dtype(k, "key", q, "query");
  check_same_dtype(v, "value", q, "query");
  check_same_device(k, "key", q, "query");
  check_same_device(v, "value", q, "query");
  check_size(v, "value", 1, k.size(1), "heads, as in key");
  check_size(k, "key", dims - 1, q.size(dims - 1), "head dim, as in query");
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "tx_kernels: `query` has ",
                    q.size(1), " heads, which is not a multiple of the ", k.size(1),
                    " heads of `key`/`value`");
}

void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_qkv(q, k, v, 4);
  check_size(k, "key", 0, q.size(0), "batch, as in query");
  check_size(v, "value", 0, q.size(0), "batch, as in query");
  check_size(v, "value", 2, k.size(2), "sequence length, as in key");
}

// The backward's tensors of a padded or packed call into its params; `strides` gives a tensor's
// (batch, head, row) strides as the kernels read them.
template <typename Call>
void fill_bwd_tensors(AttentionBwdParams& p, const Call& call, void (*strides)(const at::Tensor&, int64_t*)) {
  p.out = const_cast<void*>(call.out.data_ptr());
  strides(call.out, p.out_stride);
  p.lse = call.lse.data_ptr();
  p.grad_out = call.grad_out.data_ptr();
  strides(call.grad_out, p.grad_out_stride);
  p.dq = call.dq.data_ptr();
  p.dk = call.dk.data_ptr();
  p.dv = call.dv.data_ptr();
  strides(call.dq, p.dq_stride);
  strides(call.dk, p.dk_stride);
  strides(call.dv, p.dv_stride);
}

// The saved logsumexp has the statistics type of the inputs (params.h: fp64 for fp64).
void check_logsumexp_dtype(const at::Tensor& logsumexp, const at::Tensor& query) {
  TORCH_CHECK_TYPE(logsumexp.scalar_type() == acc_type(query.scalar_type()),
                   "tx_kernels: `logsumexp` must be ", acc_type(query.scalar_type()), " for ",
                   query.scalar_type(), " inputs, got ", logsumexp.scalar_type());
}

void fill_attention_common(AttentionParams& p, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& mask, double scale,
                           bool is_causal, double dropout_p, const std::optional<at::Tensor>& rng) {
  p.dtype = to_dtype(q.scalar_type());
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.kv_heads = k.size(1);
  p.q_len = q.size(2);
  p.kv_len = k.size(2);
  p.head_dim = q.size(3);
  p.v_head_dim = v.size(3);
  fill_strides3(q, p.q_stride);
  fill_strides3(k, p.k_stride);
  fill_strides3(v, p.v_stride);
  if (mask.defined()) {
    p.mask_kind = mask.scalar_type() == at::kBool ? MaskKind::kBool : MaskKind::kAdditive;
    p.mask_dtype = to_dtype(mask.scalar_type());
    p.mask = mask.data_ptr();
    for (int d = 0; d < 4; ++d) p.mask_stride[d] = mask.stride(d);
  }
  p.scale = scale;
  p.is_causal = is_causal;
  p.dropout_p = dropout_p;
  p.rng = read_rng(rng, dropout_p);
}

}  // namespace

AttentionFwdCall prepare_attention_fwd(const at::Tensor& query, const at::Tensor& key,
                                       const at::Tensor& value,
                                       const std::optional<at::Tensor>& attn_mask, double scale,
                                       bool is_causal, double dropout_p,
                                       const std::optional<at::Tensor>& rng) {
  check_attention_inputs(query, key, value);
  check_dropout_p(dropout_p);
  AttentionFwdCall call;
  call.q = last_dim_contiguous(query);
  call.k = last_dim_contiguous(key);
  call.v = last_dim_contiguous(value);
  const int64_t N = query.size(0), H = query.size(1), L = query.size(2), S = key.size(2);
  if (attn_mask.has_value() && attn_mask->defined()) {
    call.mask = broadcast_mask(*attn_mask, query, N, H, L, S);
  }
  call.out = empty_like_layout(call.q, value.size(3), query.scalar_type());
  call.lse = at::empty({N, H, L}, query.options().dtype(acc_type(query.scalar_type())));
  fill_attention_common(call.params, call.q, call.k, call.v, call.mask, scale, is_causal,
                        dropout_p, rng);
  call.params.out = call.out.data_ptr();
  call.params.lse = call.lse.data_ptr();
  fill_strides3(call.out, call.params.out_stride);
  if (call.lse.numel() == 0) {
    call.empty = true;  // no query row at all
  } else if (S == 0) {
    // No key at all: every row is fully masked.
    call.out.zero_();
    call.lse.fill_(-std::numeric_limits<double>::infinity());
    call.empty = true;
  }
  return call;
}

AttentionBwdCall prepare_attention_bwd(const at::Tensor& grad_out, const at::Tensor& query,
                                       const at::Tensor& key, const at::Tensor& value,
                                       const at::Tensor& out, const at::Tensor& logsumexp,
                                       const std::optional<at::Tensor>& attn_mask, double scale,
                                       bool is_causal, double dropout_p,
                                       const std::optional<at::Tensor>& rng,
                                       bool compute_mask_grad) {
  check_attention_inputs(query, key, value);
  check_dropout_p(dropout_p);
  const int64_t N = query.size(0), H = query.size(1), L = query.size(2), S = key.size(2);
  const int64_t Ev = value.size(3);
  check_defined(grad_out, "grad_out");
  check_dim(grad_out, "grad_out", 4);
  check_same_dtype(grad_out, "grad_out", query, "query");
  check_same_device(grad_out, "grad_out", query, "query");
  check_dim(out, "out", 4);
  check_same_dtype(out, "out", query, "query");
  const int64_t expected_out[4] = {N, H, L, Ev};
  for (int d = 0; d < 4; ++d) {
    check_size(grad_out, "grad_out", d, expected_out[d], "as in (N, H, L, Ev)");
    check_size(out, "out", d, expected_out[d], "as in (N, H, L, Ev)");
  }
  check_dim(logsumexp, "logsumexp", 3);
  check_logsumexp_dtype(logsumexp, query);
  TORCH_CHECK_VALUE(logsumexp.size(0) == N && logsumexp.size(1) == H && logsumexp.size(2) == L,
                    "tx_kernels: `logsumexp` must have shape (N, H, L) = (", N, ", ", H, ", ", L,
                    "), got ", logsumexp.sizes());

  AttentionBwdCall call;
  call.q = last_dim_contiguous(query);
  call.k = last_dim_contiguous(key);
  call.v = last_dim_contiguous(value);
  call.out = last_dim_contiguous(out);
  call.grad_out = last_dim_contiguous(grad_out);
  call.lse = logsumexp.contiguous();
  if (attn_mask.has_value() && attn_mask->defined()) {
    call.mask_arg = *attn_mask;
    call.mask = broadcast_mask(*attn_mask, query, N, H, L, S);
  }
  TORCH_CHECK_VALUE(!compute_mask_grad || (call.mask.defined() && call.mask.scalar_type() != at::kBool),
                    "tx_kernels: a gradient was requested for `attn_mask`, which is only possible "
                    "for a floating-point (additive) mask");
  call.dq = empty_like_layout(call.q, query.size(3), query.scalar_type());
  call.dk = empty_like_layout(call.k, key.size(3), key.scalar_type());
  call.dv = empty_like_layout(call.v, Ev, value.scalar_type());

  auto& p = call.params;
  fill_attention_common(p, call.q, call.k, call.v, call.mask, scale, is_causal, dropout_p, rng);
  fill_bwd_tensors(p, call, fill_strides3);
  if (compute_mask_grad) {
    call.dmask_full = at::zeros({N, H, L, S}, query.options().dtype(acc_type(query.scalar_type())));
    p.dmask = call.dmask_full.data_ptr();
  }
  if (call.q.numel() == 0 || call.k.numel() == 0 || call.v.numel() == 0 || L == 0 || S == 0) {
    call.dq.zero_();
    call.dk.zero_();
    call.dv.zero_();
    call.empty = true;
  }
  return call;
}

at::Tensor finish_attention_mask_grad(const AttentionBwdCall& call) {
  if (!call.dmask_full.defined()) return at::empty({0}, call.q.options());
  const auto& mask = call.mask_arg;
  // Sum over the dimensions the mask was broadcast along, then drop the padded leading ones.
  at::Tensor g = call.dmask_full;
  const int64_t pad = 4 - mask.dim();
  std::vector<int64_t> keep_shape(4, 1);
  for (int64_t d = 0; d < mask.dim(); ++d) keep_shape[d + pad] = mask.size(d);
  g = g.sum_to_size(keep_shape);
  return g.reshape(mask.sizes()).to(mask.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// LayerNorm
// ---------------------------------------------------------------------------------------------
namespace {

int64_t normalized_cols(const at::Tensor& input, int64_t normalized_ndim) {
  TORCH_CHECK_VALUE(normalized_ndim >= 1 && normalized_ndim <= input.dim(),
                    "tx_kernels: `normalized_shape` has ", normalized_ndim,
                    " dimensions but `input` has shape ", input.sizes());
  int64_t cols = 1;
  for (int64_t d = input.dim() - normalized_ndim; d < input.dim(); ++d) cols *= input.size(d);
  return cols;
}

// A (rows, cols) view with unit column stride, copying only when no such view exists.
at::Tensor as_rows(const at::Tensor& t, int64_t rows, int64_t cols) {
  at::Tensor r = t.reshape({rows, cols});
  if (cols > 1 && r.stride(1) != 1) r = r.contiguous();
  return r;
}

at::Tensor param_as_acc(const std::optional<at::Tensor>& param, const char* name,
                         const at::Tensor& input, int64_t normalized_ndim, int64_t cols) {
  if (!param.has_value() || !param->defined()) return at::Tensor();
  const auto& p = *param;
  check_floating(p, name);
  check_same_device(p, name, input, "input");
  bool shape_ok = p.dim() == normalized_ndim;
  for (int64_t d = 0; shape_ok && d < normalized_ndim; ++d) {
    shape_ok = p.size(d) == input.size(input.dim() - normalized_ndim + d);
  }
  TORCH_CHECK_VALUE(shape_ok, "tx_kernels: `", name, "` has shape ", p.sizes(),
                    " but the normalized shape of `input` ", input.sizes(), " is its last ",
                    normalized_ndim, " dimension(s)");
  return p.reshape({cols}).to(acc_type(input.scalar_type())).contiguous();
}

}  // namespace

LayerNormFwdCall prepare_layer_norm_fwd(const at::Tensor& input,
                                        const std::optional<at::Tensor>& residual,
                                        const std::optional<at::Tensor>& weight,
                                        const std::optional<at::Tensor>& bias,
                                        int64_t normalized_ndim, double eps,
                                        bool write_residual) {
  check_defined(input, "input");
  check_floating(input, "input");
  const int64_t cols = normalized_cols(input, normalized_ndim);
  const int64_t rows = cols == 0 ? 0 : input.numel() / cols;
  LayerNormFwdCall call;
  call.input2d = as_rows(input, rows, cols);
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual) {
    check_same_dtype(*residual, "residual", input, "input");
    check_same_device(*residual, "residual", input, "input");
    TORCH_CHECK_VALUE(residual->sizes() == input.sizes(), "tx_kernels: `residual` has shape ",
                      residual->sizes(), " but `input` has shape ", input.sizes());
    call.residual2d = as_rows(*residual, rows, cols);
  }
  call.weight_acc = param_as_acc(weight, "weight", input, normalized_ndim, cols);
  call.bias_acc = param_as_acc(bias, "bias", input, normalized_ndim, cols);
  TORCH_CHECK_VALUE(eps >= 0.0, "tx_kernels: `eps` must be non-negative, got ", eps);

  call.out = at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous));
  if (has_residual) {
    call.residual_out = write_residual ? at::empty_like(call.out) : at::empty({0}, input.options());
  }
  call.mean = at::empty({rows}, input.options().dtype(acc_type(input.scalar_type())));
  call.rstd = at::empty({rows}, input.options().dtype(acc_type(input.scalar_type())));

  auto& p = call.params;
  p.dtype = to_dtype(input.scalar_type());
  p.rows = rows;
  p.cols = cols;
  p.eps = eps;
  p.input = call.input2d.data_ptr();
  p.input_row_stride = call.input2d.stride(0);
  if (has_residual) {
    p.residual = call.residual2d.data_ptr();
    p.residual_row_stride = call.residual2d.stride(0);
    p.residual_out = write_residual ? call.residual_out.data_ptr() : nullptr;
  }
  p.weight = call.weight_acc.defined() ? call.weight_acc.data_ptr() : nullptr;
  p.bias = call.bias_acc.defined() ? call.bias_acc.data_ptr() : nullptr;
  p.out = call.out.data_ptr();
  p.mean = call.mean.data_ptr();
  p.rstd = call.rstd.data_ptr();
  return call;
}

LayerNormBwdCall prepare_layer_norm_bwd(const at::Tensor& grad_out,
                                        const std::optional<at::Tensor>& grad_residual_out,
                                        const at::Tensor& input, const at::Tensor& mean,
                                        const at::Tensor& rstd,
                                        const std::optional<at::Tensor>& weight,
                                        const std::optional<at::Tensor>& bias,
                                        int64_t normalized_ndim,
                                        const std::optional<at::Tensor>& residual) {
  check_defined(input, "input");
  check_floating(input, "input");
  check_defined(grad_out, "grad_out");
  check_same_dtype(grad_out, "grad_out", input, "input");
  check_same_device(grad_out, "grad_out", input, "input");
  TORCH_CHECK_VALUE(grad_out.sizes() == input.sizes(), "tx_kernels: `grad_out` has shape ",
                    grad_out.sizes(), " but `input` has shape ", input.sizes());
  const int64_t cols = normalized_cols(input, normalized_ndim);
  const int64_t rows = cols == 0 ? 0 : input.numel() / cols;
  const auto stats = acc_type(input.scalar_type());
  TORCH_CHECK_VALUE(mean.scalar_type() == stats && rstd.scalar_type() == stats &&
                        mean.numel() == rows && rstd.numel() == rows,
                    "tx_kernels: `mean` and `rstd` must be ", stats, " with ", rows,
                    " elements for ", input.scalar_type(), " `input`, got ", mean.scalar_type(),
                    " and ", rstd.scalar_type(), " with ", mean.numel(), " and ", rstd.numel());
  LayerNormBwdCall call;
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual) {
    check_same_dtype(*residual, "residual", input, "input");
    check_same_device(*residual, "residual", input, "input");
    TORCH_CHECK_VALUE(residual->sizes() == input.sizes(), "tx_kernels: `residual` has shape ",
                      residual->sizes(), " but `input` has shape ", input.sizes());
  }
  call.input2d = input.reshape({rows, cols}).contiguous();
  if (has_residual) call.residual2d = residual->reshape({rows, cols}).contiguous();
  call.grad_out2d = grad_out.reshape({rows, cols}).contiguous();
  if (grad_residual_out.has_value() && grad_residual_out->defined()) {
    check_same_dtype(*grad_residual_out, "grad_residual_out", input, "input");
    TORCH_CHECK_VALUE(grad_residual_out->sizes() == input.sizes(),
                      "tx_kernels: `grad_residual_out` has shape ", grad_residual_out->sizes(),
                      " but `input` has shape ", input.sizes());
    call.grad_residual2d = grad_residual_out->reshape({rows, cols}).contiguous();
  }
  call.weight_acc = param_as_acc(weight, "weight", input, normalized_ndim, cols);
  if (weight.has_value() && weight->defined()) call.weight_arg = *weight;
  if (bias.has_value() && bias->defined()) call.bias_arg = *bias;
  call.grad_input = at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous));
  if (call.weight_arg.defined()) call.grad_weight_acc = at::empty({cols}, input.options().dtype(stats));
  if (call.bias_arg.defined()) call.grad_bias_acc = at::empty({cols}, input.options().dtype(stats));

  auto& p = call.params;
  p.dtype = to_dtype(input.scalar_type());
  p.rows = rows;
  p.cols = cols;
  p.grad_out = call.grad_out2d.data_ptr();
  p.grad_residual_out = call.grad_residual2d.defined() ? call.grad_residual2d.data_ptr() : nullptr;
  p.input = call.input2d.data_ptr();
  p.residual = call.residual2d.defined() ? call.residual2d.data_ptr() : nullptr;
  call.mean = mean.contiguous();
  call.rstd = rstd.contiguous();
  p.mean = call.mean.data_ptr();
  p.rstd = call.rstd.data_ptr();
  p.weight = call.weight_acc.defined() ? call.weight_acc.data_ptr() : nullptr;
  p.grad_input = call.grad_input.data_ptr();
  p.grad_weight = call.grad_weight_acc.defined() ? call.grad_weight_acc.data_ptr() : nullptr;
  p.grad_bias = call.grad_bias_acc.defined() ? call.grad_bias_acc.data_ptr() : nullptr;
  if (rows == 0 || cols == 0) {
    call.grad_input.zero_();
    if (call.grad_weight_acc.defined()) call.grad_weight_acc.zero_();
    if (call.grad_bias_acc.defined()) call.grad_bias_acc.zero_();
  }
  return call;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_layer_norm_bwd(const LayerNormBwdCall& call) {
  // Distinct empty tensors: outputs of an op must not alias each other (opcheck's schema test).
  auto gw = call.weight_arg.defined()
                ? call.grad_weight_acc.reshape(call.weight_arg.sizes()).to(call.weight_arg.scalar_type())
                : at::empty({0}, call.input2d.options());
  auto gb = call.bias_arg.defined()
                ? call.grad_bias_acc.reshape(call.bias_arg.sizes()).to(call.bias_arg.scalar_type())
                : at::empty({0}, call.input2d.options());
  return {call.grad_input, gw, gb};
}

// ---------------------------------------------------------------------------------------------
// Bias + activation
// ---------------------------------------------------------------------------------------------
namespace {

Activation parse_activation(std::string_view name) {
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  TORCH_CHECK_VALUE(false, "tx_kernels: `activation` must be 'relu', 'gelu' or 'gelu_tanh', got '",
                    std::string(name), "'");
}

void fill_bias_act(BiasActParams& p, const at::Tensor& input, const at::Tensor& input2d,
                   const at::Tensor& bias_acc, std::string_view activation, double dropout_p,
                   const std::optional<at::Tensor>& rng) {
  check_dropout_p(dropout_p);
  p.dtype = to_dtype(input.scalar_type());
  p.activation = parse_activation(activation);
  p.rows = input2d.size(0);
  p.cols = input2d.size(1);
  p.input = input2d.data_ptr();
  p.input_row_stride = input2d.stride(0);
  p.bias = bias_acc.defined() ? bias_acc.data_ptr() : nullptr;
  p.dropout_p = dropout_p;
  p.rng = read_rng(rng, dropout_p);
}

at::Tensor bias_as_acc(const std::optional<at::Tensor>& bias, const at::Tensor& input) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  check_floating(*bias, "bias");
  check_same_device(*bias, "bias", input, "input");
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == input.size(-1),
                    "tx_kernels: `bias` must have shape (", input.size(-1),
                    ",) to match the last dimension of `input` ", input.sizes(), ", got ",
                    bias->sizes());
  return bias->to(acc_type(input.scalar_type())).contiguous();
}

void check_bias_act_input(const at::Tensor& input) {
  check_defined(input, "input");
  check_floating(input, "input");
  TORCH_CHECK_VALUE(input.dim() >= 1, "tx_kernels: `input` must have at least 1 dimension");
}

}  // namespace

BiasActFwdCall prepare_bias_act_fwd(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                                    std::string_view activation, double dropout_p,
                                    const std::optional<at::Tensor>& rng) {
  check_bias_act_input(input);
  BiasActFwdCall call;
  const int64_t cols = input.size(-1);
  const int64_t rows = cols == 0 ? 0 : input.numel() / cols;
  call.input2d = as_rows(input, rows, cols);
  call.bias_acc = bias_as_acc(bias, input);
  call.out = at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous));
  fill_bias_act(call.params, input, call.input2d, call.bias_acc, activation, dropout_p, rng);
  call.params.out = call.out.data_ptr();
  return call;
}

BiasActBwdCall prepare_bias_act_bwd(const at::Tensor& grad_out, const at::Tensor& input,
                                    const std::optional<at::Tensor>& bias,
                                    std::string_view activation, double dropout_p,
                                    const std::optional<at::Tensor>& rng) {
  check_bias_act_input(input);
  check_defined(grad_out, "grad_out");
  check_same_dtype(grad_out, "grad_out", input, "input");
  check_same_device(grad_out, "grad_out", input, "input");
  TORCH_CHECK_VALUE(grad_out.sizes() == input.sizes(), "tx_kernels: `grad_out` has shape ",
                    grad_out.sizes(), " but `input` has shape ", input.sizes());
  BiasActBwdCall call;
  const int64_t cols = input.size(-1);
  const int64_t rows = cols == 0 ? 0 : input.numel() / cols;
  call.input2d = as_rows(input, rows, cols);
  call.grad_out2d = grad_out.reshape({rows, cols}).contiguous();
  call.bias_acc = bias_as_acc(bias, input);
  if (bias.has_value() && bias->defined()) {
    call.bias_arg = *bias;
    call.grad_bias_acc = at::zeros({cols}, input.options().dtype(acc_type(input.scalar_type())));
  }
  call.grad_input = at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous));
  auto& p = call.params;
  fill_bias_act(p, input, call.input2d, call.bias_acc, activation, dropout_p, rng);
  p.grad_out = call.grad_out2d.data_ptr();
  p.grad_input = call.grad_input.data_ptr();
  p.grad_bias = call.grad_bias_acc.defined() ? call.grad_bias_acc.data_ptr() : nullptr;
  return call;
}

at::Tensor finish_bias_grad(const BiasActBwdCall& call) {
  if (!call.bias_arg.defined()) return at::empty({0}, call.grad_input.options());
  return call.grad_bias_acc.to(call.bias_arg.scalar_type());
}


// ---------------------------------------------------------------------------------------------
// Variable-length attention (packed batches)
// ---------------------------------------------------------------------------------------------
namespace {

// The offsets must tile the packed tensor exactly (0 .. total, non-decreasing): the kernels index
// rows with them unchecked, so a bad offset would read or write outside the tensors.
at::Tensor check_cu_seqlens(const at::Tensor& cu, const char* name, int64_t total,
                            const char* total_name, int64_t max_seqlen, const char* max_name) {
  check_defined(cu, name);
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, "tx_kernels: `", name, "` must be int32, got ",
                   cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.numel() >= 1, "tx_kernels: `", name,
                    "` must be 1-D with batch + 1 >= 1 elements, got shape ", cu.sizes());
  TORCH_CHECK_VALUE(cu.is_cpu(), "tx_kernels: `", name, "` must be a CPU tensor here, got one on ",
                    cu.device());
  TORCH_CHECK_VALUE(max_seqlen >= 0, "tx_kernels: `", max_name, "` must be >= 0, got ", max_seqlen);
  at::Tensor c = cu.contiguous();
  const int32_t* o = c.data_ptr<int32_t>();
  const int64_t n = c.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(o[i] >= 0, "tx_kernels: `", name, "` has a negative offset ", o[i],
                      " at index ", i);
  }
  TORCH_CHECK_VALUE(o[0] == 0, "tx_kernels: `", name, "` must start at 0, got ", o[0]);
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK_VALUE(o[i] >= o[i - 1], "tx_kernels: `", name,
                      "` must be non-decreasing (cumulative sequence lengths), but index ", i,
                      " holds ", o[i], " after ", o[i - 1]);
  }
  TORCH_CHECK_VALUE(o[n - 1] == total, "tx_kernels: the last offset of `", name, "` is ", o[n - 1],
                    " but `", total_name, "` packs ", total, " rows; they must be equal");
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK_VALUE(o[i] - o[i - 1] <= max_seqlen, "tx_kernels: sequence ", i - 1, " of `", name,
                      "` has length ", o[i] - o[i - 1], ", more than `", max_name, "` = ",
                      max_seqlen);
  }
  return c;
}

void check_attention_varlen_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_qkv(q, k, v, 3);
  check_size(v, "value", 0, k.size(0), "total key rows, as in key");
}

// Strides of a packed (total, heads, dim) tensor as the kernels' (batch, head, row): the batch
// stride is 0, the offsets locate each sequence's rows.
void fill_packed_strides(const at::Tensor& t, int64_t* strides) {
  strides[0] = 0;
  strides[1] = t.stride(1);
  strides[2] = t.stride(0);
}

void fill_attention_varlen(AttentionParams& p, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
                           int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
                           bool is_causal, double dropout_p, const std::optional<at::Tensor>& rng) {
  p.dtype = to_dtype(q.scalar_type());
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.batch = cu_q.numel() - 1;
  p.heads = q.size(1);
  p.kv_heads = k.size(1);
  p.q_len = max_seqlen_q;
  p.kv_len = max_seqlen_k;
  p.head_dim = q.size(2);
  p.v_head_dim = v.size(2);
  fill_packed_strides(q, p.q_stride);
  fill_packed_strides(k, p.k_stride);
  fill_packed_strides(v, p.v_stride);
  p.cu_seqlens_q = cu_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_k.data_ptr<int32_t>();
  p.scale = scale;
  p.is_causal = is_causal;
  p.dropout_p = dropout_p;
  p.rng = read_rng(rng, dropout_p);
}

std::pair<at::Tensor, at::Tensor> checked_offsets(const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& cu_seqlens_q,
                                                  const at::Tensor& cu_seqlens_k,
                                                  int64_t max_seqlen_q, int64_t max_seqlen_k) {
  at::Tensor cu_q = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.size(0), "query",
                                     max_seqlen_q, "max_seqlen_q");
  at::Tensor cu_k = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.size(0), "key",
                                     max_seqlen_k, "max_seqlen_k");
  TORCH_CHECK_VALUE(cu_k.numel() == cu_q.numel(), "tx_kernels: `cu_seqlens_k` has ", cu_k.numel(),
                    " offsets but `cu_seqlens_q` has ", cu_q.numel(),
                    "; both must hold batch + 1");
  return {cu_q, cu_k};
}

// What both directions read of a packed batch: the checked offsets and q, k, v with a
// contiguous last dimension.
template <typename Call>
void take_varlen_inputs(Call& call, const at::Tensor& query, const at::Tensor& key,
                        const at::Tensor& value, const at::Tensor& cu_seqlens_q,
                        const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  std::tie(call.cu_q, call.cu_k) =
      checked_offsets(query, key, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  call.q = last_dim_contiguous(query);
  call.k = last_dim_contiguous(key);
  call.v = last_dim_contiguous(value);
}

}  // namespace

AttentionVarlenFwdCall prepare_attention_varlen_fwd(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, bool is_causal, double dropout_p,
    const std::optional<at::Tensor>& rng) {
  check_attention_varlen_inputs(query, key, value);
  check_dropout_p(dropout_p);
  AttentionVarlenFwdCall call;
  take_varlen_inputs(call, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const int64_t total_q = query.size(0), H = query.size(1);
  call.out = at::empty({total_q, H, value.size(2)}, query.options());
  call.lse = at::empty({H, total_q}, query.options().dtype(acc_type(query.scalar_type())));
  auto& p = call.params;
  fill_attention_varlen(p, call.q, call.k, call.v, call.cu_q, call.cu_k, max_seqlen_q,
                        max_seqlen_k, scale, is_causal, dropout_p, rng);
  p.out = call.out.data_ptr();
  p.lse = call.lse.data_ptr();
  fill_packed_strides(call.out, p.out_stride);
  call.empty = call.lse.numel() == 0;  // no query row at all
  return call;
}

AttentionVarlenBwdCall prepare_attention_varlen_bwd(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& logsumexp,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, bool is_causal, double dropout_p,
    const std::optional<at::Tensor>& rng) {
  check_attention_varlen_inputs(query, key, value);
  check_dropout_p(dropout_p);
  const int64_t total_q = query.size(0), H = query.size(1), Ev = value.size(2);
  check_defined(grad_out, "grad_out");
  check_same_dtype(grad_out, "grad_out", query, "query");
  check_same_device(grad_out, "grad_out", query, "query");
  check_defined(out, "out");
  check_same_dtype(out, "out", query, "query");
  check_same_device(out, "out", query, "query");
  const int64_t expected_out[3] = {total_q, H, Ev};
  check_dim(grad_out, "grad_out", 3);
  check_dim(out, "out", 3);
  for (int d = 0; d < 3; ++d) {
    check_size(grad_out, "grad_out", d, expected_out[d], "as in (total_q, H, Ev)");
    check_size(out, "out", d, expected_out[d], "as in (total_q, H, Ev)");
  }
  check_defined(logsumexp, "logsumexp");
  check_logsumexp_dtype(logsumexp, query);
  TORCH_CHECK_VALUE(logsumexp.dim() == 2 && logsumexp.size(0) == H && logsumexp.size(1) == total_q,
                    "tx_kernels: `logsumexp` must have shape (H, total_q) = (", H, ", ", total_q,
                    "), got ", logsumexp.sizes());
  AttentionVarlenBwdCall call;
  take_varlen_inputs(call, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  call.out = last_dim_contiguous(out);
  call.grad_out = last_dim_contiguous(grad_out);
  call.lse = logsumexp.contiguous();
  // The offsets tile every packed row, and the kernel writes each row of its sequence (zeros for
  // keys no query reaches), so nothing needs clearing first.
  call.dq = at::empty(query.sizes(), query.options());
  call.dk = at::empty(key.sizes(), key.options());
  call.dv = at::empty(value.sizes(), value.options());
  auto& p = call.params;
  fill_attention_varlen(p, call.q, call.k, call.v, call.cu_q, call.cu_k, max_seqlen_q,
                        max_seqlen_k, scale, is_causal, dropout_p, rng);
  fill_bwd_tensors(p, call, fill_packed_strides);
  if (total_q == 0) {  // no query row: no gradient reaches any key
    call.dk.zero_();
    call.dv.zero_();
    call.empty = true;
  }
  return call;
}

}  // namespace tx_kernels::binding
