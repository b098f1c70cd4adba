"""Variable-length attention on packed sequences against the padded op, per real token.

- no padding: B sequences of exactly L tokens, as one packed (B*L, H, E) batch through
  attention_varlen and as the (B, H, L, E) padded op (tx_padded, the baseline): the same work, so
  the ratio is the cost of packing itself (the target is >= 0.9x);
- mixed lengths uniform in 8..L: attention_varlen on the packed real tokens against the padded op
  and torch's SDPA, both with a (B, 1, 1, L) key-padding mask on the batch padded to the longest.
MiniLM-sized heads (H=12, E=32). Throughput: real query tokens per second.

Run with the suite: python -m benchmarks.run --only attention_varlen [--quick]
"""
import torch
import torch.nn.functional as F

import tx_kernels.functional as TF
from benchmarks.common import Case, lazy_inputs

NAME = "attention_varlen"


def _make(lengths, H, E, mode):
    def make():
        g = torch.Generator().manual_seed(0)
        B, L, T = len(lengths), max(lengths), sum(lengths)
        grad = mode == "fwd_bwd"
        packed = torch.randn(T, 3, H, E, generator=g).requires_grad_(grad)
        real = torch.arange(L)[None] < torch.tensor(lengths)[:, None]
        padded = torch.zeros(B, L, 3, H, E)
        padded[real] = packed.detach()
        padded.requires_grad_(grad)
        cu = TF.cu_seqlens_from_lengths(torch.tensor(lengths))
        mask = real[:, None, None, :] if not bool(real.all()) else None
        return packed, padded, cu, L, mask
    return make


def _run(provider, mode):
    def fwd(inputs):
        packed, padded, cu, L, mask = inputs
        if provider == "tx_varlen":
            q, k, v = packed.unbind(1)
            return TF.attention_varlen(q, k, v, cu, cu, L, L)
        q, k, v = (padded[:, :, i].transpose(1, 2) for i in range(3))
        f = TF.scaled_dot_product_attention if provider == "tx_padded" else F.scaled_dot_product_attention
        return f(q, k, v, attn_mask=mask)

    if mode == "fwd":
        def run(inputs):
            with torch.no_grad():
                return fwd(inputs)
    else:
        def run(inputs):
            fwd(inputs).sum().backward()
            inputs[0].grad = inputs[1].grad = None
    return run


def cases(ctx):
    H, E = 12, 32
    B, L = (8, 128) if ctx.quick else (32, 128)
    if ctx.is_cuda:
        return []  # no CUDA varlen kernel yet
    g = torch.Generator().manual_seed(1)
    mixes = {"no padding": [L] * B, "uniform 8..L": torch.randint(8, L + 1, (B,), generator=g).tolist()}
    out = []
    for mix, lengths in mixes.items():
        for mode in ("fwd", "fwd_bwd"):
            make = _make(lengths, H, E, mode)
            shape = f"B={B} H={H} L={L} E={E} {mix} ({sum(lengths)} real tokens)"
            providers = ["tx_varlen", "tx_padded"] + (["torch_sdpa"] if mix != "no padding" else [])
            for provider in providers:
                setup, fn = lazy_inputs(make, _run(provider, mode))
                out.append(Case("attention_varlen", provider, mode, "float32", shape, fn, work=sum(lengths),
                                work_unit="tokens/s", baseline="tx_padded", setup=setup))
    return out
