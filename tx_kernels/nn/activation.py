"""MultiheadAttention running on the tx_kernels fused attention kernel."""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as TF
from ._utils import causal_mask_bool, merge_masks


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in torch.nn.MultiheadAttention whose attention runs in tx_kernels' fused kernel.

    A subclass of torch.nn.MultiheadAttention: the constructor, parameters, initialization,
    state_dict keys and forward signature are torch's, so weights load in both directions with
    strict=True and ``isinstance(m, torch.nn.MultiheadAttention)`` holds.

    Differences from torch.nn.MultiheadAttention:
    - A query row whose keys are all masked gives 0 on every path, also in the returned weights
      (torch 2.13 gives 0 with need_weights=False but NaN with need_weights=True).
    - ``is_causal=True`` works without ``attn_mask`` (torch requires the mask as a hint); when both
      are given, the mask is trusted to be causal (as torch's SDPA path does) and not read.
    - need_weights=True (torch's default) computes the weights in plain PyTorch (a slower path
      that materializes the (N, H, L, S) scores, as torch does). Pass need_weights=False for speed.
    - The attention dropout uses tx_kernels' Philox generator, so the random mask differs from
      torch's for the same seed (same distribution).
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"tx_kernels: `{name}` must be a torch.Tensor, got {type(t).__name__}")
        if query.is_nested or key.is_nested or value.is_nested:
            raise NotImplementedError("tx_kernels.nn.MultiheadAttention: nested tensor `query`/`key`/`value` "
                                      "are not supported; pass padded tensors and a key_padding_mask")
        if query.dim() not in (2, 3):
            raise ValueError(f"tx_kernels: `query` must be 2-D (unbatched) or 3-D, got shape {tuple(query.shape)}")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"tx_kernels: `key` and `value` must have as many dimensions as `query` "
                             f"({query.dim()}), got {key.dim()} and {value.dim()}")
        is_batched = query.dim() == 3
        self_attention = query is key and key is value
        kv_same = key is value
        if not is_batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            # (L, N, E) inputs: work on (N, L, E) views; the projections read them in place.
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        N, L, Eq = query.shape
        S = key.shape[1]
        E, H = self.embed_dim, self.num_heads
        Dh = E // H
        if Eq != E:
            raise ValueError(f"tx_kernels: `query` has {Eq} features but embed_dim is {E}")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(f"tx_kernels: `key`/`value` have {key.shape[-1]}/{value.shape[-1]} features, "
                             f"expected kdim={self.kdim}, vdim={self.vdim}")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != N:
            raise ValueError(f"tx_kernels: `key` {tuple(key.shape)} and `value` {tuple(value.shape)} must "
                             f"share batch and sequence sizes with `query` batch {N}")

        # ---- input projections (one GEMM for self-attention, two for encoder-decoder attention)
        b = self.in_proj_bias
        if self._qkv_same_embed_dim:
            W = self.in_proj_weight
            if self_attention:
                qkv = F.linear(query, W, b).view(N, L, 3, H, Dh)
                q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            else:
                q = F.linear(query, W[:E], None if b is None else b[:E]).view(N, L, H, Dh)
                if kv_same:
                    kv = F.linear(key, W[E:], None if b is None else b[E:]).view(N, S, 2, H, Dh)
                    k, v = kv[:, :, 0], kv[:, :, 1]
                else:
                    k = F.linear(key, W[E:2 * E], None if b is None else b[E:2 * E]).view(N, S, H, Dh)
                    v = F.linear(value, W[2 * E:], None if b is None else b[2 * E:]).view(N, S, H, Dh)
        else:
            bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
            q = F.linear(query, self.q_proj_weight, bq).view(N, L, H, Dh)
            k = F.linear(key, self.k_proj_weight, bk).view(N, S, H, Dh)
            v = F.linear(value, self.v_proj_weight, bv).view(N, S, H, Dh)
        # (N, H, L, Dh) views of the (N, L, H, Dh) projections: the kernel reads them by strides.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

        # ---- torch.nn's extra key/value rows (rarely used; they force a copy of k and v)
        if self.bias_k is not None or self.bias_v is not None:
            if self.bias_k is None or self.bias_v is None:
                raise RuntimeError("tx_kernels: `bias_k` and `bias_v` must both be set or both be None")
            k = torch.cat([k, self.bias_k.view(1, H, 1, Dh).expand(N, H, 1, Dh).to(k.dtype)], dim=2)
            v = torch.cat([v, self.bias_v.view(1, H, 1, Dh).expand(N, H, 1, Dh).to(v.dtype)], dim=2)
            attn_mask, key_padding_mask = _pad_masks(attn_mask, key_padding_mask)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, H, 1, Dh)], dim=2)
            v = torch.cat([v, v.new_zeros(N, H, 1, Dh)], dim=2)
            attn_mask, key_padding_mask = _pad_masks(attn_mask, key_padding_mask)
        S_eff = k.shape[2]

        dropout_p = self.dropout if self.training else 0.0
        if is_causal and not need_weights:
            attn_mask = None  # the hint says attn_mask is the causal mask: the kernel's flag is cheaper
        mask = merge_masks(attn_mask, key_padding_mask, N, H, L, S_eff, q.dtype)

        weights = None
        if need_weights:
            out, weights = _attention_with_weights(q, k, v, mask, is_causal and attn_mask is None,
                                                   dropout_p, self.training)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = TF.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                  is_causal=bool(is_causal))
        # out is (N, H, L, Dh), laid out (N, L, H, Dh) in memory like q: back to (N, L, E) for free.
        out = out.transpose(1, 2).reshape(N, L, E)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not is_batched:
            out = out.squeeze(0)
            if weights is not None:
                weights = weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _pad_masks(attn_mask, key_padding_mask):
    """Append one 'allowed' key column (torch.nn pads with 0 / False, meaning not masked)."""
    def pad(m):
        if m is None:
            return None
        return torch.cat([m, m.new_zeros(m.shape[:-1] + (1,))], dim=-1)
    return pad(attn_mask), pad(key_padding_mask)


def _attention_with_weights(q, k, v, mask, is_causal, dropout_p, training):
    """Plain-PyTorch attention that also returns the (N, H, L, S) probabilities (need_weights)."""
    L, S = q.shape[2], k.shape[2]
    scores = torch.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-2, -1))
    allowed = None
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = mask
        else:
            scores = scores + mask
    if is_causal:
        c = causal_mask_bool(L, S, q.device)
        allowed = c if allowed is None else allowed & c
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    # Rows with no allowed key: 0 instead of NaN (the tx_kernels convention, same as the kernel).
    # Filling before the softmax keeps the backward finite too.
    empty = (scores == float("-inf")).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=training)
    return torch.matmul(probs, v), probs
