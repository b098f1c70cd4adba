// registry.cpp: every tx_kernels operator schema, in one place. Backend kernels are registered in
// cpu_ops.cpp, cuda_ops.cpp and emu_ops.cpp (the CUDA emulator's tx_kernels_emu namespace defines
// the same schemas); fake (meta) kernels and autograd in tx_kernels/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "../cpu/kernels.h"
#include "registry.h"

namespace {

PyObject* cpu_kernel_isa(PyObject*, PyObject*) { return PyUnicode_FromString(tx_kernels::cpu::kernel_isa()); }

PyMethodDef module_methods[] = {
    {"cpu_kernel_isa", cpu_kernel_isa, METH_NOARGS,
     "Which copy of the CPU kernels runs: 'avx512' or 'default' (csrc/cpu/isa.h)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// Loading the module runs the static registrations below; its one function reports the CPU ISA.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, module_methods};
  return PyModule_Create(&module_def);
}

namespace tx_kernels::binding {

void define_ops(torch::Library& m) {
  // Attention. rng is an int64 CPU tensor [seed, offset] (required when dropout_p > 0).
  // Returns (out, logsumexp); logsumexp is (N, H, L), fp32 (fp64 for fp64 inputs).
  m.def(
      "attention_fwd(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float scale, "
      "bool is_causal, float dropout_p, Tensor? rng) -> (Tensor, Tensor)");
  // Returns (grad_query, grad_key, grad_value, grad_attn_mask); the last is empty unless
  // compute_mask_grad, then it has the mask's shape and dtype.
  m.def(
      "attention_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
      "Tensor logsumexp, Tensor? attn_mask, float scale, bool is_causal, float dropout_p, "
      "Tensor? rng, bool compute_mask_grad) -> (Tensor, Tensor, Tensor, Tensor)");

  // Variable-length attention on a packed batch, as flash_attn_varlen_func: query (total_q, H, E),
  // key (total_k, Hkv, E), value (total_k, Hkv, Ev); cu_seqlens_q/k are int32 CPU offsets
  // (batch + 1, from 0 to total_q / total_k), max_seqlen_q/k at least every sequence's length.
  // Returns (out (total_q, H, Ev), logsumexp fp32 (H, total_q)).
  m.def(
      "attention_varlen_fwd(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, bool is_causal, "
      "float dropout_p, Tensor? rng) -> (Tensor, Tensor)");
  // Returns (grad_query, grad_key, grad_value), contiguous.
  m.def(
      "attention_varlen_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
      "Tensor logsumexp, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, float scale, bool is_causal, float dropout_p, Tensor? rng) "
      "-> (Tensor, Tensor, Tensor)");

  // LayerNorm over the trailing normalized_ndim dims. Returns (out, mean, rstd); mean and rstd
  // have one entry per normalized row, fp32 (fp64 for fp64 inputs).
  m.def(
      "layer_norm_fwd(Tensor input, Tensor? weight, Tensor? bias, int normalized_ndim, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  // residual_out = input + residual; out = layer_norm(residual_out).
  // Returns (out, residual_out, mean, rstd). return_residual=False skips writing residual_out
  // (post-LN blocks discard it): it comes back empty, and the backward recomputes the sum.
  m.def(
      "add_layer_norm_fwd(Tensor input, Tensor residual, Tensor? weight, Tensor? bias, "
      "int normalized_ndim, float eps, bool return_residual=True) -> (Tensor, Tensor, Tensor, Tensor)");
  // Backward of both: `input` (+ `residual`, when given) is the tensor that was normalized.
  // grad_residual_out (the gradient flowing into residual_out) is added to the result. Returns (grad_input, grad_weight,
  // grad_bias); a gradient whose parameter is None comes back empty.
  m.def(
      "layer_norm_bwd(Tensor grad_out, Tensor? grad_residual_out, Tensor input, Tensor mean, "
      "Tensor rstd, Tensor? weight, Tensor? bias, int normalized_ndim, Tensor? residual=None) "
      "-> (Tensor, Tensor, Tensor)");

  // out = dropout(activation(input + bias)); activation is "relu", "gelu" or "gelu_tanh".
  m.def(
      "bias_act_fwd(Tensor input, Tensor? bias, str activation, float dropout_p, Tensor? rng) "
      "-> Tensor");
  // Returns (grad_input, grad_bias); grad_bias is empty when bias is None.
  m.def(
      "bias_act_bwd(Tensor grad_out, Tensor input, Tensor? bias, str activation, float dropout_p, "
      "Tensor? rng) -> (Tensor, Tensor)");
}

}  // namespace tx_kernels::binding

TORCH_LIBRARY(tx_kernels, m) { tx_kernels::binding::define_ops(m); }
