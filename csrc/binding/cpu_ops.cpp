// cpu_ops.cpp: the CPU implementations of the tx_kernels operators (schemas in registry.cpp).
#include <torch/library.h>

#include "../cpu/kernels.h"
#include "prepare.h"

namespace tx_kernels::binding {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& query, const at::Tensor& key,
                                                     const at::Tensor& value,
                                                     const std::optional<at::Tensor>& attn_mask,
                                                     double scale, bool is_causal,
                                                     double dropout_p,
                                                     const std::optional<at::Tensor>& rng) {
  auto call = prepare_attention_fwd(query, key, value, attn_mask, scale, is_causal, dropout_p, rng);
  if (!call.empty) cpu::attention_fwd(call.params);
  return {call.out, call.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& logsumexp,
    const std::optional<at::Tensor>& attn_mask, double scale, bool is_causal, double dropout_p,
    const std::optional<at::Tensor>& rng, bool compute_mask_grad) {
  auto call = prepare_attention_bwd(grad_out, query, key, value, out, logsumexp, attn_mask, scale,
                                    is_causal, dropout_p, rng, compute_mask_grad);
  if (!call.empty) cpu::attention_bwd(call.params);
  return {call.dq, call.dk, call.dv, finish_attention_mask_grad(call)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t normalized_ndim, double eps) {
  auto call = prepare_layer_norm_fwd(input, std::nullopt, weight, bias, normalized_ndim, eps);
  cpu::layer_norm_fwd(call.params);
  return {call.out, call.mean, call.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd_cpu(
    const at::Tensor& input, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t normalized_ndim, double eps,
    bool return_residual) {
  auto call = prepare_layer_norm_fwd(input, residual, weight, bias, normalized_ndim, eps,
                                     return_residual);
  cpu::layer_norm_fwd(call.params);
  return {call.out, call.residual_out, call.mean, call.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& input, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    int64_t normalized_ndim, const std::optional<at::Tensor>& residual) {
  auto call = prepare_layer_norm_bwd(grad_out, grad_residual_out, input, mean, rstd, weight, bias,
                                     normalized_ndim, residual);
  if (call.params.rows > 0 && call.params.cols > 0) cpu::layer_norm_bwd(call.params);
  return finish_layer_norm_bwd(call);
}

at::Tensor bias_act_fwd_cpu(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                            c10::string_view activation, double dropout_p,
                            const std::optional<at::Tensor>& rng) {
  auto call = prepare_bias_act_fwd(input, bias, activation, dropout_p, rng);
  cpu::bias_act_fwd(call.params);
  return call.out;
}

std::tuple<at::Tensor, at::Tensor> bias_act_bwd_cpu(const at::Tensor& grad_out,
                                                    const at::Tensor& input,
                                                    const std::optional<at::Tensor>& bias,
                                                    c10::string_view activation, double dropout_p,
                                                    const std::optional<at::Tensor>& rng) {
  auto call = prepare_bias_act_bwd(grad_out, input, bias, activation, dropout_p, rng);
  cpu::bias_act_bwd(call.params);
  return {call.grad_input, finish_bias_grad(call)};
}

}  // namespace

TORCH_LIBRARY_IMPL(tx_kernels, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("add_layer_norm_fwd", &add_layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
  m.impl("bias_act_fwd", &bias_act_fwd_cpu);
  m.impl("bias_act_bwd", &bias_act_bwd_cpu);
}

}  // namespace tx_kernels::binding
