// device_ops.h: the operator implementations shared by the CUDA backend (cuda_ops.cpp) and the
// CUDA emulator backend (emu_ops.cpp): the same checks, allocations, params filling, workspaces and
// launch sequence, over a `Device` policy that says where tensors must live, what the device is
// and how a launcher is called:
//   Device::kName                              "CUDA" / "the CUDA emulator", for messages
//   Device::check_on_device(tensor, name)      the tensor is where this backend's kernels run
//   Device::Guard(tensor)                      selects the tensor's device while it lives
//   Device::info()                             SM count and shared-memory opt-in limit
//   Device::attention_fwd_workspace_bytes(p), Device::attention_fwd(p, workspace, bytes), ...
//                                              the launchers.h entry points, raising on error
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "prepare.h"

namespace tx_kernels::binding {

struct DeviceInfo {
  int num_sms;
  int64_t max_smem_per_block;  // opt-in limit (what cudaFuncSetAttribute can raise a kernel to)
};

template <typename Device>
struct DeviceOps {
  static void check_no_fp64(const at::Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(!t.defined() || t.scalar_type() != at::kDouble, "tx_kernels: `", name,
                     "` is float64, which the CUDA kernels do not support; use float32, float16 or "
                     "bfloat16 on CUDA (float64 runs on CPU)");
  }

  // Scratch for a launcher (two-stage reductions, split-KV partials), on the input's device;
  // 512-byte aligned by the caching allocator (64 on the CPU).
  static at::Tensor workspace(size_t bytes, const at::Tensor& like) {
    const int64_t floats = static_cast<int64_t>((bytes + sizeof(float) - 1) / sizeof(float));
    return at::empty({floats}, like.options().dtype(at::kFloat));
  }

  static std::tuple<at::Tensor, at::Tensor> attention_fwd(
      const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
      const std::optional<at::Tensor>& attn_mask, double scale, bool is_causal, double dropout_p,
      const std::optional<at::Tensor>& rng) {
    // No fp64 check: the attention launcher has a general fp64 path.
    Device::check_on_device(query, "query");
    const typename Device::Guard guard(query);
    auto call = prepare_attention_fwd(query, key, value, attn_mask, scale, is_causal, dropout_p, rng);
    if (!call.empty) {
      const DeviceInfo dev = Device::info();
      call.params.num_sms = dev.num_sms;
      call.params.max_smem_per_block = dev.max_smem_per_block;
      // Split-KV decode scratch (0 bytes for most problems); freed on return, which is safe: the
      // caching allocator reuses it only for later work on the same stream.
      const size_t ws_bytes = Device::attention_fwd_workspace_bytes(call.params);
      at::Tensor ws = workspace(ws_bytes, query);
      Device::attention_fwd(call.params, ws_bytes ? ws.data_ptr() : nullptr, ws_bytes);
    }
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
      const DeviceInfo dev = Device::info();
      call.params.num_sms = dev.num_sms;
      // The opt-in limit: left at the 48 KB default, every config would take the general path.
      call.params.max_smem_per_block = dev.max_smem_per_block;
      // torch.use_deterministic_algorithms(True) selects the atomic-free dQ pass.
      call.params.deterministic = at::globalContext().deterministicAlgorithms();
      // D = rowsum(dO * O) and the fp32 dQ accumulator; the launcher initializes it itself.
      const size_t ws_bytes = Device::attention_bwd_workspace_bytes(call.params);
      at::Tensor ws = workspace(ws_bytes, query);
      call.params.workspace = ws.numel() ? ws.data_ptr<float>() : nullptr;
      Device::attention_bwd(call.params, ws_bytes);
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
    Device::layer_norm_fwd(call.params);
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
    // The CUDA kernel always writes the sum: with return_residual=False it goes to scratch.
    auto call = prepare_layer_norm_fwd(input, residual, weight, bias, normalized_ndim, eps);
    Device::layer_norm_fwd(call.params);
    return {call.out, return_residual ? call.residual_out : at::empty({0}, input.options()),
            call.mean, call.rstd};
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
                                       normalized_ndim, residual, /*kernel_adds_residual=*/false);
    // prepare checks dtypes and shapes; mean/rstd/grad_residual_out must also live on this device.
    TORCH_CHECK_VALUE(call.mean.device() == input.device() && call.rstd.device() == input.device(),
                      "tx_kernels: `mean` and `rstd` must be on ", input.device(), " like `input`");
    if (call.grad_residual2d.defined()) {
      TORCH_CHECK_VALUE(call.grad_residual2d.device() == input.device(),
                        "tx_kernels: `grad_residual_out` must be on ", input.device(),
                        " like `input`");
    }
    if (call.params.rows > 0 && call.params.cols > 0) {
      const DeviceInfo dev = Device::info();
      const size_t bytes = Device::layer_norm_bwd_workspace_bytes(call.params, dev.num_sms);
      at::Tensor ws;
      if (bytes > 0) {
        ws = workspace(bytes, input);
        call.params.workspace = ws.data_ptr<float>();
      }
      Device::layer_norm_bwd(call.params, bytes, dev.num_sms);
    }
    return finish_layer_norm_bwd(call);
  }

  static at::Tensor bias_act_fwd(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                                 c10::string_view activation, double dropout_p,
                                 const std::optional<at::Tensor>& rng) {
    check_no_fp64(input, "input");
    Device::check_on_device(input, "input");
    const typename Device::Guard guard(input);
    auto call = prepare_bias_act_fwd(input, bias, activation, dropout_p, rng);
    Device::bias_act_fwd(call.params);
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
    const DeviceInfo dev = Device::info();
    const size_t bytes = Device::bias_act_bwd_workspace_bytes(call.params, dev.num_sms);
    at::Tensor ws;
    if (bytes > 0) {
      ws = workspace(bytes, input);
      call.params.workspace = ws.data_ptr<float>();
    }
    Device::bias_act_bwd(call.params, bytes, dev.num_sms);
    return {call.grad_input, finish_bias_grad(call)};
  }

  // Variable-length attention has no CUDA kernel yet: NotImplementedError naming the op, not the
  // dispatcher's generic "could not run with arguments from the backend" message.
  static void varlen_not_implemented(const char* op) {
    TORCH_CHECK_NOT_IMPLEMENTED(false, "tx_kernels: ", op,
                                " has no CUDA kernel yet; run variable-length attention on CPU "
                                "tensors, or the padded attention_fwd with a key-padding mask on CUDA");
  }
  static std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      int64_t, int64_t, double, bool, double, const std::optional<at::Tensor>&) {
    varlen_not_implemented("attention_varlen_fwd");
    return {};
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_bwd(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, double, bool, double,
      const std::optional<at::Tensor>&) {
    varlen_not_implemented("attention_varlen_bwd");
    return {};
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
