// prepare.h: turns an op's tensors into a params struct plus the outputs it writes. Shared by the
// CPU and CUDA registrations, which differ only in the launcher they call afterwards.
#pragma once

#include <optional>
#include <string_view>

#include <ATen/core/Tensor.h>

#include "../kernels/params.h"

namespace tx_kernels::binding {

// Tensors must outlive the launch: the params point into them (inputs made contiguous included).
struct AttentionFwdCall {
  AttentionParams params;
  at::Tensor q, k, v, mask;  // possibly contiguous copies of the arguments
  at::Tensor out, lse;
  bool empty = false;  // nothing to launch: outputs are already final
};

AttentionFwdCall prepare_attention_fwd(const at::Tensor& query, const at::Tensor& key,
                                       const at::Tensor& value,
                                       const std::optional<at::Tensor>& attn_mask, double scale,
                                       bool is_causal, double dropout_p,
                                       const std::optional<at::Tensor>& rng);

struct AttentionBwdCall {
  AttentionBwdParams params;
  at::Tensor q, k, v, out, grad_out, lse, mask;
  at::Tensor dq, dk, dv, dmask_full;  // dmask_full: (N, H, L, S), acc_type, when the mask grad is wanted
  at::Tensor mask_arg;                // the mask as given, for the final reduction
  bool empty = false;
};

AttentionBwdCall prepare_attention_bwd(const at::Tensor& grad_out, const at::Tensor& query,
                                       const at::Tensor& key, const at::Tensor& value,
                                       const at::Tensor& out, const at::Tensor& logsumexp,
                                       const std::optional<at::Tensor>& attn_mask, double scale,
                                       bool is_causal, double dropout_p,
                                       const std::optional<at::Tensor>& rng,
                                       bool compute_mask_grad);

// Reduces dmask_full to the mask's shape and dtype (or returns an empty tensor).
at::Tensor finish_attention_mask_grad(const AttentionBwdCall& call);

// Variable-length attention on a packed batch (flash_attn_varlen_func's layout): query
// (total_q, H, E), key (total_k, Hkv, E), value (total_k, Hkv, Ev), int32 CPU offsets
// cu_seqlens_q/k (batch + 1 each, from 0 to total, non-decreasing) and the maximum lengths.
// Outputs: out (total_q, H, Ev), lse (H, total_q) fp32; the backward's dq, dk, dv are contiguous.
struct AttentionVarlenFwdCall {
  AttentionParams params;
  at::Tensor q, k, v, cu_q, cu_k;
  at::Tensor out, lse;
  bool empty = false;
};

AttentionVarlenFwdCall prepare_attention_varlen_fwd(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, bool is_causal, double dropout_p,
    const std::optional<at::Tensor>& rng);

struct AttentionVarlenBwdCall {
  AttentionBwdParams params;
  at::Tensor q, k, v, out, grad_out, lse, cu_q, cu_k;
  at::Tensor dq, dk, dv;
  bool empty = false;
};

AttentionVarlenBwdCall prepare_attention_varlen_bwd(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& logsumexp,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, bool is_causal, double dropout_p,
    const std::optional<at::Tensor>& rng);

struct LayerNormFwdCall {
  LayerNormParams params;
  at::Tensor input2d, residual2d, weight_acc, bias_acc;  // parameters in acc_type (checks.h)
  at::Tensor out, residual_out, mean, rstd;
};

LayerNormFwdCall prepare_layer_norm_fwd(const at::Tensor& input,
                                        const std::optional<at::Tensor>& residual,
                                        const std::optional<at::Tensor>& weight,
                                        const std::optional<at::Tensor>& bias,
                                        int64_t normalized_ndim, double eps,
                                        bool write_residual = true);

struct LayerNormBwdCall {
  LayerNormBwdParams params;
  at::Tensor grad_out2d, grad_residual2d, input2d, residual2d, weight_acc, mean, rstd;
  at::Tensor grad_input, grad_weight_acc, grad_bias_acc;
  at::Tensor weight_arg, bias_arg;
};

LayerNormBwdCall prepare_layer_norm_bwd(const at::Tensor& grad_out,
                                        const std::optional<at::Tensor>& grad_residual_out,
                                        const at::Tensor& input, const at::Tensor& mean,
                                        const at::Tensor& rstd,
                                        const std::optional<at::Tensor>& weight,
                                        const std::optional<at::Tensor>& bias,
                                        int64_t normalized_ndim,
                                        const std::optional<at::Tensor>& residual);

// (grad_input, grad_weight, grad_bias) in the parameters' shapes and dtypes.
std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_layer_norm_bwd(const LayerNormBwdCall& call);

struct BiasActFwdCall {
  BiasActParams params;
  at::Tensor input2d, bias_acc, out;
};

BiasActFwdCall prepare_bias_act_fwd(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                                    std::string_view activation, double dropout_p,
                                    const std::optional<at::Tensor>& rng);

struct BiasActBwdCall {
  BiasActBwdParams params;
  at::Tensor input2d, grad_out2d, bias_acc, grad_input, grad_bias_acc, bias_arg;
};

BiasActBwdCall prepare_bias_act_bwd(const at::Tensor& grad_out, const at::Tensor& input,
                                    const std::optional<at::Tensor>& bias,
                                    std::string_view activation, double dropout_p,
                                    const std::optional<at::Tensor>& rng);

at::Tensor finish_bias_grad(const BiasActBwdCall& call);

}  // namespace tx_kernels::binding
