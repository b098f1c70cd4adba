"""Bias + activation: tx_kernels.functional.bias_act vs act(x + b) in eager torch.

Activations gelu_tanh, gelu (erf) and relu; gradients w.r.t. x and b. Bytes per call (N = numel,
e = element size; the bias and its gradient are negligible):
    fwd      2 N e   read x; write out
    bwd      3 N e   read grad_out, x; write grad_x
    fwd_bwd  5 N e
"""
import torch
import torch.nn.functional as F

import tx_kernels.functional as TF

from .common import Case, dtype_name, grad_fn_case, maybe_compile, shape_str

NAME = "bias_act"
ACTS = ("gelu_tanh", "gelu", "relu")


def eager_fn(act):
    if act == "relu":
        return lambda x, b: F.relu(x + b)
    approximate = "tanh" if act == "gelu_tanh" else "none"
    return lambda x, b: F.gelu(x + b, approximate=approximate)


def ours_fn(act):
    return lambda x, b: TF.bias_act(x, b, act)


def shapes_and_dtypes(ctx):
    if ctx.is_cuda:
        shapes = [(8 * 1024, 768), (8 * 1024, 4096), (4 * 2048, 8192)]
        return [(s, d) for d in (torch.bfloat16, torch.float32) for s in (shapes[1:2] if ctx.quick else shapes)]
    return [((8, 512, 3072), torch.float32)]


def cases(ctx):
    out = []
    acts = ACTS[:1] if ctx.quick else ACTS
    for shape, dtype in shapes_and_dtypes(ctx):
        x = torch.randn(shape, device=ctx.device, dtype=dtype, requires_grad=True)
        b = torch.randn(shape[-1], device=ctx.device, dtype=dtype, requires_grad=True)
        n_bytes = x.numel() * x.element_size()
        for act in acts:
            providers = [("tx_kernels", ours_fn(act)), ("torch_eager", eager_fn(act))]
            compiled = maybe_compile(eager_fn(act), ctx)
            if compiled is not None:
                providers.append(("torch_compile", compiled))
            for provider, fn in providers:
                fwd, bwd, fwd_bwd = grad_fn_case(fn, (x, b))
                for mode, call, nb in (("fwd", fwd, 2), ("bwd", bwd, 3), ("fwd_bwd", fwd_bwd, 5)):
                    out.append(Case(f"bias_{act}", provider, mode, dtype_name(dtype), shape_str(shape), call,
                                    bytes=nb * n_bytes))
    return out
