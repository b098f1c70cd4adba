"""Sinusoidal positional encoding of "Attention Is All You Need" (section 3.5)."""
import math

import torch
from torch import Tensor, nn


class PositionalEncoding(nn.Module):
    """x + PE[:L], then dropout, as in the PyTorch tutorial's PositionalEncoding.

    PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(pos / 10000^(2i/d)). The buffer
    ``pe`` has the tutorial's shape (max_len, 1, d_model), so its state_dicts load; inputs are
    (L, N, d_model), or (N, L, d_model) with batch_first=True. Odd d_model works (the last
    column is a sine).
    """

    def __init__(self, d_model: int, dropout: float = 0.1, max_len: int = 5000, batch_first: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if d_model <= 0 or max_len <= 0:
            raise ValueError(f"tx_kernels: `d_model` and `max_len` must be positive, got {d_model}, {max_len}")
        self.dropout = nn.Dropout(p=dropout)
        self.batch_first = batch_first
        self.d_model = d_model
        position = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, 1, d_model, dtype=torch.float64)
        pe[:, 0, 0::2] = torch.sin(position * div_term)
        pe[:, 0, 1::2] = torch.cos(position * div_term[: d_model // 2])
        self.register_buffer("pe", pe.to(device=device, dtype=dtype or torch.get_default_dtype()))

    def forward(self, x: Tensor) -> Tensor:
        L = x.shape[1] if self.batch_first else x.shape[0]
        if L > self.pe.shape[0]:
            raise ValueError(f"tx_kernels: sequence length {L} exceeds PositionalEncoding max_len {self.pe.shape[0]}")
        if x.shape[-1] != self.d_model:
            raise ValueError(f"tx_kernels: `x` has {x.shape[-1]} features, expected d_model={self.d_model}")
        pe = self.pe[:L]
        if self.batch_first:
            pe = pe.transpose(0, 1)
        return self.dropout(x + pe.to(x.dtype))
