// kernels.h: the CPU kernels. Same params structs and semantics as the CUDA launchers
// (csrc/kernels/launchers.h); parallel over OpenMP through at::parallel_for, vectorized with at::vec.
//
// tx_kernels::cpu::<op> (kernels.cpp) calls one of the per-ISA copies, tx_kernels::cpu::isa_*::<op>
// (isa.h).
#pragma once

#include "../kernels/params.h"

// X(op, params type) for every CPU kernel entry point.
#define TXK_CPU_KERNELS(X)                  \
  X(attention_fwd, AttentionParams)         \
  X(attention_bwd, AttentionBwdParams)      \
  X(layer_norm_fwd, LayerNormParams)        \
  X(layer_norm_bwd, LayerNormBwdParams)     \
  X(bias_act_fwd, BiasActParams)            \
  X(bias_act_bwd, BiasActBwdParams)

#define TXK_DECLARE_CPU_KERNEL(op, Params) void op(const Params& params);

namespace tx_kernels::cpu {
TXK_CPU_KERNELS(TXK_DECLARE_CPU_KERNEL)

namespace isa_default {
TXK_CPU_KERNELS(TXK_DECLARE_CPU_KERNEL)
}
namespace isa_avx512 {
TXK_CPU_KERNELS(TXK_DECLARE_CPU_KERNEL)
}

// The copy the entry points call: "avx512" or "default" (the build's own flags).
const char* kernel_isa();
}  // namespace tx_kernels::cpu
