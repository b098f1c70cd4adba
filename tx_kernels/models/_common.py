"""Pieces shared by the tx_kernels models."""
from typing import Optional

import torch

# Hugging Face activation names -> tx_kernels bias_act names. gelu_new, gelu_fast and
# gelu_pytorch_tanh are the same tanh approximation written three ways.
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_fast": "gelu_tanh", "relu": "relu"}


def hf_activation(name, arg="activation"):
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"tx_kernels: `{arg}`={name!r} is not supported; use one of {sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


def padding_mask_to_sdpa(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """HF-style (N, S) mask (1 = token, 0 = padding) -> bool (N, 1, 1, S), True = attend."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"tx_kernels: `attention_mask` must be (batch, seq_len) of 0/1, got shape "
                         f"{tuple(attention_mask.shape)}")
    return attention_mask.bool()[:, None, None, :]
