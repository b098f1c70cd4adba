"""Plain-PyTorch references written from the definitions, shared by tests and benchmarks.

These are the specification, not an implementation detail: each follows the textbook formula with
no fusion or tiling, so tests compare the kernels against them in float64 (or float32 on CUDA).
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F


def attention(query, key, value, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
              dropout_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0):
    """softmax(scale * q k^T + mask) v with (N, H, L, E) inputs, materializing the scores.

    Rows with no allowed key give 0 (the tx_kernels convention), decided by the mask alone (False,
    or -inf in an additive mask, or causality); NaN and Inf elsewhere propagate as in torch's
    composite. dropout_mask, if given, is a
    boolean keep-mask of shape (N, H, L, S) applied to the probabilities with 1 / (1 - dropout_p).
    """
    N, H, L, E = query.shape
    S = key.shape[-2]
    if key.shape[1] != H:
        group = H // key.shape[1]
        key = key.repeat_interleave(group, dim=1)
        value = value.repeat_interleave(group, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(E)
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    allowed = torch.ones(L, S, dtype=torch.bool, device=query.device)
    if is_causal:
        allowed = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
    allowed = allowed.expand(N, H, L, S)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask.expand(N, H, L, S)
        else:
            allowed = allowed & (attn_mask != float("-inf")).expand(N, H, L, S)
            scores = scores + attn_mask.to(scores.dtype)
    scores = scores.masked_fill(~allowed, float("-inf"))
    has_key = allowed.any(dim=-1, keepdim=True)
    row_max = scores.amax(dim=-1, keepdim=True)  # NaN if any score is NaN
    row_max = torch.where(has_key, row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    probs = torch.where(has_key, weights / torch.where(has_key, denom, torch.ones_like(denom)),
                        torch.zeros_like(weights))
    if dropout_mask is not None:
        probs = probs * dropout_mask.to(probs.dtype) / (1.0 - dropout_p)
    return torch.matmul(probs, value)


def philox_words(group, offset, seed):
    """Philox4x32-10 words (..., 4) of counters (group lo, group hi, offset lo, offset hi) under the
    key (seed lo, seed hi), for a uint64 numpy array of groups: csrc/kernels/philox.h's scheme,
    implemented in numpy from its comments."""
    import numpy as np

    m32 = np.uint64(0xFFFFFFFF)
    offset, seed = np.uint64(offset % 2**64), np.uint64(seed % 2**64)
    c = [group & m32, group >> np.uint64(32), np.full_like(group, offset & m32),
         np.full_like(group, offset >> np.uint64(32))]
    k0, k1 = seed & m32, seed >> np.uint64(32)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]
        p1 = np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & m32, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & m32]
        k0 = (k0 + np.uint64(0x9E3779B9)) & m32
        k1 = (k1 + np.uint64(0xBB67AE85)) & m32
    return np.stack(c, axis=-1)


def dropout_keep_mask(seed, offset, numel, p):
    """The keep-mask (bool, numel) of elements 0..numel-1 for rng [seed, offset] and drop
    probability p: element e takes word e % 4 of group e // 4 and is kept iff word >= p * 2^32."""
    import numpy as np

    words = philox_words(np.arange((numel + 3) // 4, dtype=np.uint64), offset, seed).reshape(-1)[:numel]
    threshold = 0 if p <= 0 else (2**32 - 1 if p >= 1 else int(p * 2**32))
    return torch.from_numpy(words >= np.uint64(threshold))


def layer_norm(x, weight=None, bias=None, eps=1e-5, normalized_ndim=1):
    dims = tuple(range(x.dim() - normalized_ndim, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5, normalized_ndim=1, sum_dtype=None):
    """LayerNorm(x + residual) and the sum. With `sum_dtype`, the sum is first rounded to that
    dtype, as the op stores residual_out and normalizes it (and as torch's x + r in that dtype
    does); the rounding passes gradients straight through."""
    s = x + residual
    if sum_dtype is not None:
        s = s + (s.detach().to(sum_dtype).to(s.dtype) - s.detach())
    return layer_norm(s, weight, bias, eps, normalized_ndim), s


def gelu(x, approximate="none"):
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def bias_act(x, bias, activation):
    y = x + bias if bias is not None else x
    if activation == "relu":
        return torch.relu(y)  # derivative 0 at exactly 0, as torch.nn.ReLU and the kernels
    if activation == "gelu":
        return gelu(y)
    if activation == "gelu_tanh":
        return gelu(y, "tanh")
    raise ValueError(activation)


def feed_forward(x, w1, b1, w2, b2, activation="relu"):
    return F.linear(bias_act(F.linear(x, w1), b1, activation), w2, b2)
