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

struct Api {
  int version;  // kApiVersion of the library
  size_t (*attention_fwd_workspace_bytes)(const AttentionParams&);
  int (*attention_fwd)(const AttentionParams&, void* workspace, size_t workspace_bytes, const Device&);
  size_t (*attention_bwd_workspace_bytes)(const AttentionBwdParams&);
  int (*attention_bwd)(const AttentionBwdParams&, size_t workspace_bytes, const Device&);
  int (*layer_norm_fwd)(const LayerNormParams&, const Device&);
  size_t (*layer_norm_bwd_workspace_bytes)(const LayerNormBwdParams&, int num_sms);
  int (*layer_norm_bwd)(const LayerNormBwdParams&, size_t workspace_bytes, const Device&);
  int (*bias_act_fwd)(const BiasActParams&, const Device&);
  size_t (*bias_act_bwd_workspace_bytes)(const BiasActBwdParams&, int num_sms);
  int (*bias_act_bwd)(const BiasActBwdParams&, size_t workspace_bytes, const Device&);
  const char* (*error_string)(int error);
};

constexpr int kApiVersion = 1;

}  // namespace tx_kernels::emu

// The library's one exported symbol.
extern "C" const tx_kernels::emu::Api* tx_kernels_emu_api();
