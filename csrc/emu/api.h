// api.h: what the emulated CUDA library (libtx_kernels_emu.so: csrc/kernels/*.cu built for the
// harness) offers the torch binding (csrc/binding/emu_ops.cpp), which loads it at run time.
// Plain C++ over params.h: the launchers.h entry points, each run inside a call scope that knows
// the emulated device and which buffers the params make reachable. Errors are cudaError_t values
// as ints; error_string gives the launch's findings.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../kernels/params.h"

namespace tx_kernels::emu {

struct Device {
  const char* name;
  int num_sms;
  int64_t max_smem_per_block_optin;
};

// Per op, the launchers.h pair: workspace bytes for the emulated device, and the launch.
struct Api {
  int version;  // kApiVersion of the library
  size_t (*attention_fwd_workspace_bytes)(const AttentionParams&, const Device&);
  int (*attention_fwd)(const AttentionParams&, void* workspace, size_t workspace_bytes, const Device&);
  size_t (*attention_bwd_workspace_bytes)(const AttentionBwdParams&, const Device&);
  int (*attention_bwd)(const AttentionBwdParams&, void* workspace, size_t workspace_bytes, const Device&);
  size_t (*layer_norm_fwd_workspace_bytes)(const LayerNormParams&, const Device&);
  int (*layer_norm_fwd)(const LayerNormParams&, void* workspace, size_t workspace_bytes, const Device&);
  size_t (*layer_norm_bwd_workspace_bytes)(const LayerNormBwdParams&, const Device&);
  int (*layer_norm_bwd)(const LayerNormBwdParams&, void* workspace, size_t workspace_bytes, const Device&);
  size_t (*bias_act_fwd_workspace_bytes)(const BiasActParams&, const Device&);
  int (*bias_act_fwd)(const BiasActParams&, void* workspace, size_t workspace_bytes, const Device&);
  size_t (*bias_act_bwd_workspace_bytes)(const BiasActBwdParams&, const Device&);
  int (*bias_act_bwd)(const BiasActBwdParams&, void* workspace, size_t workspace_bytes, const Device&);
  const char* (*error_string)(int error);
};

constexpr int kApiVersion = 2;

}  // namespace tx_kernels::emu

// The library's one exported symbol.
extern "C" const tx_kernels::emu::Api* tx_kernels_emu_api();
