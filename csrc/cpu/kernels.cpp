// kernels.cpp: the CPU kernel entry points, each calling the AVX-512 copy of the kernel when the
// build has one and torch runs AVX-512 itself, else the default copy (isa.h).
#include "kernels.h"

#include <ATen/Version.h>

namespace tx_kernels::cpu {
namespace {

#if defined(TXK_WITH_AVX512_KERNELS)
bool use_avx512() {
  static const bool torch_runs_avx512 = at::get_cpu_capability() == "AVX512";
  return torch_runs_avx512;
}
#define TXK_DISPATCH_CPU_KERNEL(op, Params)          \
  void op(const Params& params) {                    \
    if (use_avx512()) return isa_avx512::op(params); \
    return isa_default::op(params);                  \
  }
#else
bool use_avx512() { return false; }
#define TXK_DISPATCH_CPU_KERNEL(op, Params) \
  void op(const Params& params) { return isa_default::op(params); }
#endif

}  // namespace

const char* kernel_isa() { return use_avx512() ? "avx512" : "default"; }

TXK_CPU_KERNELS(TXK_DISPATCH_CPU_KERNEL)
#undef TXK_DISPATCH_CPU_KERNEL

}  // namespace tx_kernels::cpu
