// launchers.h: the CUDA entry points. Each takes a params struct and a stream, returns the first
// CUDA error it met (launch or configuration), and never synchronizes or allocates.
#pragma once

#include <cstddef>

#include <cuda_runtime_api.h>

#include "params.h"

namespace tx_kernels {

cudaError_t attention_fwd_cuda(const AttentionParams& params, cudaStream_t stream);
// Split-KV (decode) scratch: bytes attention_fwd_cuda may use for this problem (0: none). Pass a
// buffer of at least that size (16-byte aligned, contents irrelevant) to the overload below; with
// none, or a smaller one, the forward still runs, unsplit.
size_t attention_fwd_workspace_bytes(const AttentionParams& params);
cudaError_t attention_fwd_cuda(const AttentionParams& params, void* workspace, size_t workspace_bytes,
                               cudaStream_t stream);
// Bytes of scratch attention_bwd_cuda needs in params.workspace for this problem.
size_t attention_bwd_workspace_bytes(const AttentionBwdParams& params);
cudaError_t attention_bwd_cuda(const AttentionBwdParams& params, cudaStream_t stream);

cudaError_t layer_norm_fwd_cuda(const LayerNormParams& params, cudaStream_t stream);
size_t layer_norm_bwd_workspace_bytes(const LayerNormBwdParams& params, int num_sms);
cudaError_t layer_norm_bwd_cuda(const LayerNormBwdParams& params, int num_sms, cudaStream_t stream);

cudaError_t bias_act_fwd_cuda(const BiasActParams& params, cudaStream_t stream);
size_t bias_act_bwd_workspace_bytes(const BiasActBwdParams& params, int num_sms);
cudaError_t bias_act_bwd_cuda(const BiasActBwdParams& params, int num_sms, cudaStream_t stream);

}  // namespace tx_kernels
