// params.h: the torch-free interface between the bindings and every kernel, CPU or CUDA.
//
// A binding checks its tensors, allocates outputs, fills one of these structs and calls a launcher;
// kernels never see a tensor. Pointers are untyped and tagged with a DType; all sizes and strides
// are 64-bit and counted in elements. Plain C++ only, so the CPU build and plain nvcc both include it.
#pragma once

#include <cstdint>

#include "philox.h"

namespace tx_kernels {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3, kBool = 4 };

// What a CUDA launcher may know of the device it launches on, filled by the binding (kernels
// never query the device themselves): the SM count sizes persistent grids and the split-KV
// decision; the opt-in limit (cudaDevAttrMaxSharedMemoryPerBlockOptin) decides which tile
// configurations fit. Zero means unknown: launchers then assume the smallest sm_80+ values.
struct DeviceInfo {
  int num_sms = 0;
  int64_t max_smem_per_block = 0;
};

// ---------------------------------------------------------------------------------------------
// Attention: out = softmax(scale * q k^T + mask) v, per (batch n, head h).
//   q   (N, H,   L, E)    k (N, Hkv, S, E)    v (N, Hkv, S, Ev)    out (N, H, L, Ev)
//   lse (N, H, L) contiguous, fp32 (fp64 for fp64 inputs: an fp32 lse would limit fp64 gradients
//       to fp32 accuracy): the natural log of the softmax denominator of each row, including the
//       scale and the mask; -inf for a row with no allowed key.
// GQA: head h reads key/value head h / (H / Hkv). The last dimension of q, k, v, out, grad_out and
// their gradients has stride 1 (bindings copy otherwise); every other stride is free.
// Masks are read through four strides (0 on a broadcast dimension): kBool means true = attend;
// any floating DType is added to the scaled scores (-inf masks the key). is_causal lets query i see
// keys 0..i (top-left aligned, as torch does). A row with no allowed key (decided by the mask and
// is_causal alone, never by the scores) yields out = 0, lse = -inf, zero gradients; NaN or Inf in
// the scores of any other row propagates to its outputs as in torch's composite.
// ---------------------------------------------------------------------------------------------
enum class MaskKind : int32_t { kNone = 0, kBool = 1, kAdditive = 2 };

struct AttentionParams {
  DType dtype = DType::kFloat32;  // of q, k, v, out (and grad_out, dq, dk, dv in the backward)

  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  void* lse = nullptr;  // fp32, or fp64 when dtype is kFloat64

  int64_t batch = 0, heads = 0, kv_heads = 0;
  int64_t q_len = 0, kv_len = 0, head_dim = 0, v_head_dim = 0;

  // strides of dims (batch, head, row); the last dim is contiguous
  int64_t q_stride[3] = {0, 0, 0};
  int64_t k_stride[3] = {0, 0, 0};
  int64_t v_stride[3] = {0, 0, 0};
  int64_t out_stride[3] = {0, 0, 0};

  MaskKind mask_kind = MaskKind::kNone;
  DType mask_dtype = DType::kBool;
  const void* mask = nullptr;
  int64_t mask_stride[4] = {0, 0, 0, 0};  // (batch, head, query, key), 0 where broadcast

  double scale = 1.0;  // double so fp64 inputs keep full precision; CUDA kernels narrow it
  bool is_causal = false;

  double dropout_p = 0.0;  // probability of dropping an attention probability
  DropoutRng rng;          // element index ((n * H + h) * L + i) * S + j

  // Packed variable-length batch (flash_attn_varlen_func's layout), when cu_seqlens_q is set:
  // sequence n is rows cu_seqlens_q[n] .. cu_seqlens_q[n + 1] of q and out and rows
  // cu_seqlens_k[n] .. cu_seqlens_k[n + 1] of k and v (int32 offsets, batch + 1 of each; the
  // batch strides are 0); lse is (H, total_q) with total_q = cu_seqlens_q[batch]. q_len and
  // kv_len then hold the maximum lengths: they size the blocks and keep the dropout element index
  // above, so a packed batch drops exactly what the padded op drops on the same batch padded to
  // those lengths. No mask; is_causal is top-left aligned within each sequence.
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
};

struct AttentionBwdParams : AttentionParams {
  const void* grad_out = nullptr;  // (N, H, L, Ev)
  int64_t grad_out_stride[3] = {0, 0, 0};

  void* dq = nullptr;  // (N, H, L, E)
  void* dk = nullptr;  // (N, Hkv, S, E): summed over the H / Hkv query heads of a group
  void* dv = nullptr;  // (N, Hkv, S, Ev)
  int64_t dq_stride[3] = {0, 0, 0};
  int64_t dk_stride[3] = {0, 0, 0};
  int64_t dv_stride[3] = {0, 0, 0};

  // Gradient of an additive mask, written as the full (N, H, L, S) tensor dS (contiguous; fp32,
  // fp64 for fp64 inputs); the binding reduces it to the mask's broadcast shape. nullptr when not
  // requested.
  void* dmask = nullptr;

  bool deterministic = false;  // CUDA: dQ without atomics, bitwise reproducible
};

// ---------------------------------------------------------------------------------------------
// LayerNorm over the last dimension of a (rows, cols) view, optionally of the sum input + residual:
//   s = input (+ residual);  out = (s - mean) * rstd * weight + bias;  residual_out = s
// s is rounded to the data type before it is normalized, as input + residual would be.
// mean and rstd (rows), weight and bias (cols; nullptr: treated as 1 and 0) have the statistics
// type: fp64 when dtype is kFloat64 (the CPU kernels only: the CUDA binding rejects fp64 here), fp32
// otherwise. A variance that overflows gives rstd = NaN (as torch), never a finite output.
// Input and residual rows may be strided; out and residual_out are contiguous.
// ---------------------------------------------------------------------------------------------
struct LayerNormParams {
  DType dtype = DType::kFloat32;  // of input, residual, out, residual_out, grad_out, grad_input
  int64_t rows = 0, cols = 0;
  double eps = 1e-5;  // narrowed to fp32 by the fp32-statistics kernels

  const void* input = nullptr;
  int64_t input_row_stride = 0;
  const void* residual = nullptr;  // nullptr: plain LayerNorm
  int64_t residual_row_stride = 0;
  const void* weight = nullptr;  // statistics type
  const void* bias = nullptr;    // statistics type

  void* out = nullptr;
  void* residual_out = nullptr;  // the sum s, written when residual and residual_out are set;
                                 // nullptr: not wanted (the backward then takes the residual)
  void* mean = nullptr;  // statistics type
  void* rstd = nullptr;  // statistics type
};

// Backward of the above. `input` is the tensor that was normalized (residual_out in the fused op).
//   grad_input = d(loss)/ds, including grad_residual_out when given; both input and residual of
//   the fused op receive exactly this gradient.
struct LayerNormBwdParams {
  DType dtype = DType::kFloat32;
  int64_t rows = 0, cols = 0;

  const void* grad_out = nullptr;           // contiguous (rows, cols)
  const void* grad_residual_out = nullptr;  // contiguous (rows, cols) or nullptr
  const void* input = nullptr;              // contiguous (rows, cols)
  // When set, the normalized tensor is input + residual (contiguous (rows, cols)), summed while
  // reading (and rounded to the data type, as the forward did): the form whose forward did not
  // write the sum (residual_out == nullptr).
  const void* residual = nullptr;
  // mean, rstd, weight and the parameter gradients have the statistics type (see above).
  const void* mean = nullptr;
  const void* rstd = nullptr;
  const void* weight = nullptr;  // (cols) or nullptr

  void* grad_input = nullptr;    // contiguous (rows, cols)
  void* grad_weight = nullptr;   // (cols) or nullptr when not wanted
  void* grad_bias = nullptr;     // (cols) or nullptr when not wanted
};

// ---------------------------------------------------------------------------------------------
// Bias + activation (+ dropout) on a (rows, cols) view:  out = dropout(act(input + bias))
// bias and grad_bias are fp64 when dtype is kFloat64 (CPU only), fp32 otherwise.
// ---------------------------------------------------------------------------------------------
enum class Activation : int32_t { kRelu = 0, kGelu = 1, kGeluTanh = 2 };

struct BiasActParams {
  DType dtype = DType::kFloat32;  // of input, out, grad_out, grad_input
  Activation activation = Activation::kRelu;
  int64_t rows = 0, cols = 0;

  const void* input = nullptr;
  int64_t input_row_stride = 0;
  const void* bias = nullptr;  // (cols) or nullptr
  void* out = nullptr;         // contiguous (rows, cols)

  double dropout_p = 0.0;  // element index row * cols + col
  DropoutRng rng;
};

struct BiasActBwdParams : BiasActParams {
  const void* grad_out = nullptr;  // contiguous (rows, cols)
  void* grad_input = nullptr;      // contiguous (rows, cols): also the gradient of the bias' rows
  void* grad_bias = nullptr;       // (cols) or nullptr when not wanted
};

}  // namespace tx_kernels
