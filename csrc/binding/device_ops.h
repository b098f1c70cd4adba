// device_ops.h: the operator implementations shared by the CUDA backend (cuda_ops.cpp) and the
// CUDA emulator backend (emu_ops.cpp): the same checks, allocations, params filling, workspaces and
// launch sequence, over a `Device` policy that says where tensors must live, what the device is
// and how a launcher is called:
//   Device::kName                              "CUDA" / "the CUDA emulator", for messages
//   Device::check_on_device(tensor, name)      the tensor is where this backend's kernels run
//   Device::Guard(tensor)                      selects the tensor's device while it lives
//   Device::info()                             the DeviceInfo of the current device
//   Device::workspace_bytes(params, info)      the launchers.h pair of the params' op, the launch
//   Device::launch(params, info, ws, bytes)    raising on error (overloaded on the params type)
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "prepare.h"

namespace tx_kernels::binding {

template <typename Device>
struct DeviceOps {
  static void check_no_fp64(const at::Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(!t.defined() || t.scalar_type() != at::kDouble, "tx_kernels: `", name,
                     "` is float64, which the CUDA kernels do not support; use float32, float16 or "
                     "bfloat16 on CUDA (float64 runs on CPU)");
  }

  // Every launch: the device's description, the scratch the launcher asks for (two-stage
  // reductions, split-KV partials, dQ accumulators) on the input's device, 512-byte aligned by the
  // caching allocator (64 on the CPU) and freed on return, which is safe: the caching allocator
  // reuses it only for later work on the same stream.
  template <typename Params>
  static void launch(const Params& params, const at::Tensor& like) {
    const DeviceInfo dev = Device::info();
    const size_t bytes = Device::workspace_bytes(params, dev);
    const int64_t floats = static_cast<int64_t>((bytes + sizeof(float) - 1) / sizeof(float));
    at::Tensor ws = at::empty({floats}, like.options().dtype(at::kFloat));
    Device::launch(params, dev, bytes ? ws.data_ptr() : nullptr, bytes);
  }

  static std::tuple<at::Tensor, at::Tensor> attention_fwd(
      const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
      const std::optional<at::Tensor>& attn_mask, double scale, bool is_causal, double dropout_p,
      const std::optional<at::Tensor>& rng) {
    // No fp64 check: the attention launcher has a general fp64 path.
    Device::check_on_device(query, "query");
    const typename Device::Guard guard(query);
    auto call = prepare_attention_fwd(query, key, value, attn_mask, scale, is_causal, dropout_p, rng);
    if (!call.empty) launch(call.params, query);
    return {call.out, call.lse};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
      const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
      const at::Tensor& value, const at::Tensor& out, const at::Tensor& logsumexp,
      const std::optional<at::Tensor>& attn_mask, double scale, bool is_causal, double dropout_p,
      const std::optional<at::Tensor>& rng, bool compute_mask_grad) {
    Device::check_on_device(query, "query");
    const typename Device::Guard guard(query);
    auto call = prepare_attention_bwd(grad_out, query, key, value, out, logsumexp, attn_mask, scale,
                                      is_causal, dropout_p, rng, compute_mask_grad);
    if (!call.empty) {
      // torch.use_deterministic_algorithms(True) selects the atomic-free dQ pass.
      call.params.deterministic = at::globalContext().deterministicAlgorithms();
      launch(call.params, query);
    }
    return {call.dq, call.dk, call.dv, finish_attention_mask_grad(call)};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
      const at::Tensor& input, const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias, int64_t normalized_ndim, double eps) {
    check_no_fp64(input, "input");
    Device::check_on_device(input, "input");
    const typename Device::Guard guard(input);
    auto call = prepare_layer_norm_fwd(input, std::nullopt, weight, bias, normalized_ndim, eps);
    launch(call.params, input);
    return {call.out, call.mean, call.rstd};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd(
      const at::Tensor& input, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias, int64_t normalized_ndim, double eps,
      bool return_residual) {
    check_no_fp64(input, "input");
    check_no_fp64(residual, "residual");
    Device::check_on_device(input, "input");
    const typename Device::Guard guard(input);
    auto call = prepare_layer_norm_fwd(input, residual, weight, bias, normalized_ndim, eps,
                                       return_residual);
    launch(call.params, input);
    return {call.out, call.residual_out, call.mean, call.rstd};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
      const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
      const at::Tensor& input, const at::Tensor& mean, const at::Tensor& rstd,
      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
      int64_t normalized_ndim, const std::optional<at::Tensor>& residual) {
    check_no_fp64(input, "input");
    check_no_fp64(grad_out, "grad_out");
    if (grad_residual_out.has_value()) check_no_fp64(*grad_residual_out, "grad_residual_out");
    Device::check_on_device(input, "input");
    const typename Device::Guard guard(input);
    auto call = prepare_layer_norm_bwd(grad_out, grad_residual_out, input, mean, rstd, weight, bias,
                                       normalized_ndim, residual);
    // prepare checks dtypes and shapes; mean/rstd/grad_residual_out must also live on this device.
    TORCH_CHECK_VALUE(call.mean.device() == input.device() && call.rstd.device() == input.device(),
                      "tx_kernels: `mean` and `rstd` must be on ", input.device(), " like `input`");
    if (call.grad_residual2d.defined()) {
      TORCH_CHECK_VALUE(call.grad_residual2d.device() == input.device(),
                        "tx_kernels: `grad_residual_out` must be on ", input.device(),
                        " like `input`");
    }
    if (call.params.rows > 0 && call.params.cols > 0) launch(call.params, input);
    return finish_layer_norm_bwd(call);
  }

  static at::Tensor bias_act_fwd(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                                 c10::string_view activation, double dropout_p,
                                 const std::optional<at::Tensor>& rng) {
    check_no_fp64(input, "input");
    Device::check_on_device(input, "input");
    const typename Device::Guard guard(input);
    auto call = prepare_bias_act_fwd(input, bias, activation, dropout_p, rng);
    launch(call.params, input);
    return call.out;
  }

  static std::tuple<at::Tensor, at::Tensor> bias_act_bwd(const at::Tensor& grad_out,
                                                         const at::Tensor& input,
                                                         const std::optional<at::Tensor>& bias,
                                                         c10::string_view activation,
                                                         double dropout_p,
                                                         const std::optional<at::Tensor>& rng) {
    check_no_fp64(input, "input");
    check_no_fp64(grad_out, "grad_out");
    Device::check_on_device(input, "input");
    const typename Device::Guard guard(input);
    auto call = prepare_bias_act_bwd(grad_out, input, bias, activation, dropout_p, rng);
    launch(call.params, input);
    return {call.grad_input, finish_bias_grad(call)};
  }

  // Variable-length attention on a packed batch: the same kernels as attention_fwd / _bwd, which
  // locate each sequence through the offsets. prepare.cpp checks the offsets on the CPU (a bad
  // one would index outside the tensors); the kernels read copies on the device, which live
  // until the launch's work is done (the caching allocator reuses them only for later work on
  // the same stream).
  static void set_device_offsets(AttentionParams& p, const at::Tensor& cu_q, const at::Tensor& cu_k,
                                 at::Tensor& dev_q, at::Tensor& dev_k, const at::Tensor& like) {
    dev_q = cu_q.to(like.device());
    dev_k = cu_k.to(like.device());
    p.cu_seqlens_q = dev_q.data_ptr<int32_t>();
    p.cu_seqlens_k = dev_k.data_ptr<int32_t>();
  }

  static std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd(
      const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
      const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
      int64_t max_seqlen_k, double scale, bool is_causal, double dropout_p,
      const std::optional<at::Tensor>& rng) {
    Device::check_on_device(query, "query");
    const typename Device::Guard guard(query);
    auto call = prepare_attention_varlen_fwd(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                             max_seqlen_k, scale, is_causal, dropout_p, rng);
    if (!call.empty) {
      at::Tensor dev_q, dev_k;
      set_device_offsets(call.params, call.cu_q, call.cu_k, dev_q, dev_k, query);
      launch(call.params, query);
    }
    return {call.out, call.lse};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_bwd(
      const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
      const at::Tensor& value, const at::Tensor& out, const at::Tensor& logsumexp,
      const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
      int64_t max_seqlen_k, double scale, bool is_causal, double dropout_p,
      const std::optional<at::Tensor>& rng) {
    Device::check_on_device(query, "query");
    const typename Device::Guard guard(query);
    auto call = prepare_attention_varlen_bwd(grad_out, query, key, value, out, logsumexp, cu_seqlens_q,
                                             cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, is_causal,
                                             dropout_p, rng);
    if (!call.empty) {
      at::Tensor dev_q, dev_k;
      set_device_offsets(call.params, call.cu_q, call.cu_k, dev_q, dev_k, query);
      call.params.deterministic = at::globalContext().deterministicAlgorithms();
      launch(call.params, query);
    }
    return {call.dq, call.dk, call.dv};
  }

  static void register_impls(torch::Library& m) {
    m.impl("attention_fwd", &attention_fwd);
    m.impl("attention_bwd", &attention_bwd);
    m.impl("attention_varlen_fwd", &attention_varlen_fwd);
    m.impl("attention_varlen_bwd", &attention_varlen_bwd);
    m.impl("layer_norm_fwd", &layer_norm_fwd);
    m.impl("add_layer_norm_fwd", &add_layer_norm_fwd);
    m.impl("layer_norm_bwd", &layer_norm_bwd);
    m.impl("bias_act_fwd", &bias_act_fwd);
    m.impl("bias_act_bwd", &bias_act_bwd);
  }
};

}  // namespace tx_kernels::binding
