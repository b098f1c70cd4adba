// Temporary until csrc/cpu/bias_act.cpp lands: raises instead of computing.
#include <c10/util/Exception.h>
#include "kernels.h"
namespace tx_kernels::cpu {
void bias_act_fwd(const BiasActParams&) { TORCH_CHECK(false, "tx_kernels: CPU bias_act kernel not built yet"); }
void bias_act_bwd(const BiasActBwdParams&) { TORCH_CHECK(false, "tx_kernels: CPU bias_act kernel not built yet"); }
}  // namespace tx_kernels::cpu
