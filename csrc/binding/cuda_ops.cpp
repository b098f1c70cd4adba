// cuda_ops.cpp: the CUDA implementations of the tx_kernels operators (schemas in registry.cpp).
//
// Each function: rejects fp64 data where the kernels lack it (attention has a general fp64 path),
// sets the device guard to the input's device, runs the shared prepare_* (all argument checks,
// output allocation, params filling; see prepare.h), adds what only the device knows (SM count,
// shared-memory limit, workspace), launches on the current stream and turns a CUDA error into a
// Python exception.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include "../kernels/launchers.h"
#include "prepare.h"

namespace tx_kernels::binding {
namespace {

void check_cuda_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(!t.defined() || t.scalar_type() != at::kDouble, "tx_kernels: `", name,
                   "` is float64, which the CUDA kernels do not support; use float32, float16 or "
                   "bfloat16 on CUDA (float64 runs on CPU)");
}

void check_on_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), "tx_kernels: `", name, "` must be a CUDA tensor here, got one on ",
                    t.device());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK_TYPE(err != cudaErrorNotSupported, "tx_kernels: ", op,
                   " has no CUDA kernel for these arguments' dtype (", cudaGetErrorString(err), ")");
  TORCH_CHECK(err == cudaSuccess, "tx_kernels: CUDA kernel of ", op, " failed: ",
              cudaGetErrorString(err), " (", static_cast<int>(err), ")");
}

struct DeviceInfo {
  int num_sms;
  int64_t max_smem_per_block;  // opt-in limit (what cudaFuncSetAttribute can raise a kernel to)
};

// Properties of the current device (the guard has already been set). Read with
// cudaDeviceGetAttribute, a cheap host-side query, rather than at::cuda::getCurrentDeviceProperties:
// its header (ATen/cuda/CUDAContext.h) pulls in cuBLAS/cuSPARSE/cuSOLVER headers, which this
// binding does not need and which CPU-only machines lack, so the file could not be syntax-checked
// there.
DeviceInfo device_info() {
  int device = 0;
  check_launch(cudaGetDevice(&device), "a device query");
  int sms = 0, smem = 0;
  check_launch(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
               "a device query");
  check_launch(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
               "a device query");
  return DeviceInfo{sms, static_cast<int64_t>(smem)};
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Scratch for a launcher (two-stage reductions, split-KV partials), on the input's device;
// 512-byte aligned by the caching allocator.
at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  const int64_t floats = static_cast<int64_t>((bytes + sizeof(float) - 1) / sizeof(float));
  return at::empty({floats}, like.options().dtype(at::kFloat));
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda_op(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, double scale, bool is_causal, double dropout_p,
    const std::optional<at::Tensor>& rng) {
  // No fp64 check here: the attention launcher has a general fp64 path; it answers
  // cudaErrorNotSupported for any dtype it lacks, which check_launch reports.
  check_on_cuda(query, "query");
  const c10::cuda::CUDAGuard guard(query.device());
  auto call = prepare_attention_fwd(query, key, value, attn_mask, scale, is_causal, dropout_p, rng);
  if (!call.empty) {
    const DeviceInfo dev = device_info();
    call.params.num_sms = dev.num_sms;
    call.params.max_smem_per_block = dev.max_smem_per_block;
    // Split-KV decode scratch (0 bytes for most problems); freed on return, which is safe: the
    // caching allocator reuses it only for later work on the same stream.
    const size_t ws_bytes = attention_fwd_workspace_bytes(call.params);
    at::Tensor ws = workspace(ws_bytes, query);
    check_launch(attention_fwd_cuda(call.params, ws_bytes ? ws.data_ptr() : nullptr, ws_bytes,
                                    current_stream()),
                 "attention_fwd");
  }
  return {call.out, call.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda_op(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& logsumexp,
    const std::optional<at::Tensor>& attn_mask, double scale, bool is_causal, double dropout_p,
    const std::optional<at::Tensor>& rng, bool compute_mask_grad) {
  check_on_cuda(query, "query");
  const c10::cuda::CUDAGuard guard(query.device());
  auto call = prepare_attention_bwd(grad_out, query, key, value, out, logsumexp, attn_mask, scale,
                                    is_causal, dropout_p, rng, compute_mask_grad);
  if (!call.empty) {
    const DeviceInfo dev = device_info();
    call.params.num_sms = dev.num_sms;
    // The opt-in limit: left at the 48 KB default, every config would take the general path.
    call.params.max_smem_per_block = dev.max_smem_per_block;
    // torch.use_deterministic_algorithms(True) selects the atomic-free dQ pass.
    call.params.deterministic = at::globalContext().deterministicAlgorithms();
    // D = rowsum(dO * O) and the fp32 dQ accumulator; the launcher initializes it itself.
    at::Tensor ws = workspace(attention_bwd_workspace_bytes(call.params), query);
    call.params.workspace = ws.numel() ? ws.data_ptr<float>() : nullptr;
    check_launch(attention_bwd_cuda(call.params, current_stream()), "attention_bwd");
  }
  return {call.dq, call.dk, call.dv, finish_attention_mask_grad(call)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda_op(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t normalized_ndim, double eps) {
  check_cuda_dtype(input, "input");
  check_on_cuda(input, "input");
  const c10::cuda::CUDAGuard guard(input.device());
  auto call = prepare_layer_norm_fwd(input, std::nullopt, weight, bias, normalized_ndim, eps);
  check_launch(layer_norm_fwd_cuda(call.params, current_stream()), "layer_norm_fwd");
  return {call.out, call.mean, call.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd_cuda_op(
    const at::Tensor& input, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t normalized_ndim, double eps,
    bool return_residual) {
  check_cuda_dtype(input, "input");
  check_cuda_dtype(residual, "residual");
  check_on_cuda(input, "input");
  const c10::cuda::CUDAGuard guard(input.device());
  // The CUDA kernel always writes the sum: with return_residual=False it goes to scratch.
  auto call = prepare_layer_norm_fwd(input, residual, weight, bias, normalized_ndim, eps);
  check_launch(layer_norm_fwd_cuda(call.params, current_stream()), "add_layer_norm_fwd");
  return {call.out, return_residual ? call.residual_out : at::empty({0}, input.options()), call.mean,
          call.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda_op(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& input, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    int64_t normalized_ndim, const std::optional<at::Tensor>& residual) {
  check_cuda_dtype(input, "input");
  check_cuda_dtype(grad_out, "grad_out");
  if (grad_residual_out.has_value()) check_cuda_dtype(*grad_residual_out, "grad_residual_out");
  check_on_cuda(input, "input");
  const c10::cuda::CUDAGuard guard(input.device());
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
    const DeviceInfo dev = device_info();
    const size_t bytes = layer_norm_bwd_workspace_bytes(call.params, dev.num_sms);
    at::Tensor ws;
    if (bytes > 0) {
      ws = workspace(bytes, input);
      call.params.workspace = ws.data_ptr<float>();
    }
    check_launch(layer_norm_bwd_cuda(call.params, dev.num_sms, current_stream()), "layer_norm_bwd");
  }
  return finish_layer_norm_bwd(call);
}

at::Tensor bias_act_fwd_cuda_op(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                                c10::string_view activation, double dropout_p,
                                const std::optional<at::Tensor>& rng) {
  check_cuda_dtype(input, "input");
  check_on_cuda(input, "input");
  const c10::cuda::CUDAGuard guard(input.device());
  auto call = prepare_bias_act_fwd(input, bias, activation, dropout_p, rng);
  check_launch(bias_act_fwd_cuda(call.params, current_stream()), "bias_act_fwd");
  return call.out;
}

std::tuple<at::Tensor, at::Tensor> bias_act_bwd_cuda_op(const at::Tensor& grad_out,
                                                        const at::Tensor& input,
                                                        const std::optional<at::Tensor>& bias,
                                                        c10::string_view activation,
                                                        double dropout_p,
                                                        const std::optional<at::Tensor>& rng) {
  check_cuda_dtype(input, "input");
  check_cuda_dtype(grad_out, "grad_out");
  check_on_cuda(input, "input");
  const c10::cuda::CUDAGuard guard(input.device());
  auto call = prepare_bias_act_bwd(grad_out, input, bias, activation, dropout_p, rng);
  const DeviceInfo dev = device_info();
  const size_t bytes = bias_act_bwd_workspace_bytes(call.params, dev.num_sms);
  at::Tensor ws;
  if (bytes > 0) {
    ws = workspace(bytes, input);
    call.params.workspace = ws.data_ptr<float>();
  }
  check_launch(bias_act_bwd_cuda(call.params, dev.num_sms, current_stream()), "bias_act_bwd");
  return {call.grad_input, finish_bias_grad(call)};
}

}  // namespace

TORCH_LIBRARY_IMPL(tx_kernels, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda_op);
  m.impl("attention_bwd", &attention_bwd_cuda_op);
  m.impl("layer_norm_fwd", &layer_norm_fwd_cuda_op);
  m.impl("add_layer_norm_fwd", &add_layer_norm_fwd_cuda_op);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cuda_op);
  m.impl("bias_act_fwd", &bias_act_fwd_cuda_op);
  m.impl("bias_act_bwd", &bias_act_bwd_cuda_op);
}

}  // namespace tx_kernels::binding
