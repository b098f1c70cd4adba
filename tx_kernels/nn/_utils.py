"""Helpers shared by the tx_kernels.nn modules: mask canonicalization (activations: ../_activations.py).

torch.nn and SDPA disagree on boolean masks: in torch.nn (MultiheadAttention, Transformer*)
True means "may NOT attend"; in scaled_dot_product_attention (and tx_kernels) True means "may
attend". Everything here converts from the torch.nn convention to the SDPA one.
"""
from typing import Optional

import torch

def _check_mask_dtype(mask, name):
    if mask is not None and mask.dtype != torch.bool and not torch.is_floating_point(mask):
        raise TypeError(f"tx_kernels: `{name}` must be a bool or floating-point tensor, got {mask.dtype}")


def merge_masks(attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                N: int, H: int, L: int, S: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """One SDPA-convention mask (bool True = attend, or additive float) broadcastable to (N, H, L, S).

    attn_mask: torch.nn convention, (L, S) or (N * H, L, S). key_padding_mask: (N, S).
    Broadcast dimensions stay size-1 views: a 2-D attn_mask alone gives (1, 1, L, S), a padding
    mask alone (N, 1, 1, S), both together (N, 1, L, S); (N, H, L, S) only when attn_mask is 3-D.
    """
    _check_mask_dtype(attn_mask, "attn_mask")
    _check_mask_dtype(key_padding_mask, "key_padding_mask")
    masks = []
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if tuple(attn_mask.shape) != (L, S):
                raise RuntimeError(f"tx_kernels: the shape of the 2D `attn_mask` is {tuple(attn_mask.shape)}, "
                                   f"but should be {(L, S)}")
            masks.append(attn_mask.view(1, 1, L, S))
        elif attn_mask.dim() == 3:
            if tuple(attn_mask.shape) != (N * H, L, S):
                raise RuntimeError(f"tx_kernels: the shape of the 3D `attn_mask` is {tuple(attn_mask.shape)}, "
                                   f"but should be {(N * H, L, S)}")
            masks.append(attn_mask.view(N, H, L, S))
        else:
            raise RuntimeError(f"tx_kernels: `attn_mask` must be 2-D or 3-D, got {attn_mask.dim()} dimensions")
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (N, S):
            raise RuntimeError(f"tx_kernels: expected `key_padding_mask` of shape {(N, S)}, got "
                               f"{tuple(key_padding_mask.shape)}")
        masks.append(key_padding_mask.view(N, 1, 1, S))
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        blocked = masks[0] if len(masks) == 1 else masks[0] | masks[1]
        return ~blocked
    total = None
    for m in masks:
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf"))
        else:
            m = m.to(dtype)
        total = m if total is None else total + m
    return total


def causal_mask_bool(L: int, S: int, device) -> torch.Tensor:
    """SDPA-convention (True = attend) top-left aligned causal mask of shape (L, S)."""
    return torch.ones(L, S, dtype=torch.bool, device=device).tril()


def detect_is_causal_mask(mask: Optional[torch.Tensor], is_causal: Optional[bool], size: int) -> bool:
    """As torch.nn.modules.transformer._detect_is_causal_mask (bool or float torch.nn masks)."""
    if is_causal is not None:
        return bool(is_causal)
    if mask is None or mask.dim() != 2 or tuple(mask.shape) != (size, size):
        return False
    upper = torch.ones(size, size, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, upper))
    expected = torch.zeros(size, size, dtype=mask.dtype, device=mask.device).masked_fill_(upper, float("-inf"))
    return bool((mask == expected).all())
