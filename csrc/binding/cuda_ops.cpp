// cuda_ops.cpp: the CUDA backend of the tx_kernels operators (schemas in registry.cpp): the shared
// implementations of device_ops.h over the real device, its current stream and the launchers of
// csrc/kernels.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime_api.h>

#include "../kernels/launchers.h"
#include "device_ops.h"

namespace tx_kernels::binding {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK_TYPE(err != cudaErrorNotSupported, "tx_kernels: ", op,
                   " has no CUDA kernel for these arguments' dtype (", cudaGetErrorString(err), ")");
  TORCH_CHECK(err == cudaSuccess, "tx_kernels: CUDA kernel of ", op, " failed: ",
              cudaGetErrorString(err), " (", static_cast<int>(err), ")");
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

struct Cuda {
  struct Guard {
    explicit Guard(const at::Tensor& t) : guard(t.device()) {}
    c10::cuda::CUDAGuard guard;
  };

  static void check_on_device(const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.is_cuda(), "tx_kernels: `", name, "` must be a CUDA tensor here, got one on ",
                      t.device());
  }

  // Properties of the current device (the guard has already been set). Read with
  // cudaDeviceGetAttribute, a cheap host-side query, rather than at::cuda::getCurrentDeviceProperties:
  // its header (ATen/cuda/CUDAContext.h) pulls in cuBLAS/cuSPARSE/cuSOLVER headers, which this
  // binding does not need and which CPU-only machines lack, so the file could not be
  // syntax-checked there.
  static DeviceInfo info() {
    int device = 0;
    check_launch(cudaGetDevice(&device), "a device query");
    int sms = 0, smem = 0;
    check_launch(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "a device query");
    check_launch(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                 "a device query");
    return DeviceInfo{sms, static_cast<int64_t>(smem)};
  }

  static size_t workspace_bytes(const AttentionParams& p, const DeviceInfo& d) {
    return attention_fwd_workspace_bytes(p, d);
  }
  static void launch(const AttentionParams& p, const DeviceInfo& d, void* ws, size_t bytes) {
    check_launch(attention_fwd_cuda(p, d, ws, bytes, current_stream()), "attention_fwd");
  }
  static size_t workspace_bytes(const AttentionBwdParams& p, const DeviceInfo& d) {
    return attention_bwd_workspace_bytes(p, d);
  }
  static void launch(const AttentionBwdParams& p, const DeviceInfo& d, void* ws, size_t bytes) {
    check_launch(attention_bwd_cuda(p, d, ws, bytes, current_stream()), "attention_bwd");
  }
  static size_t workspace_bytes(const LayerNormParams& p, const DeviceInfo& d) {
    return layer_norm_fwd_workspace_bytes(p, d);
  }
  static void launch(const LayerNormParams& p, const DeviceInfo& d, void* ws, size_t bytes) {
    check_launch(layer_norm_fwd_cuda(p, d, ws, bytes, current_stream()), "layer_norm_fwd");
  }
  static size_t workspace_bytes(const LayerNormBwdParams& p, const DeviceInfo& d) {
    return layer_norm_bwd_workspace_bytes(p, d);
  }
  static void launch(const LayerNormBwdParams& p, const DeviceInfo& d, void* ws, size_t bytes) {
    check_launch(layer_norm_bwd_cuda(p, d, ws, bytes, current_stream()), "layer_norm_bwd");
  }
  static size_t workspace_bytes(const BiasActParams& p, const DeviceInfo& d) {
    return bias_act_fwd_workspace_bytes(p, d);
  }
  static void launch(const BiasActParams& p, const DeviceInfo& d, void* ws, size_t bytes) {
    check_launch(bias_act_fwd_cuda(p, d, ws, bytes, current_stream()), "bias_act_fwd");
  }
  static size_t workspace_bytes(const BiasActBwdParams& p, const DeviceInfo& d) {
    return bias_act_bwd_workspace_bytes(p, d);
  }
  static void launch(const BiasActBwdParams& p, const DeviceInfo& d, void* ws, size_t bytes) {
    check_launch(bias_act_bwd_cuda(p, d, ws, bytes, current_stream()), "bias_act_bwd");
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(tx_kernels, CUDA, m) { DeviceOps<Cuda>::register_impls(m); }

}  // namespace tx_kernels::binding
