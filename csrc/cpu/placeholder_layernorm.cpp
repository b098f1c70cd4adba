// Temporary until csrc/cpu/layernorm.cpp lands: raises instead of computing.
#include <c10/util/Exception.h>
#include "kernels.h"
namespace tx_kernels::cpu {
void layer_norm_fwd(const LayerNormParams&) { TORCH_CHECK(false, "tx_kernels: CPU layernorm kernel not built yet"); }
void layer_norm_bwd(const LayerNormBwdParams&) { TORCH_CHECK(false, "tx_kernels: CPU layernorm kernel not built yet"); }
}  // namespace tx_kernels::cpu
