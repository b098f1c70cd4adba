"""No silent wrong answers (issue 11): NaN/Inf propagation, true fp64, LayerNorm overflow.

References are torch's own composites or tx_kernels.reference in float64; nothing here compares
tx_kernels with itself.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import tx_kernels.functional as TF
import tx_kernels.reference as R
from tx_kernels.ops import ops

NAN, INF = float("nan"), float("inf")
f64 = torch.float64


def _nan_pattern_matches(ours, ref):
    return torch.equal(ours.isnan(), ref.isnan())


# ----------------------------------------------------------------------------------------------
# Finding 1: attention turned NaN into zeros once S >= 16 (the vector max path dropped the NaN,
# then the "row sum is not positive" test called the row fully masked).
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("S", [4, 16, 33, 300])
@pytest.mark.parametrize("where", ["q", "k", "v", "mask", "scale"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_nan_propagates_like_torch(S, where, dtype):
    torch.manual_seed(S)
    q, k, v = (torch.randn(2, 2, n, 8, dtype=dtype) for n in (5, S, S))
    mask = torch.randn(5, S, dtype=dtype)
    scale = 0.4
    if where == "q":
        q[1, 0, 2, 3] = NAN
    elif where == "k":
        k[0, 1, S // 2, 0] = NAN
    elif where == "v":
        v[0, 0, S - 1, 5] = NAN
    elif where == "mask":
        mask[3, S // 3] = NAN
    else:
        scale = NAN
    args = [t.clone().requires_grad_() for t in (q, k, v, mask)]
    ours = TF.scaled_dot_product_attention(*args[:3], attn_mask=args[3], scale=scale)
    ref_args = [t.detach().double().requires_grad_() for t in (q, k, v, mask)]
    ref = F.scaled_dot_product_attention(*ref_args[:3], attn_mask=ref_args[3], scale=scale)
    assert ref.isnan().any()
    assert _nan_pattern_matches(ours, ref), f"NaN at {ours.isnan().sum()} places, torch {ref.isnan().sum()}"
    g = torch.randn_like(ref)
    ours_g = torch.autograd.grad(ours, args, g.to(dtype))
    ref_g = torch.autograd.grad(ref, ref_args, g)
    for name, a, b in zip(("query", "key", "value", "attn_mask"), ours_g, ref_g):
        # torch also spreads NaN through exactly-zero probabilities (0 * NaN); we must be NaN
        # wherever... at least somewhere torch is, and never where torch is finite.
        if b.isnan().any():
            assert a.isnan().any(), f"d{name}: finite where torch's gradient is NaN"
        assert not (a.isnan() & ~b.isnan()).any(), f"d{name}: NaN where torch's gradient is finite"


@pytest.mark.parametrize("S", [4, 40])
def test_fully_masked_row_is_zero_even_with_nan_elsewhere(S):
    """The fully-masked rule comes from the mask: such a row is 0 while NaN poisons the others."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, dtype=f64) for n in (6, S, S))
    k[0, 0, 1, 1] = NAN
    for mask in (torch.ones(6, S, dtype=torch.bool), torch.zeros(6, S, dtype=f64)):
        if mask.dtype == torch.bool:
            mask[2] = False
        else:
            mask[2] = -INF
        qg = q.clone().requires_grad_()
        out = TF.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
        assert torch.equal(out[0, :, 2], torch.zeros_like(out[0, :, 2]))
        assert out[0, 0, [0, 1, 3, 4, 5]].isnan().all()  # head 0 sees the NaN key
        assert not out[0, 1].isnan().any()  # head 1 does not
        (gq,) = torch.autograd.grad(out.nan_to_num().sum(), qg)
        assert torch.equal(gq[0, :, 2], torch.zeros_like(gq[0, :, 2]))


def test_attention_all_scores_minus_inf_is_nan_not_masked():
    """A row whose allowed scores are all -inf (Inf inputs, not the mask) is NaN, as in torch's
    composite softmax(q k^T) v (F.scaled_dot_product_attention's math path now returns 0 for any
    all -inf row; the fully-masked-row rule here is the mask's alone)."""
    q = torch.full((1, 1, 2, 4), 1.0, dtype=f64)
    k = torch.full((1, 1, 3, 4), -INF, dtype=f64)
    v = torch.randn(1, 1, 3, 4, dtype=f64)
    ours = TF.scaled_dot_product_attention(q, k, v)
    ref = torch.softmax(q @ k.transpose(-1, -2) * 0.5, -1) @ v
    assert ref.isnan().all() and ours.isnan().all()


@pytest.mark.parametrize("scale", [INF, -INF, NAN])
def test_attention_non_finite_scale(scale):
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, n, 8) for n in (3, 20, 20))
    ours = TF.scaled_dot_product_attention(q, k, v, scale=scale)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
    assert _nan_pattern_matches(ours, ref)


# ----------------------------------------------------------------------------------------------
# Finding 4: fp64 was only fp32-accurate (weights, biases, eps, statistics, logsumexp in fp32).
# ----------------------------------------------------------------------------------------------
def test_fp64_bias_is_not_rounded_to_fp32():
    out = TF.bias_relu(torch.zeros(3, dtype=f64), torch.full((3,), 0.1, dtype=f64))
    assert torch.equal(out, torch.full((3,), 0.1, dtype=f64))
    out = TF.bias_act(torch.zeros(2, 5, dtype=f64), torch.full((5,), 0.1, dtype=f64), "gelu")
    assert torch.equal(out, R.gelu(torch.full((2, 5), 0.1, dtype=f64)))


def test_fp64_statistics_and_logsumexp_are_fp64():
    x = torch.randn(4, 8, dtype=f64)
    _, mean, rstd = ops.layer_norm_fwd(x, None, None, 1, 1e-5)
    assert mean.dtype == rstd.dtype == f64
    torch.testing.assert_close(mean, x.mean(-1), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(rstd, (x.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-14, atol=0)
    q = torch.randn(1, 2, 3, 4, dtype=f64)
    _, lse = ops.attention_fwd(q, q, q, None, 0.5, False, 0.0, None)
    assert lse.dtype == f64
    torch.testing.assert_close(lse, torch.logsumexp(0.5 * q @ q.transpose(-1, -2), -1), rtol=1e-14, atol=0)


def test_fp64_layer_norm_matches_fp64_reference_to_fp64_accuracy():
    torch.manual_seed(0)
    x = torch.randn(6, 37, dtype=f64) * 3 + 1
    w, b = torch.randn(37, dtype=f64), torch.randn(37, dtype=f64)
    eps = 1.2345678912345e-3  # not representable in fp32
    torch.testing.assert_close(TF.layer_norm(x, (37,), w, b, eps), R.layer_norm(x, w, b, eps),
                               rtol=1e-13, atol=1e-13)


def test_fp64_attention_grads_are_fp64_accurate():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 6, dtype=f64, requires_grad=True) for n in (9, 130, 130))
    mask = torch.randn(9, 130, dtype=f64, requires_grad=True)
    out = TF.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref = R.attention(q, k, v, attn_mask=mask)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v, mask), g), torch.autograd.grad(ref, (q, k, v, mask), g)):
        assert ((a - b).norm() / b.norm()).item() < 1e-12


_GC = dict(dtype=f64, requires_grad=True)


def _gc(fn, *args):
    assert gradcheck(fn, args)  # default tolerances


def test_gradcheck_layer_norm_every_argument():
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 2, 5, **_GC), torch.randn(2, 5, **_GC), torch.randn(2, 5, **_GC)
    _gc(lambda x, w, b: TF.layer_norm(x, (2, 5), w, b, 1e-3), x, w, b)


@pytest.mark.parametrize("return_residual", [True, False])
def test_gradcheck_add_layer_norm_every_argument(return_residual):
    torch.manual_seed(0)
    x, r, w, b = torch.randn(4, 7, **_GC), torch.randn(4, 7, **_GC), torch.randn(7, **_GC), torch.randn(7, **_GC)
    _gc(lambda x, r, w, b: TF.add_layer_norm(x, r, (7,), w, b, return_residual=return_residual), x, r, w, b)


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh"])
def test_gradcheck_bias_act_every_argument(act):
    torch.manual_seed(0)
    x, b = torch.randn(5, 9, **_GC), torch.randn(9, **_GC)
    _gc(lambda x, b: TF.bias_act(x, b, act), x, b)
    rng = torch.tensor([5, 6])  # fixed: gradcheck calls the function many times
    _gc(lambda x, b: ops.bias_act_fwd(x, b, act, 0.3, rng), x, b)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_attention_every_argument(causal):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 5, 3, **_GC), torch.randn(1, 2, 6, 3, **_GC), torch.randn(1, 2, 6, 2, **_GC)
    mask = torch.randn(4, 1, 6, **_GC)
    _gc(lambda q, k, v, m: TF.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal,
                                                           enable_gqa=True), q, k, v, mask)
    rng = torch.tensor([7, 8])
    _gc(lambda q, k, v, m: ops.attention_fwd(q, k, v, m, 0.7, causal, 0.25, rng)[0], q, k, v, mask)


def test_gradcheck_feed_forward_every_argument():
    torch.manual_seed(0)
    x, w1, b1, w2, b2 = (torch.randn(*s, **_GC) for s in ((3, 4), (6, 4), (6,), (5, 6), (5,)))
    _gc(lambda *a: TF.feed_forward(*a, activation="gelu"), x, w1, b1, w2, b2)


# ----------------------------------------------------------------------------------------------
# Finding 5: fp32 LayerNorm whose variance overflows returned zeros (rstd = 1/sqrt(inf) = 0).
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cols", [64, 768])
def test_layer_norm_variance_overflow_is_not_finite(cols):
    torch.manual_seed(0)
    x = torch.randn(2, cols) * 1e20  # variance ~1e40 > fp32 max
    assert not torch.isfinite(TF.layer_norm(x, (cols,))).any()
    out, _ = TF.add_layer_norm(x, x, (cols,), torch.ones(cols), torch.zeros(cols))
    assert not torch.isfinite(out).any()


@pytest.mark.parametrize("cols", [64, 768])
def test_layer_norm_sum_of_squares_overflow_with_representable_variance(cols):
    """Values near 1e18: the variance (1e36) fits fp32, the sum of squares does not."""
    torch.manual_seed(0)
    y = (torch.randn(2, cols) * 1e18).double()
    ours = TF.layer_norm(y.float(), (cols,)).double()
    torch.testing.assert_close(ours, R.layer_norm(y), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# The minor findings
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_add_layer_norm_row_constant_after_rounding_gives_the_bias(dtype):
    """x + r rounds to x, while r itself varies (0 <= r < half an ulp of x)."""
    cols = 64
    torch.manual_seed(0)
    big = 4096.0 if dtype == torch.float16 else 65536.0  # ulp 4 (fp16) / 512 (bf16)
    x = torch.full((3, cols), big, dtype=dtype)
    half_ulp = 1.9 if dtype == torch.float16 else 250.0
    r = (torch.rand(3, cols) * half_ulp).to(dtype)  # positive: below `big` the ulp halves
    assert ((x + r) == x).all()
    b = torch.randn(cols).to(dtype)
    out, _ = TF.add_layer_norm(x, r, (cols,), torch.ones(cols, dtype=dtype), b)
    assert torch.equal(out, b.expand(3, cols))


def test_gelu_tanh_of_minus_inf_is_nan_as_torch():
    x = torch.tensor([-INF, INF, NAN, -3.0, 2.0])
    for dtype in (torch.float32, torch.float64):
        ours = TF.bias_gelu(x.to(dtype), None, approximate="tanh")
        ref = F.gelu(x.double(), approximate="tanh")
        assert _nan_pattern_matches(ours, ref)
        assert torch.equal(ours.isinf(), ref.isinf())


def test_relu_gradient_at_nan_is_passed_through_as_torch():
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor([NAN, 1.0, -1.0, 0.0] * 8, dtype=dtype, requires_grad=True)
        TF.bias_relu(x, None).backward(torch.full_like(x, 2.0))
        x2 = x.detach().clone().requires_grad_()
        F.relu(x2).backward(torch.full_like(x2, 2.0))
        assert torch.equal(x.grad, x2.grad)


# ----------------------------------------------------------------------------------------------
# Finding 8: bf16/fp16 attention gradients at tiny head dims were up to 80x less accurate than
# torch's math backend (which upcasts): the softmax correction term came from the rounded output.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("L,S,E,Ev,group,causal", [(3, 33, 1, 1, 2, True), (11, 34, 16, 1, 1, True),
                                                   (16, 40, 1, 1, 1, False), (9, 20, 2, 3, 2, False)])
def test_low_precision_attention_grads_within_2x_of_torch_math_at_tiny_head_dims(dtype, L, S, E, Ev,
                                                                                group, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(2, 2 * group, L, E, generator=gen, dtype=f64)
        k = torch.randn(2, 2, S, E, generator=gen, dtype=f64)
        v = torch.randn(2, 2, S, Ev, generator=gen, dtype=f64)
        mask = torch.randn(1, 2 * group, L, S, generator=gen, dtype=f64)
        if causal:
            mask = mask.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), -INF)
        g = torch.randn(2, 2 * group, L, Ev, generator=gen, dtype=f64)

        def grads(fn, dt):
            ts = [t.to(dt).requires_grad_() for t in (q, k, v)]
            out = fn(*ts, mask.to(dt))
            return torch.autograd.grad(out, ts, g.to(dt))

        ref = grads(lambda a, b, c, m: R.attention(a, b, c, attn_mask=m), f64)
        ours = grads(lambda a, b, c, m: TF.scaled_dot_product_attention(a, b, c, attn_mask=m, enable_gqa=True), dtype)
        with sdpa_kernel(SDPBackend.MATH):
            math_ = grads(lambda a, b, c, m: F.scaled_dot_product_attention(a, b, c, attn_mask=m, enable_gqa=True),
                          dtype)
        for a, t, r in zip(ours, math_, ref):
            e_ours = (a.double() - r).abs().max().item()
            e_torch = (t.double() - r).abs().max().item()
            assert e_ours <= 2 * e_torch + 1e-6, f"seed {seed}: {e_ours:.3e} vs torch math {e_torch:.3e}"
