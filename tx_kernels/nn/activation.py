"""MultiheadAttention running on the tx_kernels fused attention kernel."""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as TF
from .._checks import require_tensor
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
        _check_inputs(query, key, value)
        is_batched = query.dim() == 3
        # Identity, not equality: self-attention projects once (one GEMM), as torch does.
        same = "qkv" if query is key and key is value else ("kv" if key is value else None)
        query, key, value, key_padding_mask = self._batch_first(query, key, value, key_padding_mask, is_batched)
        self._check_shapes(query, key, value)
        q, k, v = self._in_projection(query, key, value, same)
        k, v, attn_mask, key_padding_mask = self._extra_keys(k, v, attn_mask, key_padding_mask)
        if is_causal and not need_weights:
            attn_mask = None  # the hint says attn_mask is the causal mask: the kernel's flag is cheaper
        N, H, L, _ = q.shape
        mask = merge_masks(attn_mask, key_padding_mask, N, H, L, k.shape[2], q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            out, weights = _attention_with_weights(q, k, v, mask, is_causal and attn_mask is None,
                                                   dropout_p, self.training)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = TF.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                  is_causal=bool(is_causal))
            weights = None
        return self._out_projection(out, weights, is_batched)

    def _batch_first(self, query, key, value, key_padding_mask, is_batched):
        """(N, L, E) views of the inputs (a batch of one when unbatched), and the padding mask to match."""
        if not is_batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            # (L, N, E) inputs: work on (N, L, E) views; the projections read them in place.
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        return query, key, value, key_padding_mask

    def _check_shapes(self, query, key, value):
        N, _, Eq = query.shape
        if Eq != self.embed_dim:
            raise ValueError(f"tx_kernels: `query` has {Eq} features but embed_dim is {self.embed_dim}")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(f"tx_kernels: `key`/`value` have {key.shape[-1]}/{value.shape[-1]} features, "
                             f"expected kdim={self.kdim}, vdim={self.vdim}")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != N:
            raise ValueError(f"tx_kernels: `key` {tuple(key.shape)} and `value` {tuple(value.shape)} must "
                             f"share batch and sequence sizes with `query` batch {N}")

    def _in_projection(self, query, key, value, same):
        """(N, H, L, Dh) q and (N, H, S, Dh) k, v: views of the (N, L, H, Dh) projections, which
        the kernel reads by strides. One GEMM for self-attention ("qkv"), two when key is value
        ("kv"), else three."""
        E, H = self.embed_dim, self.num_heads
        N, L, S = query.shape[0], query.shape[1], key.shape[1]
        heads = lambda t, n: t.view(N, n, H, E // H).transpose(1, 2)  # noqa: E731
        if not self._qkv_same_embed_dim:
            bq, bk, bv = (None, None, None) if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
            return (heads(F.linear(query, self.q_proj_weight, bq), L),
                    heads(F.linear(key, self.k_proj_weight, bk), S),
                    heads(F.linear(value, self.v_proj_weight, bv), S))
        W, b = self.in_proj_weight, self.in_proj_bias
        rows = lambda lo, hi: (W[lo:hi], None if b is None else b[lo:hi])  # noqa: E731
        if same == "qkv":
            q, k, v = F.linear(query, W, b).view(N, L, 3, E).unbind(2)
            return heads(q, L), heads(k, L), heads(v, L)
        q = heads(F.linear(query, *rows(0, E)), L)
        if same == "kv":
            k, v = F.linear(key, *rows(E, 3 * E)).view(N, S, 2, E).unbind(2)
            return q, heads(k, S), heads(v, S)
        return q, heads(F.linear(key, *rows(E, 2 * E)), S), heads(F.linear(value, *rows(2 * E, 3 * E)), S)

    def _extra_keys(self, k, v, attn_mask, key_padding_mask):
        """torch.nn's extra key/value rows: bias_k/bias_v and add_zero_attn (rarely used; they
        copy k and v), each with one more 'allowed' mask column."""
        N, H, _, Dh = k.shape
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
        return k, v, attn_mask, key_padding_mask

    def _out_projection(self, out, weights, is_batched):
        """out_proj of the (N, H, L, Dh) attention output, in the caller's layout."""
        N, H, L, Dh = out.shape
        # out is laid out (N, L, H, Dh) in memory like q: back to (N, L, E) for free.
        out = F.linear(out.transpose(1, 2).reshape(N, L, H * Dh), self.out_proj.weight, self.out_proj.bias)
        if not is_batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights


def _check_inputs(query, key, value):
    for name, t in (("query", query), ("key", key), ("value", value)):
        require_tensor(t, name)
    if query.is_nested or key.is_nested or value.is_nested:
        raise NotImplementedError("tx_kernels.nn.MultiheadAttention: nested tensor `query`/`key`/`value` "
                                  "are not supported; pass padded tensors and a key_padding_mask")
    if query.dim() not in (2, 3):
        raise ValueError(f"tx_kernels: `query` must be 2-D (unbatched) or 3-D, got shape {tuple(query.shape)}")
    if key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(f"tx_kernels: `key` and `value` must have as many dimensions as `query` "
                         f"({query.dim()}), got {key.dim()} and {value.dim()}")


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
