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

// Each params type's pair in the table and its op name, for code generic over the ops.
template <typename Params>
struct Entry {
  const char* op;
  size_t (*workspace_bytes)(const Params&, const Device&);
  int (*launch)(const Params&, void* workspace, size_t workspace_bytes, const Device&);
};
// clang-format off
inline Entry<AttentionParams> entry_of(const Api& a, const AttentionParams&) { return {"attention_fwd", a.attention_fwd_workspace_bytes, a.attention_fwd}; }
inline Entry<AttentionBwdParams> entry_of(const Api& a, const AttentionBwdParams&) { return {"attention_bwd", a.attention_bwd_workspace_bytes, a.attention_bwd}; }
inline Entry<LayerNormParams> entry_of(const Api& a, const LayerNormParams&) { return {"layer_norm_fwd", a.layer_norm_fwd_workspace_bytes, a.layer_norm_fwd}; }
inline Entry<LayerNormBwdParams> entry_of(const Api& a, const LayerNormBwdParams&) { return {"layer_norm_bwd", a.layer_norm_bwd_workspace_bytes, a.layer_norm_bwd}; }
inline Entry<BiasActParams> entry_of(const Api& a, const BiasActParams&) { return {"bias_act_fwd", a.bias_act_fwd_workspace_bytes, a.bias_act_fwd}; }
inline Entry<BiasActBwdParams> entry_of(const Api& a, const BiasActBwdParams&) { return {"bias_act_bwd", a.bias_act_bwd_workspace_bytes, a.bias_act_bwd}; }
// clang-format on

}  // namespace tx_kernels::emu

// The library's one exported symbol.
extern "C" const tx_kernels::emu::Api* tx_kernels_emu_api();
