// cpu_varlen_ops.cpp: the CPU implementations of the variable-length attention operators
// (schemas in registry.cpp). They run the padded attention kernels of csrc/cpu/attention.cpp,
// which locate each packed sequence through the params' cu_seqlens offsets.
#include <torch/library.h>

#include "../cpu/kernels.h"
#include "prepare.h"

namespace tx_kernels::binding {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, bool is_causal, double dropout_p,
    const std::optional<at::Tensor>& rng) {
  auto call = prepare_attention_varlen_fwd(query, key, value, cu_seqlens_q, cu_seqlens_k,
                                           max_seqlen_q, max_seqlen_k, scale, is_causal,
                                           dropout_p, rng);
  if (!call.empty) cpu::attention_fwd(call.params);
  return {call.out, call.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& logsumexp,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, bool is_causal, double dropout_p,
    const std::optional<at::Tensor>& rng) {
  auto call = prepare_attention_varlen_bwd(grad_out, query, key, value, out, logsumexp,
                                           cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                           max_seqlen_k, scale, is_causal, dropout_p, rng);
  if (!call.empty) cpu::attention_bwd(call.params);
  return {call.dq, call.dk, call.dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(tx_kernels, CPU, m) {
  m.impl("attention_varlen_fwd", &attention_varlen_fwd_cpu);
  m.impl("attention_varlen_bwd", &attention_varlen_bwd_cpu);
}

}  // namespace tx_kernels::binding
