"""Residual-add + LayerNorm: tx_kernels.functional.add_layer_norm vs F.layer_norm(x + r).

Both providers return (layer_norm(x + r), x + r) and differentiate w.r.t. x, r, weight and bias.
Bytes per call (activation tensors only; weight, bias, mean and rstd are negligible), N = numel,
e = element size:
    fwd      4 N e   read x, r; write out, residual_out
    bwd      3 N e   read grad_out, x + r; write grad (x and r share it)
    fwd_bwd  7 N e
Op "add_layer_norm_post" is the post-LN form, only layer_norm(x + r) (BERT, the original
Transformer): tx_kernels.functional.add_layer_norm(..., return_residual=False) against exactly
F.layer_norm(x + r); bytes fwd 3 N e (read x, r; write out), bwd 4 N e (read grad_out, x, r: the
sum is recomputed; write grad), fwd_bwd 7 N e.
Also a roofline row: op "copy", provider "torch", dst.copy_(src) (2 bytes moved per byte copied:
read + write), measured in the same run, of the largest shape or, on CPU, of 256 MiB when that is
more: a tensor that fits in the last-level cache (this shape's 12 MiB does, on the 32 MiB L3 of
the development machine) would measure the cache, not memory.
"""
import torch
import torch.nn.functional as F

import tx_kernels.functional as TF

from .common import Case, dtype_name, grad_fn_case, maybe_compile, shape_str

NAME = "layer_norm"


def shapes_and_dtypes(ctx):
    if ctx.is_cuda:
        shapes = [(8 * 1024, 768), (8 * 1024, 4096), (4 * 2048, 8192)]
        return [(s, d) for d in (torch.bfloat16, torch.float32) for s in (shapes[:1] if ctx.quick else shapes)]
    return [((8, 512, 768), torch.float32)]


def eager(x, r, w, b):
    s = x + r
    return F.layer_norm(s, (s.shape[-1],), w, b), s


def ours(x, r, w, b):
    return TF.add_layer_norm(x, r, (x.shape[-1],), w, b)


def eager_post(x, r, w, b):
    return F.layer_norm(x + r, (x.shape[-1],), w, b)


def ours_post(x, r, w, b):
    return TF.add_layer_norm(x, r, (x.shape[-1],), w, b, return_residual=False)


def copy_case(shape, dtype, device):
    numel = torch.Size(shape).numel()
    if not device.startswith("cuda"):
        element_size = torch.empty((), dtype=dtype).element_size()
        if numel * element_size < 256 << 20:
            numel = (256 << 20) // element_size
            shape = (numel,)
    src = torch.randn(numel, device=device).to(dtype).reshape(shape)
    dst = torch.empty_like(src)
    return Case("copy", "torch", "fwd", dtype_name(dtype), shape_str(shape), lambda: dst.copy_(src),
                bytes=2 * src.numel() * src.element_size(), baseline="torch")


def cases(ctx):
    out = []
    for shape, dtype in shapes_and_dtypes(ctx):
        d = shape[-1]
        x = torch.randn(shape, device=ctx.device, dtype=dtype, requires_grad=True)
        r = torch.randn(shape, device=ctx.device, dtype=dtype, requires_grad=True)
        w = torch.randn(d, device=ctx.device, dtype=dtype, requires_grad=True)
        b = torch.randn(d, device=ctx.device, dtype=dtype, requires_grad=True)
        leaves = (x, r, w, b)
        n_bytes = x.numel() * x.element_size()
        providers = [("tx_kernels", ours), ("torch_eager", eager)]
        compiled = maybe_compile(eager, ctx)
        if compiled is not None:
            providers.append(("torch_compile", compiled))
        for provider, fn in providers:
            fwd, bwd, fwd_bwd = grad_fn_case(fn, leaves)
            for mode, call, nb in (("fwd", fwd, 4), ("bwd", bwd, 3), ("fwd_bwd", fwd_bwd, 7)):
                out.append(Case("add_layer_norm", provider, mode, dtype_name(dtype), shape_str(shape), call,
                                bytes=nb * n_bytes))
        post = [("tx_kernels", ours_post), ("torch_eager", eager_post)]
        compiled = maybe_compile(eager_post, ctx)
        if compiled is not None:
            post.append(("torch_compile", compiled))
        for provider, fn in post:
            fwd, bwd, fwd_bwd = grad_fn_case(fn, leaves)
            for mode, call, nb in (("fwd", fwd, 3), ("bwd", bwd, 4), ("fwd_bwd", fwd_bwd, 7)):
                out.append(Case("add_layer_norm_post", provider, mode, dtype_name(dtype), shape_str(shape),
                                call, bytes=nb * n_bytes))
    big_shape, big_dtype = max(shapes_and_dtypes(ctx), key=lambda sd: torch.Size(sd[0]).numel())
    out.append(copy_case(big_shape, big_dtype, ctx.device))
    return out
