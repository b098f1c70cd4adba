"""Variable-length attention on packed batches, and the helpers that pack and unpack them.

The layout is FlashAttention's (`flash_attn_varlen_func`, `unpad_input`, `pad_input`): the
sequences of a batch are concatenated along the first dimension, `(total, heads, head_dim)`, and
int32 offsets `cu_seqlens` (batch + 1 of them, from 0 to total) say where each one starts, so no
work is spent on padding. Re-exported by tx_kernels.functional.
"""
import math
from typing import Optional, Tuple

import torch

from ._checks import autocast_inputs, check_dropout_p, new_rng, require_tensor
from .ops import ops

__all__ = ["attention_varlen", "jagged_attention", "unpad_input", "pad_input", "cu_seqlens_from_lengths",
           "PackedBatch"]


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
) -> torch.Tensor:
    """Attention over a packed batch, with flash_attn_varlen_func's arguments (and order).

    q (total_q, H, E), k (total_k, Hkv, E), v (total_k, Hkv, Ev): sequence b is rows
    cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q and cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k and v,
    and attends only within itself. cu_seqlens_* are int32 CPU tensors of batch + 1 offsets,
    starting at 0, non-decreasing, ending at total_q / total_k (anything else raises ValueError
    naming the argument); sequences of length 0 are allowed. max_seqlen_q / max_seqlen_k must be
    at least every sequence's length (like FlashAttention's, they size the work; here they also
    key the dropout stream, see below). H must be a multiple of Hkv (GQA, as in FlashAttention:
    no flag needed). softmax_scale defaults to 1 / sqrt(E). Returns (total_q, H, Ev).

    Same semantics as tx_kernels.functional.scaled_dot_product_attention, sequence by sequence:
    - causal is top-left aligned within each sequence (query i sees keys 0..i), as in torch and
      the padded op. FlashAttention >= 2.1 aligns it bottom-right when a sequence has fewer
      queries than keys: the two agree when cu_seqlens_q == cu_seqlens_k (self-attention).
    - a query with no key to attend to (a sequence with 0 keys, or causal rows past the keys)
      gives 0 and zero gradients (torch's padded SDPA gives NaN).
    - dropout draws the mask the padded op draws for the same batch padded to
      (max_seqlen_q, max_seqlen_k), element ((b * H + h) * max_seqlen_q + i) * max_seqlen_k + j.
    Not supported (unlike FlashAttention): window_size, softcap, alibi_slopes,
    return_attn_probs, block_table. On CUDA tensors, cu_seqlens_q / cu_seqlens_k stay CPU tensors.
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q),
                    ("cu_seqlens_k", cu_seqlens_k)):
        require_tensor(t, name)
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, torch.Tensor) and m.numel() == 1:
            m = int(m)
        if isinstance(m, bool) or not isinstance(m, int):
            raise TypeError(f"tx_kernels: `{name}` must be an int, got {type(m).__name__}")
    check_dropout_p(dropout_p)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1]) if q.dim() == 3 and q.shape[-1] > 0 else 1.0
    q, k, v = autocast_inputs(q, k, v)
    rng = new_rng() if dropout_p > 0.0 else None
    out, _ = ops.attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                      int(max_seqlen_k), float(softmax_scale), bool(causal),
                                      float(dropout_p), rng)
    return out


def jagged_attention(query, key, value, dropout_p=0.0, is_causal=False, scale=None):
    """attention_varlen on torch's jagged nested tensors (layout=torch.jagged), as SDPA takes them:
    (N, H, j, E) views of (N, j, H, E) nested tensors (ragged dim 2). Returns the same layout."""
    def unpack(t, name):
        if not (t.is_nested and t.layout == torch.jagged and t.dim() == 4 and t._ragged_idx == 2):
            raise ValueError(f"tx_kernels: nested `{name}` must be a jagged (N, H, j, E) tensor (a (N, j, H, E) "
                             f"nested tensor with layout=torch.jagged, transposed), as for torch's SDPA")
        packed = t.transpose(1, 2)
        offsets = packed.offsets()
        lengths = offsets.diff()
        return packed.values(), offsets, cu_seqlens_from_lengths(lengths), int(lengths.max()) if lengths.numel() else 0

    (q, offsets_q, cu_q, max_q), (k, _, cu_k, max_k), (v, _, _, _) = (
        unpack(t, n) for t, n in ((query, "query"), (key, "key"), (value, "value")))
    out = attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, scale, is_causal)
    return torch.nested.nested_tensor_from_jagged(out, offsets_q).transpose(1, 2)


def cu_seqlens_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """int32 offsets (batch + 1, starting at 0) of sequences with the given lengths."""
    lengths = torch.as_tensor(lengths).to(device="cpu", dtype=torch.int64)
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    torch.cumsum(lengths.reshape(-1), 0, out=cu[1:])
    return cu.to(torch.int32)


def _mask_layout(attention_mask: torch.Tensor):
    keep = attention_mask.bool()
    indices = torch.nonzero(keep.reshape(-1), as_tuple=False).flatten()
    lengths = keep.sum(dim=1)
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    return indices, cu_seqlens_from_lengths(lengths), max_seqlen


def _check_mask(hidden_states, attention_mask):
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(f"tx_kernels: `attention_mask` must have shape (N, L) = "
                         f"{tuple(hidden_states.shape[:2])}, got {tuple(attention_mask.shape)}")


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Packs the real tokens of a padded batch, as FlashAttention's unpad_input.

    hidden_states (N, L, ...); attention_mask (N, L), nonzero / True at real tokens (anywhere in
    the row: left or right padding, or holes). Returns (packed (T, ...), indices (T,) int64 into
    the flattened N * L positions, cu_seqlens int32 (N + 1,), max_seqlen int). Each row's real
    tokens keep their order and become one sequence. Differentiable in hidden_states.
    """
    _check_mask(hidden_states, attention_mask)
    indices, cu_seqlens, max_seqlen = _mask_layout(attention_mask)
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return flat.index_select(0, indices), indices, cu_seqlens, max_seqlen


def pad_input(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """The inverse of unpad_input: (T, ...) -> (batch, seqlen, ...), zeros at padded positions."""
    out = packed.new_zeros((batch * seqlen, *packed.shape[1:]))
    out = out.index_copy(0, indices, packed)
    return out.reshape(batch, seqlen, *packed.shape[1:])


class PackedBatch:
    """The real tokens of a padded (N, L) batch, for models that run padding-free.

    Built once from the (N, L) padding mask; pack() removes padding from an (N, L, ...) tensor,
    pad() puts it back (zeros at padded positions), attention() runs attention_varlen over the
    packed sequences (self-attention: queries and keys share the offsets).
    """

    def __init__(self, attention_mask: torch.Tensor):
        if attention_mask.dim() != 2:
            raise ValueError(f"tx_kernels: `attention_mask` must be (batch, seq_len), got shape "
                             f"{tuple(attention_mask.shape)}")
        self.batch, self.seqlen = attention_mask.shape
        self.indices, self.cu_seqlens, self.max_seqlen = _mask_layout(attention_mask)

    @property
    def total(self) -> int:
        return self.indices.numel()

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        _check_mask(x, torch.empty(self.batch, self.seqlen, device="meta"))
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.indices)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        return pad_input(x, self.indices, self.batch, self.seqlen)

    def attention(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        return attention_varlen(q, k, v, self.cu_seqlens, self.cu_seqlens, self.max_seqlen,
                                self.max_seqlen, dropout_p, softmax_scale, causal)
