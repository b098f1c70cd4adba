"""Fake (meta) kernels and autograd for every tx_kernels operator.

The schemas live in csrc/binding/registry.cpp, the CPU/CUDA kernels in csrc/; this module makes the
operators traceable (torch.compile, FakeTensor) and differentiable. Backward formulas call the
backward operators, so a compiled training graph stays inside tx_kernels kernels.
"""
import torch

from . import _C  # noqa: F401  (its static initializers register the operators)

ops = torch.ops.tx_kernels

__all__ = ["ops", "has_cuda_kernels"]


def has_cuda_kernels() -> bool:
    """True when this build carries the CUDA kernels (a CUDA build of torch and nvcc at build time)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("tx_kernels::attention_fwd", "CUDA")


# ----------------------------------------------------------------------------------------------
# Layout rules shared with csrc/binding/prepare.cpp
# ----------------------------------------------------------------------------------------------
def _effective_strides(t):
    # The binding copies a tensor whose last dim is not contiguous.
    if t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t.stride()
    return torch.empty(t.shape, device="meta").stride()


def _empty_like_layout(like, last, dtype):
    """An output laid out like `like` (see empty_like_layout in prepare.cpp)."""
    n, h, l = like.shape[0], like.shape[1], like.shape[2]
    strides = _effective_strides(like)
    if strides[1] < strides[2]:
        return like.new_empty((n, l, h, last), dtype=dtype).transpose(1, 2)
    return like.new_empty((n, h, l, last), dtype=dtype)


def _check_devices(ref_name, ref, **others):
    """Every tensor argument on `ref`'s device.

    A meta (or other-device) tensor among CPU ones sends the call to the fake kernel instead of
    the backend's, where the binding's device check never runs: without this the call would
    return uninitialised memory.
    """
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"tx_kernels: `{name}` is on {t.device} but `{ref_name}` is on "
                             f"{ref.device}; they must be on one device")


def _refuse_double_backward(op_name):
    """Autograd for a backward op: its own gradient (double backward) is not implemented.

    Registered so that a second backward through a create_graph=True gradient raises instead of
    silently giving 0 or None (what the dispatcher's fallback for ops without autograd does).
    """
    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(f"tx_kernels: double backward through {op_name} is not supported (the "
                           f"gradient of its gradient, e.g. torch.autograd.grad(..., "
                           f"create_graph=True) then backward)")

    torch.library.register_autograd(f"tx_kernels::{op_name}_bwd", backward,
                                    setup_context=setup_context)


def _acc_dtype(t):
    """dtype of statistics and logsumexp for inputs like `t` (acc_type in csrc/binding/checks.h)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rows(t, normalized_ndim):
    rows = 1
    for s in t.shape[: t.dim() - normalized_ndim]:
        rows *= s
    return rows


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------
@torch.library.register_fake("tx_kernels::attention_fwd")
def _attention_fwd_fake(query, key, value, attn_mask, scale, is_causal, dropout_p, rng):
    _check_devices("query", query, key=key, value=value, attn_mask=attn_mask)
    out = _empty_like_layout(query, value.shape[-1], query.dtype)
    lse = query.new_empty(query.shape[:3], dtype=_acc_dtype(query))
    return out, lse


@torch.library.register_fake("tx_kernels::attention_bwd")
def _attention_bwd_fake(grad_out, query, key, value, out, logsumexp, attn_mask, scale, is_causal,
                        dropout_p, rng, compute_mask_grad):
    _check_devices("query", query, grad_out=grad_out, key=key, value=value, out=out,
                   logsumexp=logsumexp, attn_mask=attn_mask)
    dq = _empty_like_layout(query, query.shape[-1], query.dtype)
    dk = _empty_like_layout(key, key.shape[-1], key.dtype)
    dv = _empty_like_layout(value, value.shape[-1], value.dtype)
    if compute_mask_grad:
        dmask = attn_mask.new_empty(attn_mask.shape)
    else:
        dmask = query.new_empty((0,))
    return dq, dk, dv, dmask


def _attention_setup_context(ctx, inputs, output):
    query, key, value, attn_mask, scale, is_causal, dropout_p, rng = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, attn_mask, out, lse, rng)
    ctx.scale, ctx.is_causal, ctx.dropout_p = scale, is_causal, dropout_p
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, grad_out, grad_lse):
    query, key, value, attn_mask, out, lse, rng = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    mask_grad = bool(ctx.needs_input_grad[3]) and attn_mask is not None
    dq, dk, dv, dmask = ops.attention_bwd(grad_out, query, key, value, out, lse, attn_mask,
                                          ctx.scale, ctx.is_causal, ctx.dropout_p, rng, mask_grad)
    return dq, dk, dv, (dmask if mask_grad else None), None, None, None, None


torch.library.register_autograd("tx_kernels::attention_fwd", _attention_backward,
                                setup_context=_attention_setup_context)
_refuse_double_backward("attention")


# ----------------------------------------------------------------------------------------------
# LayerNorm and residual-add + LayerNorm
# ----------------------------------------------------------------------------------------------
@torch.library.register_fake("tx_kernels::layer_norm_fwd")
def _layer_norm_fwd_fake(input, weight, bias, normalized_ndim, eps):
    _check_devices("input", input, weight=weight, bias=bias)
    rows = _rows(input, normalized_ndim)
    stats = input.new_empty((rows,), dtype=_acc_dtype(input))
    return torch.empty_like(input, memory_format=torch.contiguous_format), stats, stats.clone()


@torch.library.register_fake("tx_kernels::add_layer_norm_fwd")
def _add_layer_norm_fwd_fake(input, residual, weight, bias, normalized_ndim, eps, return_residual=True):
    _check_devices("input", input, residual=residual, weight=weight, bias=bias)
    rows = _rows(input, normalized_ndim)
    stats = input.new_empty((rows,), dtype=_acc_dtype(input))
    out = torch.empty_like(input, memory_format=torch.contiguous_format)
    residual_out = torch.empty_like(out) if return_residual else input.new_empty((0,))
    return out, residual_out, stats, stats.clone()


@torch.library.register_fake("tx_kernels::layer_norm_bwd")
def _layer_norm_bwd_fake(grad_out, grad_residual_out, input, mean, rstd, weight, bias,
                         normalized_ndim, residual=None):
    _check_devices("input", input, grad_out=grad_out, grad_residual_out=grad_residual_out, mean=mean,
                   rstd=rstd, weight=weight, bias=bias, residual=residual)
    grad_input = torch.empty_like(input, memory_format=torch.contiguous_format)
    grad_weight = torch.empty_like(weight) if weight is not None else input.new_empty((0,))
    grad_bias = torch.empty_like(bias) if bias is not None else input.new_empty((0,))
    return grad_input, grad_weight, grad_bias


def _layer_norm_setup_context(ctx, inputs, output):
    input, weight, bias, normalized_ndim, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(input, mean, rstd, weight, bias)
    ctx.normalized_ndim = normalized_ndim
    ctx.mark_non_differentiable(mean, rstd)


def _layer_norm_backward(ctx, grad_out, grad_mean, grad_rstd):
    input, mean, rstd, weight, bias = ctx.saved_tensors
    grad_input, grad_weight, grad_bias = ops.layer_norm_bwd(
        grad_out, None, input, mean, rstd, weight, bias, ctx.normalized_ndim)
    return (grad_input, grad_weight if weight is not None else None,
            grad_bias if bias is not None else None, None, None)


torch.library.register_autograd("tx_kernels::layer_norm_fwd", _layer_norm_backward,
                                setup_context=_layer_norm_setup_context)


def _add_layer_norm_setup_context(ctx, inputs, output):
    input, residual, weight, bias, normalized_ndim, eps, return_residual = inputs
    _, residual_out, mean, rstd = output
    # The backward needs the normalized sum: the returned residual_out, or, when it was not
    # written (post-LN), the two inputs, which the backward kernel sums as it reads them.
    ctx.return_residual = return_residual
    if return_residual:
        ctx.save_for_backward(residual_out, None, mean, rstd, weight, bias)
    else:
        ctx.save_for_backward(input, residual, mean, rstd, weight, bias)
    ctx.normalized_ndim = normalized_ndim
    ctx.mark_non_differentiable(mean, rstd)
    # An unused residual_out must reach the backward as None, not as a zeros tensor to read.
    ctx.set_materialize_grads(False)


def _add_layer_norm_backward(ctx, grad_out, grad_residual_out, grad_mean, grad_rstd):
    first, residual, mean, rstd, weight, bias = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(first)
    if not ctx.return_residual:
        grad_residual_out = None  # the sum was never an output
    # With return_residual=False the kernel normalizes first + residual, summed as it reads them.
    grad_sum, grad_weight, grad_bias = ops.layer_norm_bwd(
        grad_out, grad_residual_out, first, mean, rstd, weight, bias, ctx.normalized_ndim, residual)
    return (grad_sum, grad_sum, grad_weight if weight is not None else None,
            grad_bias if bias is not None else None, None, None, None)


torch.library.register_autograd("tx_kernels::add_layer_norm_fwd", _add_layer_norm_backward,
                                setup_context=_add_layer_norm_setup_context)
_refuse_double_backward("layer_norm")


# ----------------------------------------------------------------------------------------------
# Bias + activation (+ dropout)
# ----------------------------------------------------------------------------------------------
@torch.library.register_fake("tx_kernels::bias_act_fwd")
def _bias_act_fwd_fake(input, bias, activation, dropout_p, rng):
    _check_devices("input", input, bias=bias)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake("tx_kernels::bias_act_bwd")
def _bias_act_bwd_fake(grad_out, input, bias, activation, dropout_p, rng):
    _check_devices("input", input, grad_out=grad_out, bias=bias)
    grad_input = torch.empty_like(input, memory_format=torch.contiguous_format)
    grad_bias = torch.empty_like(bias) if bias is not None else input.new_empty((0,))
    return grad_input, grad_bias


def _bias_act_setup_context(ctx, inputs, output):
    input, bias, activation, dropout_p, rng = inputs
    ctx.save_for_backward(input, bias, rng)
    ctx.activation, ctx.dropout_p = activation, dropout_p


def _bias_act_backward(ctx, grad_out):
    input, bias, rng = ctx.saved_tensors
    grad_input, grad_bias = ops.bias_act_bwd(grad_out, input, bias, ctx.activation, ctx.dropout_p, rng)
    return grad_input, (grad_bias if bias is not None else None), None, None, None


torch.library.register_autograd("tx_kernels::bias_act_fwd", _bias_act_backward,
                                setup_context=_bias_act_setup_context)
_refuse_double_backward("bias_act")


# ----------------------------------------------------------------------------------------------
# Variable-length attention (packed batches; tx_kernels/varlen.py is the public API)
# ----------------------------------------------------------------------------------------------
@torch.library.register_fake("tx_kernels::attention_varlen_fwd")
def _attention_varlen_fwd_fake(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, scale, is_causal, dropout_p, rng):
    _check_devices("query", query, key=key, value=value, cu_seqlens_q=cu_seqlens_q,
                   cu_seqlens_k=cu_seqlens_k)
    total_q, heads = query.shape[0], query.shape[1]
    out = query.new_empty((total_q, heads, value.shape[-1]))
    lse = query.new_empty((heads, total_q), dtype=_acc_dtype(query))
    return out, lse


@torch.library.register_fake("tx_kernels::attention_varlen_bwd")
def _attention_varlen_bwd_fake(grad_out, query, key, value, out, logsumexp, cu_seqlens_q,
                               cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, is_causal,
                               dropout_p, rng):
    _check_devices("query", query, grad_out=grad_out, key=key, value=value, out=out,
                   logsumexp=logsumexp, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    return (torch.empty_like(query, memory_format=torch.contiguous_format),
            torch.empty_like(key, memory_format=torch.contiguous_format),
            torch.empty_like(value, memory_format=torch.contiguous_format))


def _attention_varlen_setup_context(ctx, inputs, output):
    (query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, is_causal,
     dropout_p, rng) = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse, cu_seqlens_q, cu_seqlens_k, rng)
    ctx.max_seqlen_q, ctx.max_seqlen_k = max_seqlen_q, max_seqlen_k
    ctx.scale, ctx.is_causal, ctx.dropout_p = scale, is_causal, dropout_p
    ctx.mark_non_differentiable(lse)


def _attention_varlen_backward(ctx, grad_out, grad_lse):
    query, key, value, out, lse, cu_q, cu_k, rng = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = ops.attention_varlen_bwd(grad_out, query, key, value, out, lse, cu_q, cu_k,
                                          ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.scale,
                                          ctx.is_causal, ctx.dropout_p, rng)
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd("tx_kernels::attention_varlen_fwd", _attention_varlen_backward,
                                setup_context=_attention_varlen_setup_context)
_refuse_double_backward("attention_varlen")
