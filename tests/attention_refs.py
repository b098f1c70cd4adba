"""What the attention tests (test_attention.py, test_attention_bwd.py) share: inputs, masks,
float64 references and stock torch's same-precision baseline, on the active backend (BE)."""
import math

import torch
import torch.nn.functional as F

from tx_kernels import reference as R

from cuda_backends import BE


def attention_inputs(N, H, Hkv, L, S, E, Ev=None, dtype=torch.bfloat16, layout="nhle", requires_grad=False):
    """randn q (N, H, L, E), k (N, Hkv, S, E), v (N, Hkv, S, Ev) on BE.device; layout "nlhe"
    stores each as (N, L, H, E) memory viewed as (N, H, L, E), the layout of a fused projection."""
    Ev = E if Ev is None else Ev

    def make(h, n, e):
        if layout == "nlhe":
            t = torch.randn(N, n, h, e, device=BE.device, dtype=dtype).transpose(1, 2)
        else:
            t = torch.randn(N, h, n, e, device=BE.device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    return make(H, L, E), make(Hkv, S, E), make(Hkv, S, Ev)


def make_mask(kind, N, H, L, S, dtype=torch.float32):
    """A mask of one kind: bool (True = attend) or additive, in its own broadcast shape.

    The "bool_keys" and "bool_2d" kinds keep key 0 visible, so no row is fully masked."""
    dev = BE.device
    if kind is None:
        return None
    if kind == "bool_full":  # (N, H, L, S)
        return torch.rand(N, H, L, S, device=dev) > 0.3
    if kind == "bool_keys":  # key padding (N, 1, 1, S)
        m = torch.rand(N, 1, 1, S, device=dev) > 0.3
        m[..., 0] = True
        return m
    if kind == "bool_2d":  # (L, S)
        m = torch.rand(L, S, device=dev) > 0.4
        m[:, 0] = True
        return m
    if kind == "add_2d":  # (L, S)
        return torch.randn(L, S, device=dev, dtype=dtype)
    if kind == "add_heads":  # (1, H, L, S)
        return torch.randn(1, H, L, S, device=dev, dtype=dtype)
    if kind == "add_keys":  # (N, 1, 1, S): a per-key bias, its gradient summed over H and L
        # (A per-row bias (N, 1, L, 1) has an exact gradient of 0 -- softmax is shift-invariant --
        # so its computed gradient is pure cancellation noise of the rounded `out`.)
        return torch.randn(N, 1, 1, S, device=dev, dtype=dtype)
    raise ValueError(kind)


def expand_kv(t, H):
    return t.repeat_interleave(H // t.shape[1], dim=1) if t.shape[1] != H else t


def ref_fwd(q, k, v, mask=None, causal=False, scale=None, dropout_mask=None, dropout_p=0.0):
    """float64 reference output and logsumexp from the definitions (tx_kernels.reference)."""
    N, H, L, E = q.shape
    S = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(E)
    q64, k64, v64 = q.detach().double(), k.detach().double(), v.detach().double()
    m64 = mask if mask is None or mask.dtype == torch.bool else mask.double()
    out = R.attention(q64, k64, v64, attn_mask=m64, is_causal=causal, scale=scale,
                      dropout_mask=dropout_mask, dropout_p=dropout_p)
    scores = torch.matmul(q64, expand_kv(k64, H).transpose(-2, -1)) * scale
    allowed = torch.ones(L, S, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()
    allowed = allowed.expand(N, H, L, S)
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask.expand(N, H, L, S)
        else:
            scores = scores + m64
    lse = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return out, lse


def torch_low_precision(q, k, v, mask=None, causal=False, scale=None, dropout_mask=None, dropout_p=0.0):
    """Stock torch at the inputs' precision: the naive composite (matmul, softmax, matmul) run in
    fp16/bf16, FlashAttention's own baseline. (F.scaled_dot_product_attention gives NaN on fully
    masked rows and picks backends by shape, so the composite is the stable choice.)"""
    H = q.shape[1]
    m = mask if mask is None or mask.dtype == torch.bool else mask.to(q.dtype)
    return R.attention(q.detach(), expand_kv(k.detach(), H), expand_kv(v.detach(), H), attn_mask=m,
                       is_causal=causal, scale=scale, dropout_mask=dropout_mask, dropout_p=dropout_p)


def ref_grads(q, k, v, mask, causal, scale, grad, keep=None, p=0.0):
    """float64 reference gradients of q, k, v (and of a floating mask) for the output gradient `grad`."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    m64 = None
    if mask is not None:
        m64 = mask.detach().double().requires_grad_() if mask.is_floating_point() else mask
    out = R.attention(q64, k64, v64, m64, is_causal=causal, scale=scale, dropout_mask=keep, dropout_p=p)
    inputs = [q64, k64, v64] + ([m64] if m64 is not None and m64.is_floating_point() else [])
    return list(torch.autograd.grad(out, inputs, grad.double()))


def torch_sdpa(q, k, v, mask, scale):
    """Stock torch in the inputs' precision, the way a GPU user gets it: one of its fused kernels
    (flash, memory-efficient, cuDNN), which, like ours, read the stored low-precision `out` for
    rowsum(dO * O). GQA is expressed by repeating K/V (autograd sums dK/dV back), because torch's
    memory-efficient kernel takes masks but not enable_gqa. Returns (out, which)."""
    if k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if q.device.type == "cpu":
        # CPU tensors (the cpu and emu backends): torch's CPU kernels (its fused flash kernel and
        # its math path alike) compute bf16/fp16 attention partly in fp32 (measured: dq errors
        # ~3x below a kernel that, like ours and a GPU's, computes in the inputs' precision), so
        # they are no same-precision baseline. Use the composite in that precision,
        # FlashAttention's own baseline (the forward tests use it too).
        return R.attention(q, k, v, mask, scale=scale), "composite"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    try:
        with sdpa_kernel(fused):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), "fused"
    except RuntimeError as e:
        # Not a skip: no fused torch kernel takes this case (e.g. a head dim over 256), so the
        # baseline is torch's default dispatch (its math path); anything else is an error.
        if "No available kernel" not in str(e):
            raise
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), "default"


def torch_grads(q, k, v, mask, causal, scale, grad):
    """Gradients of torch_sdpa; causality folded into an explicit mask (torch's is_causal is
    top-left too, but not every backend accepts it with L != S)."""
    qt, kt, vt = (t.detach().clone().requires_grad_() for t in (q, k, v))
    L, S = q.shape[2], k.shape[2]
    tmask = None
    if mask is not None:
        tmask = mask.detach().clone()
        if tmask.is_floating_point():
            tmask = tmask.to(q.dtype).requires_grad_()
    eff = tmask
    if causal:
        tri = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        if tmask is None:
            eff = tri
        elif tmask.dtype == torch.bool:
            eff = tmask & tri
        else:
            eff = tmask.masked_fill(~tri, float("-inf"))
    out, _ = torch_sdpa(qt, kt, vt, eff, scale)
    inputs = [qt, kt, vt] + ([tmask] if tmask is not None and tmask.is_floating_point() else [])
    return list(torch.autograd.grad(out, inputs, grad))


def check_lse(lse, ref_lse, name="", dtype=torch.float32):
    """`dtype`: the inputs'; lse is fp32, fp64 for fp64 inputs (params.h)."""
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), name
    assert lse.shape == ref_lse.shape, name
    assert lse.is_contiguous(), f"{name}: lse must be contiguous (N, H, L)"
    ninf_ref = torch.isneginf(ref_lse)
    assert not torch.isnan(lse).any(), f"{name}: NaN in lse (unwritten or bad math)"
    assert torch.equal(torch.isneginf(lse), ninf_ref), f"{name}: -inf pattern of lse differs"
    fin = ~ninf_ref
    if fin.any():
        err = (lse[fin].double() - ref_lse[fin]).abs()
        tol = 1e-4 + 2e-5 * ref_lse[fin].abs()
        assert (err <= tol).all(), f"{name}: lse max error {err.max().item():.3e}"
