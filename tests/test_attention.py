"""Fused attention (tx_kernels.functional.scaled_dot_product_attention) against float64 references.

Runs on every device conftest.devices() reports; shapes are small enough for the 2-core CPU CI.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import tx_kernels.functional as TF
from tx_kernels import reference as R
from tx_kernels.ops import ops

from conftest import assert_attention_within_torch_error, assert_within_torch_error, devices, rel_err

# Every CPU output is allocated junk-filled (NaN): an element the kernel misses fails the test.
pytestmark = pytest.mark.usefixtures("poison")

# (N, H, Hkv, L, S, E, Ev): ones, odd sizes, primes, one past a tile (65, 129, 257), L != S, Ev != E
SHAPES = [
    (1, 1, 1, 1, 1, 8, 8),
    (2, 3, 3, 5, 7, 16, 16),
    (1, 2, 2, 17, 1, 8, 8),
    (2, 4, 2, 65, 31, 32, 24),
    (1, 3, 1, 129, 257, 64, 64),
    (1, 2, 2, 300, 97, 13, 7),
]


def _inputs(shape, dtype, device, requires_grad=True):
    N, H, Hkv, L, S, E, Ev = shape
    make = lambda *s: torch.randn(*s, dtype=dtype, device=device).requires_grad_(requires_grad)
    return make(N, H, L, E), make(N, Hkv, S, E), make(N, Hkv, S, Ev)


def _masks(shape, kind, dtype, device):
    N, H, Hkv, L, S, E, Ev = shape
    if kind is None:
        return None
    if kind == "bool_full":
        return torch.rand(N, H, L, S, device=device) > 0.3
    if kind == "bool_broadcast_keys":  # key padding: (N, 1, 1, S)
        m = torch.rand(N, 1, 1, S, device=device) > 0.3
        m[..., 0] = True
        return m
    if kind == "additive_2d":
        return torch.randn(L, S, dtype=dtype, device=device)
    if kind == "additive_heads":
        return torch.randn(1, H, L, S, dtype=dtype, device=device)
    raise ValueError(kind)


def _check(shape, dtype, device, mask_kind=None, is_causal=False, fwd_tol=None, grad_tol=None):
    q, k, v = _inputs(shape, dtype, device)
    mask = _masks(shape, mask_kind, dtype, device)
    out = TF.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          enable_gqa=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = R.attention(q64, k64, v64, mask.double() if mask is not None and mask.is_floating_point() else mask,
                      is_causal=is_causal)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < fwd_tol, f"forward error {rel_err(out, ref):.3e}"
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    for name, g, w in zip("qkv", got, want):
        assert torch.isfinite(g).all(), f"d{name} has non-finite values"
        assert rel_err(g, w) < grad_tol, f"d{name} error {rel_err(g, w):.3e}"


TOLS = {torch.float64: (1e-12, 1e-5), torch.float32: (1e-5, 1e-4)}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_reference(shape, dtype, device, is_causal):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("fp64 attention is CPU-only")
    _check(shape, dtype, device, is_causal=is_causal, fwd_tol=TOLS[dtype][0], grad_tol=TOLS[dtype][1])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("mask_kind", ["bool_full", "bool_broadcast_keys", "additive_2d", "additive_heads"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_masks(mask_kind, is_causal, device):
    dtype = torch.float32 if device == "cuda" else torch.float64
    for shape in [(2, 2, 2, 33, 65, 16, 16), (1, 4, 2, 70, 70, 8, 12)]:
        _check(shape, dtype, device, mask_kind, is_causal, *TOLS[dtype])


@pytest.mark.parametrize("device", devices())
def test_fully_masked_rows_give_zero_output_and_gradient(device):
    dtype = torch.float32
    N, H, L, S, E = 2, 2, 9, 11, 8
    q, k, v = _inputs((N, H, H, L, S, E, E), dtype, device)
    bool_mask = torch.rand(N, H, L, S, device=device) > 0.5
    bool_mask[:, :, 3] = False  # row 3 sees nothing
    add_mask = torch.zeros(N, 1, L, S, device=device)
    add_mask[1, :, 5] = float("-inf")  # row 5 of batch 1, every head
    for mask, dead in [(bool_mask, (slice(None), slice(None), 3)), (add_mask, (1, slice(None), 5))]:
        out = TF.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert torch.isfinite(out).all()
        assert (out[dead] == 0).all()
        out.backward(torch.randn_like(out))
        for t in (q, k, v):
            assert torch.isfinite(t.grad).all()
        assert (q.grad[dead] == 0).all()
        q.grad = k.grad = v.grad = None
    # Under causality query 0 sees only key 0: hiding key 0 by padding empties that row.
    pad = torch.ones(1, 1, 1, S, dtype=torch.bool, device=device)
    pad[..., 0] = False
    out = TF.scaled_dot_product_attention(q, k, v, attn_mask=pad, is_causal=True)
    assert (out[:, :, 0] == 0).all() and torch.isfinite(out).all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("is_causal", [False, True])
def test_low_precision_within_2x_torch_error(dtype, device, is_causal):
    shape = (2, 4, 4, 129, 200, 64, 64)
    q, k, v = _inputs(shape, dtype, device)
    mask = torch.randn(1, 1, 129, 200, dtype=dtype, device=device)
    out = TF.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    causal_mask = torch.ones(129, 200, dtype=torch.bool, device=device).tril() if is_causal else None
    ref = R.attention(q64, k64, v64, mask.double(), is_causal=is_causal)
    # Stock torch in the same precision: SDPA with the mask (and causality folded into it).
    full_mask = mask if not is_causal else mask.masked_fill(~causal_mask, float("-inf"))
    qt, kt, vt = (t.detach().clone().requires_grad_() for t in (q, k, v))
    torch_out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=full_mask)
    assert_attention_within_torch_error(out, torch_out, ref, (q, k, v), (qt, kt, vt), (q64, k64, v64))


@pytest.mark.parametrize("device", devices())
def test_strided_inputs_without_copies(device):
    N, L, S, H, E = 2, 37, 29, 3, 16
    # (N, L, H, E) storage viewed as (N, H, L, E): the layout of a fused QKV projection.
    qkv = torch.randn(N, L, 3, H, E, device=device, dtype=torch.float64)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    k, v = k[:, :, :S], v[:, :, :S]
    out = TF.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = R.attention(q, k, v, is_causal=True)
    assert rel_err(out, ref) < 1e-12
    # The output follows the query's layout, so out.transpose(1, 2) is contiguous (N, L, H, E).
    assert out.transpose(1, 2).is_contiguous()
    # A non-unit last-dim stride is accepted too (copied internally).
    q2 = torch.randn(N, H, L, 2 * E, device=device, dtype=torch.float64)[..., ::2]
    out2 = TF.scaled_dot_product_attention(q2, k, v)
    assert rel_err(out2, R.attention(q2, k, v)) < 1e-12


@pytest.mark.parametrize("device", devices())
def test_three_dim_inputs_and_default_scale(device):
    q, k, v = (torch.randn(3, n, 8, dtype=torch.float64, device=device) for n in (5, 6, 6))
    mask = torch.rand(3, 5, 6, device=device) > 0.2
    mask[..., 0] = True
    out = TF.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert out.shape == (3, 5, 8) and rel_err(out, ref) < 1e-12
    out = TF.scaled_dot_product_attention(q, k, v, scale=0.3)
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v, scale=0.3)) < 1e-12


def _keep_mask(q, k, rng, p):
    """The dropout keep-mask the kernel draws for this rng, read back by attending to one-hot values."""
    N, H, L, E = q.shape
    S = k.shape[2]
    eye = torch.eye(S, dtype=q.dtype, device=q.device).expand(N, k.shape[1], S, S)
    probs, _ = ops.attention_fwd(q, k, eye, None, 1.0 / math.sqrt(E), False, p, rng)
    return probs != 0


@pytest.mark.parametrize("device", devices())
def test_dropout(device):
    N, H, L, S, E, p = 2, 3, 40, 50, 8, 0.3
    q, k, v = (torch.randn(N, H, n, E, dtype=torch.float64, device=device) for n in (L, S, S))
    rng = torch.tensor([1234567, 89], dtype=torch.int64)
    keep = _keep_mask(q, k, rng, p)
    assert abs(keep.double().mean().item() - (1 - p)) < 0.02
    # Same rng, same mask; the output equals the reference with that mask, and so do gradients.
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out, _ = ops.attention_fwd(qg, kg, vg, None, 1.0 / math.sqrt(E), False, p, rng)
    ref = R.attention(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(),
                      dropout_mask=keep, dropout_p=p)
    assert rel_err(out, ref) < 1e-12
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (qg, kg, vg), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5
    # A different rng gives a different mask; the functional API draws a fresh one per call.
    assert not torch.equal(keep, _keep_mask(q, k, torch.tensor([1234567, 90]), p))
    o1 = TF.scaled_dot_product_attention(q, k, v, dropout_p=p)
    o2 = TF.scaled_dot_product_attention(q, k, v, dropout_p=p)
    assert not torch.equal(o1, o2)
    torch.manual_seed(7)
    o3 = TF.scaled_dot_product_attention(q, k, v, dropout_p=p)
    torch.manual_seed(7)
    assert torch.equal(o3, TF.scaled_dot_product_attention(q, k, v, dropout_p=p))
    # p = 1 drops everything.
    assert (TF.scaled_dot_product_attention(q, k, v, dropout_p=1.0) == 0).all()


def test_gradcheck_fp64():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 5, dtype=torch.float64, requires_grad=True) for n in (4, 6, 6))
    mask = torch.randn(1, 1, 4, 6, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda q, k, v, m: TF.scaled_dot_product_attention(q, k, v, attn_mask=m),
                             (q, k, v, mask))
    torch.autograd.gradcheck(lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, is_causal=True),
                             (q, k, v))
    kv_heads = [torch.randn(1, 1, 6, 5, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    torch.autograd.gradcheck(
        lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, enable_gqa=True), (q, *kv_heads))
    rng = torch.tensor([5, 6], dtype=torch.int64)
    torch.autograd.gradcheck(lambda q, k, v: ops.attention_fwd(q, k, v, None, 0.5, False, 0.25, rng)[0],
                             (q, k, v))


def test_mask_gradient_reduces_over_broadcast_dims():
    q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64) for n in (7, 9, 9))
    mask = torch.randn(7, 9, dtype=torch.float64, requires_grad=True)
    TF.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
    ref_mask = mask.detach().clone().requires_grad_()
    R.attention(q, k, v, ref_mask).sum().backward()
    assert mask.grad.shape == mask.shape
    assert rel_err(mask.grad, ref_mask.grad) < 1e-5


def _opcheck_samples():
    q, k, v = (torch.randn(2, 4, n, 8, requires_grad=True) for n in (5, 7, 7))
    kv = [torch.randn(2, 2, 7, 8, requires_grad=True) for _ in range(2)]
    mask = torch.randn(1, 4, 5, 7)
    bmask = torch.rand(2, 1, 1, 7) > 0.3
    rng = torch.tensor([3, 4], dtype=torch.int64)
    return [
        (q, k, v, None, 0.35, False, 0.0, None),
        (q, *kv, bmask, 0.35, True, 0.0, None),
        (q, k, v, mask, 0.35, False, 0.2, rng),
        (q.transpose(1, 2).contiguous().transpose(1, 2), k, v, None, 0.35, True, 0.0, None),
    ]


@pytest.mark.parametrize("sample", range(4))
def test_opcheck(sample):
    args = _opcheck_samples()[sample]
    torch.library.opcheck(ops.attention_fwd, args)
    out, lse = ops.attention_fwd(*args)
    q, k, v, mask, scale, causal, p, rng = args
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, mask,
                scale, causal, p, rng, mask is not None and mask.is_floating_point())
    torch.library.opcheck(ops.attention_bwd, bwd_args)


def test_torch_compile_fullgraph():
    q, k, v = (torch.randn(2, 2, n, 8, requires_grad=True) for n in (9, 9, 9))
    mask = torch.randn(9, 9)

    def f(q, k, v):
        return TF.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_ref = f(q, k, v)
    grads_ref = torch.autograd.grad(loss_ref, (q, k, v))
    assert torch.allclose(loss, loss_ref)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b)


def test_autocast_runs_in_the_autocast_dtype():
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = TF.scaled_dot_product_attention(q, k, v)
        torch_out = F.scaled_dot_product_attention(q, k, v)
    assert out.dtype == torch_out.dtype == torch.bfloat16
    assert_within_torch_error(out, torch_out, R.attention(q.double(), k.double(), v.double()))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_key_padding_spanning_whole_key_blocks(device, kind):
    # Sequence 0 keeps 100 of 600 keys: whole blocks of keys are masked for every query and skipped.
    N, H, L, S, E = 2, 2, 70, 600, 16
    q, k, v = _inputs((N, H, H, L, S, E, E), torch.float64 if device == "cpu" else torch.float32, device)
    keep = torch.arange(S, device=device)[None, :] < torch.tensor([100, 600], device=device)[:, None]
    mask = keep.view(N, 1, 1, S)
    if kind == "additive":
        mask = torch.zeros(N, 1, 1, S, dtype=q.dtype, device=device).masked_fill(~mask, float("-inf"))
    out = TF.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = R.attention(q64, k64, v64, mask if kind == "bool" else mask.double())
    assert rel_err(out, ref) < 1e-5
    grad = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q64, k64, v64), grad.double())):
        assert rel_err(g, w) < 1e-4
    # Keys no query may see get exactly zero gradient.
    dk = torch.autograd.grad(TF.scaled_dot_product_attention(q, k, v, attn_mask=mask), k, grad)[0]
    assert (dk[0, :, 100:] == 0).all()
