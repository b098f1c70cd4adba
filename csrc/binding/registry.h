// registry.h: the operator schemas (registry.cpp), defined once and used by both namespaces that
// carry them: tx_kernels (CPU and CUDA kernels) and tx_kernels_emu (the CUDA emulator backend).
#pragma once

#include <torch/library.h>

namespace tx_kernels::binding {

void define_ops(torch::Library& m);

}  // namespace tx_kernels::binding
