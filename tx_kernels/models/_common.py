"""Pieces shared by the tx_kernels models."""
from typing import Optional

import torch


def padding_mask_to_sdpa(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """HF-style (N, S) mask (1 = token, 0 = padding) -> bool (N, 1, 1, S), True = attend."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"tx_kernels: `attention_mask` must be (batch, seq_len) of 0/1, got shape "
                         f"{tuple(attention_mask.shape)}")
    return attention_mask.bool()[:, None, None, :]
