"""The public functional API, shaped like torch.nn.functional.

Every function is differentiable with respect to each tensor argument and runs the tx_kernels
operator for the tensors' device (CPU always; CUDA in CUDA builds).
"""
import math
from numbers import Integral
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import _activations
from ._checks import (autocast_inputs, check_bool, check_dropout_p, check_number, new_rng,
                      require_tensor)
from .ops import ops

__all__ = [
    "scaled_dot_product_attention",
    "layer_norm",
    "add_layer_norm",
    "bias_gelu",
    "bias_relu",
    "bias_act",
    "feed_forward",
]

def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Fused attention with the semantics of torch.nn.functional.scaled_dot_product_attention.

    query (N, H, L, E) or (N, L, E); key (N, Hkv, S, E); value (N, Hkv, S, Ev). Any strides work,
    e.g. a (N, L, H, E) tensor viewed with .transpose(1, 2), without a copy.
    attn_mask: bool (True = attend) or floating (added to the scores), broadcastable to
    (N, H, L, S); it is read in place, never expanded. A floating mask may have any floating
    dtype, whatever the inputs' (e.g. an fp16 mask with fp32 inputs): its values are widened to
    the accumulation type (fp32; fp64 for fp64 inputs) and added without rounding to the inputs'
    dtype. A mask value of -inf masks the key exactly as False does in a bool mask (the score is
    replaced, so a NaN score at a masked key does not reach the row).
    is_causal lets query i attend to keys 0..i
    (top-left aligned, as in torch); unlike torch it may be combined with attn_mask.
    enable_gqa: allow H to be a multiple of Hkv (grouped-query attention).
    Differences from torch: a query row that no key may attend to (decided by the mask and
    is_causal alone) gives 0 (torch gives NaN), and its gradients are 0. NaN or Inf anywhere else
    in the inputs, the mask or `scale` propagates as in torch. Double backward is not supported.
    Jagged nested tensors (layout=torch.jagged, (N, H, j, E) as torch's SDPA takes them) run
    attention_varlen on their packed values, with no mask and GQA implied by the head counts.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        require_tensor(t, name)
    if attn_mask is not None:
        require_tensor(attn_mask, "attn_mask")
    if query.is_nested or key.is_nested or value.is_nested:
        # Jagged nested tensors, as torch's SDPA takes them: each sequence attends within itself.
        if attn_mask is not None:
            raise ValueError("tx_kernels: `attn_mask` cannot be combined with nested tensors (neither in torch)")
        from .varlen import jagged_attention

        check_dropout_p(dropout_p)
        return jagged_attention(query, key, value, dropout_p, is_causal, scale)
    if query.dim() not in (3, 4):
        raise ValueError(f"tx_kernels: `query` must have 3 (N, L, E) or 4 (N, H, L, E) dimensions, "
                         f"got shape {tuple(query.shape)}")
    for name, t in (("key", key), ("value", value)):
        if t.dim() != query.dim():
            raise ValueError(f"tx_kernels: `{name}` has {t.dim()} dimensions but `query` has "
                             f"{query.dim()}; shapes {tuple(t.shape)} and {tuple(query.shape)}")
    check_dropout_p(dropout_p)
    check_bool(is_causal, "is_causal")
    check_bool(enable_gqa, "enable_gqa")
    check_number(scale, "scale", allow_none=True)
    squeeze = query.dim() == 3
    if squeeze:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(f"tx_kernels: `query` has {query.shape[1]} heads but `key` has "
                         f"{key.shape[1]}; pass enable_gqa=True for grouped-query attention")
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1]) if query.shape[-1] > 0 else 1.0
    query, key, value = autocast_inputs(query, key, value)
    rng = new_rng() if dropout_p > 0.0 else None
    out, _ = ops.attention_fwd(query, key, value, attn_mask, float(scale), bool(is_causal),
                               float(dropout_p), rng)
    return out.squeeze(1) if squeeze else out


def _normalized_ndim(input, normalized_shape):
    if isinstance(normalized_shape, torch.Size):
        normalized_shape = tuple(normalized_shape)
    if isinstance(normalized_shape, Integral) and not isinstance(normalized_shape, bool):
        normalized_shape = (int(normalized_shape),)
    if not isinstance(normalized_shape, (tuple, list)) or not all(
            isinstance(s, Integral) and not isinstance(s, bool) for s in normalized_shape):
        raise TypeError(f"tx_kernels: `normalized_shape` must be an int or a sequence of ints, got "
                        f"{normalized_shape!r}")
    normalized_shape = tuple(int(s) for s in normalized_shape)
    n = len(normalized_shape)
    if n == 0 or input.dim() < n or tuple(input.shape[input.dim() - n:]) != normalized_shape:
        raise ValueError(f"tx_kernels: `normalized_shape` {normalized_shape} must match the last "
                         f"dimensions of `input`, which has shape {tuple(input.shape)}")
    return n


def layer_norm(
    input: torch.Tensor,
    normalized_shape: Union[int, Sequence[int]],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """As torch.nn.functional.layer_norm (statistics in fp32 for fp16/bf16 inputs)."""
    require_tensor(input, "input")
    n = _normalized_ndim(input, normalized_shape)
    check_number(eps, "eps")
    return ops.layer_norm_fwd(input, weight, bias, n, float(eps))[0]


def add_layer_norm(
    input: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: Union[int, Sequence[int]],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    *,
    return_residual: bool = True,
):
    """residual_out = input + residual; returns (layer_norm(residual_out), residual_out).

    One pass over memory. Pre-LN blocks carry residual_out as the new residual stream. Post-LN
    blocks need only the first output: with return_residual=False the sum is not returned and not
    materialized (no residual_out is stored: a quarter less memory traffic), and only
    layer_norm(input + residual) is returned, the fused form of F.layer_norm(input + residual, ...).
    """
    require_tensor(input, "input")
    require_tensor(residual, "residual")
    n = _normalized_ndim(input, normalized_shape)
    check_number(eps, "eps")
    check_bool(return_residual, "return_residual")
    if input.dtype != residual.dtype and input.is_floating_point() and residual.is_floating_point():
        # As `input + residual` would: both in the promoted dtype (e.g. a bf16 branch output added
        # to an fp32 residual stream under autocast).
        dtype = torch.promote_types(input.dtype, residual.dtype)
        input, residual = input.to(dtype), residual.to(dtype)
    out, residual_out, _, _ = ops.add_layer_norm_fwd(input, residual, weight, bias, n, float(eps),
                                                     bool(return_residual))
    return (out, residual_out) if return_residual else out


def bias_act(input: torch.Tensor, bias: Optional[torch.Tensor], activation: str = "relu",
             dropout_p: float = 0.0) -> torch.Tensor:
    """dropout(activation(input + bias)) in one pass; activation in 'relu', 'gelu', 'gelu_tanh'."""
    require_tensor(input, "input")
    if bias is not None:
        require_tensor(bias, "bias")
    activation = _activations.kernel_name(activation)
    check_dropout_p(dropout_p)
    rng = new_rng() if dropout_p > 0.0 else None
    return ops.bias_act_fwd(input, bias, activation, float(dropout_p), rng)


def bias_gelu(input: torch.Tensor, bias: Optional[torch.Tensor], approximate: str = "none") -> torch.Tensor:
    """gelu(input + bias), approximate 'none' (erf) or 'tanh', as in torch.nn.functional.gelu."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"tx_kernels: `approximate` must be 'none' or 'tanh', got {approximate!r}")
    return bias_act(input, bias, "gelu" if approximate == "none" else "gelu_tanh")


def bias_relu(input: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """relu(input + bias)."""
    return bias_act(input, bias, "relu")


def feed_forward(
    input: torch.Tensor,
    weight1: torch.Tensor,
    bias1: Optional[torch.Tensor],
    weight2: torch.Tensor,
    bias2: Optional[torch.Tensor],
    activation: str = "relu",
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """linear2(dropout(activation(linear1(input)))), weights laid out as for F.linear.

    The GEMMs run through ATen; bias1, the activation and the dropout are one fused kernel.
    """
    for name, t in (("input", input), ("weight1", weight1), ("weight2", weight2)):
        require_tensor(t, name)
    if input.dim() < 1:
        raise ValueError("tx_kernels: `input` must have at least 1 dimension (features last), "
                         "got a 0-dimensional tensor")
    if weight1.dim() != 2 or weight2.dim() != 2:
        raise ValueError(f"tx_kernels: `weight1` and `weight2` must be 2-D, got shapes "
                         f"{tuple(weight1.shape)} and {tuple(weight2.shape)}")
    if input.shape[-1] != weight1.shape[1]:
        raise ValueError(f"tx_kernels: `input` has {input.shape[-1]} features but `weight1` has shape "
                         f"{tuple(weight1.shape)} (expects {weight1.shape[1]})")
    if weight2.shape[1] != weight1.shape[0]:
        raise ValueError(f"tx_kernels: `weight2` has shape {tuple(weight2.shape)} but `weight1` "
                         f"produces {weight1.shape[0]} features")
    hidden = F.linear(input, weight1)
    hidden = bias_act(hidden, bias1, activation, dropout_p)
    return F.linear(hidden, weight2, bias2)


# Variable-length (packed) attention and its pack/unpack helpers (FlashAttention's varlen API).
from .varlen import PackedBatch, attention_varlen, cu_seqlens_from_lengths, pad_input, unpad_input  # noqa: E402

__all__ += ["attention_varlen", "cu_seqlens_from_lengths", "pad_input", "unpad_input", "PackedBatch"]
