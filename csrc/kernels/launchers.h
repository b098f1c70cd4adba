// launchers.h: the CUDA entry points. Every op has the same pair:
//   size_t      <op>_workspace_bytes(params, device)   scratch the launch needs (0: none)
//   cudaError_t <op>_cuda(params, device, workspace, workspace_bytes, stream)
// The workspace is caller-owned device memory of at least that many bytes, 16-byte aligned, its
// contents irrelevant (a smaller or misaligned one is cudaErrorInvalidValue; nullptr is fine when
// 0 bytes are needed). A launcher returns the first CUDA error it met (configuration or launch)
// and never synchronizes, allocates or queries the device.
#pragma once

#include <cstddef>

#include <cuda_runtime_api.h>

#include "params.h"

namespace tx_kernels {

size_t attention_fwd_workspace_bytes(const AttentionParams& params, const DeviceInfo& device);
cudaError_t attention_fwd_cuda(const AttentionParams& params, const DeviceInfo& device,
                               void* workspace, size_t workspace_bytes, cudaStream_t stream);

size_t attention_bwd_workspace_bytes(const AttentionBwdParams& params, const DeviceInfo& device);
cudaError_t attention_bwd_cuda(const AttentionBwdParams& params, const DeviceInfo& device,
                               void* workspace, size_t workspace_bytes, cudaStream_t stream);

size_t layer_norm_fwd_workspace_bytes(const LayerNormParams& params, const DeviceInfo& device);
cudaError_t layer_norm_fwd_cuda(const LayerNormParams& params, const DeviceInfo& device,
                                void* workspace, size_t workspace_bytes, cudaStream_t stream);

size_t layer_norm_bwd_workspace_bytes(const LayerNormBwdParams& params, const DeviceInfo& device);
cudaError_t layer_norm_bwd_cuda(const LayerNormBwdParams& params, const DeviceInfo& device,
                                void* workspace, size_t workspace_bytes, cudaStream_t stream);

size_t bias_act_fwd_workspace_bytes(const BiasActParams& params, const DeviceInfo& device);
cudaError_t bias_act_fwd_cuda(const BiasActParams& params, const DeviceInfo& device,
                              void* workspace, size_t workspace_bytes, cudaStream_t stream);

size_t bias_act_bwd_workspace_bytes(const BiasActBwdParams& params, const DeviceInfo& device);
cudaError_t bias_act_bwd_cuda(const BiasActBwdParams& params, const DeviceInfo& device,
                              void* workspace, size_t workspace_bytes, cudaStream_t stream);

// Each params type's pair and op name, for code generic over the ops (the CUDA binding).
template <typename Params>
struct Launcher {
  const char* op;
  size_t (*workspace_bytes)(const Params&, const DeviceInfo&);
  cudaError_t (*launch)(const Params&, const DeviceInfo&, void*, size_t, cudaStream_t);
};
// clang-format off
inline Launcher<AttentionParams> launcher_of(const AttentionParams&) { return {"attention_fwd", attention_fwd_workspace_bytes, attention_fwd_cuda}; }
inline Launcher<AttentionBwdParams> launcher_of(const AttentionBwdParams&) { return {"attention_bwd", attention_bwd_workspace_bytes, attention_bwd_cuda}; }
inline Launcher<LayerNormParams> launcher_of(const LayerNormParams&) { return {"layer_norm_fwd", layer_norm_fwd_workspace_bytes, layer_norm_fwd_cuda}; }
inline Launcher<LayerNormBwdParams> launcher_of(const LayerNormBwdParams&) { return {"layer_norm_bwd", layer_norm_bwd_workspace_bytes, layer_norm_bwd_cuda}; }
inline Launcher<BiasActParams> launcher_of(const BiasActParams&) { return {"bias_act_fwd", bias_act_fwd_workspace_bytes, bias_act_fwd_cuda}; }
inline Launcher<BiasActBwdParams> launcher_of(const BiasActBwdParams&) { return {"bias_act_bwd", bias_act_bwd_workspace_bytes, bias_act_bwd_cuda}; }
// clang-format on

// The workspace rule above, for the launchers.
inline bool workspace_ok(const void* workspace, size_t workspace_bytes, size_t needed) {
  if (needed == 0) return true;
  return workspace != nullptr && workspace_bytes >= needed &&
         (reinterpret_cast<uintptr_t>(workspace) & 15u) == 0;
}

}  // namespace tx_kernels
