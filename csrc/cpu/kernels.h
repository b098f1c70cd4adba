// kernels.h: the CPU kernels. Same params structs and semantics as the CUDA launchers
// (csrc/kernels/launchers.h); parallel over OpenMP through at::parallel_for, vectorized with at::vec.
#pragma once

#include "../kernels/params.h"

namespace tx_kernels::cpu {

void attention_fwd(const AttentionParams& params);
void attention_bwd(const AttentionBwdParams& params);

void layer_norm_fwd(const LayerNormParams& params);
void layer_norm_bwd(const LayerNormBwdParams& params);

void bias_act_fwd(const BiasActParams& params);
void bias_act_bwd(const BiasActBwdParams& params);

}  // namespace tx_kernels::cpu
