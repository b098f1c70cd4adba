// Temporary until csrc/cpu/attention.cpp lands: raises instead of computing.
#include <c10/util/Exception.h>
#include "kernels.h"
namespace tx_kernels::cpu {
void attention_fwd(const AttentionParams&) { TORCH_CHECK(false, "tx_kernels: CPU attention kernel not built yet"); }
void attention_bwd(const AttentionBwdParams&) { TORCH_CHECK(false, "tx_kernels: CPU attention kernel not built yet"); }
}  // namespace tx_kernels::cpu
