"""Feed-forward block Linear(d, h) -> GELU(tanh) -> Linear(h, d), d = 768, h = 3072.

tx_kernels.functional.feed_forward (GEMMs through ATen, bias1 + GELU fused in one kernel) vs the
same three torch ops in eager mode (and torch.compile on CUDA or with --compile). Gradients w.r.t.
input, both weights and both biases. FLOPs per call (M tokens; elementwise work not counted):
    fwd      4 M d h        two GEMMs
    fwd_bwd  12 M d h       plus four GEMMs in the backward
On CPU the token count is small (M = 512) to keep the suite short: the GEMMs dominate there.
"""
import torch
import torch.nn.functional as F

import tx_kernels.functional as TF

from .common import Case, dtype_name, grad_fn_case, maybe_compile, shape_str

NAME = "feed_forward"
D, H = 768, 3072


def eager(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)


def ours(x, w1, b1, w2, b2):
    return TF.feed_forward(x, w1, b1, w2, b2, activation="gelu_tanh")


def cases(ctx):
    if ctx.is_cuda:
        configs = [((8, 1024, D), torch.bfloat16), ((8, 1024, D), torch.float32)]
    else:
        configs = [((4, 128, D), torch.float32)]
    out = []
    for shape, dtype in configs:
        dev = ctx.device
        x = torch.randn(shape, device=dev, dtype=dtype, requires_grad=True)
        w1 = (torch.randn(H, D, device=dev, dtype=dtype) / D**0.5).requires_grad_()
        b1 = torch.zeros(H, device=dev, dtype=dtype, requires_grad=True)
        w2 = (torch.randn(D, H, device=dev, dtype=dtype) / H**0.5).requires_grad_()
        b2 = torch.zeros(D, device=dev, dtype=dtype, requires_grad=True)
        leaves = (x, w1, b1, w2, b2)
        m = x.numel() // D
        providers = [("tx_kernels", ours), ("torch_eager", eager)]
        compiled = maybe_compile(eager, ctx)
        if compiled is not None:
            providers.append(("torch_compile", compiled))
        for provider, fn in providers:
            fwd, _, fwd_bwd = grad_fn_case(fn, leaves)
            out.append(Case("feed_forward", provider, "fwd", dtype_name(dtype), shape_str(shape), fwd,
                            flops=4 * m * D * H))
            out.append(Case("feed_forward", provider, "fwd_bwd", dtype_name(dtype), shape_str(shape), fwd_bwd,
                            flops=12 * m * D * H))
    return out
