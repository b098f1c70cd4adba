"""tx_kernels bias + activation (+ dropout), forward and backward, against float64 references."""
import math

import pytest
import torch
import torch.nn.functional as F

import tx_kernels.functional as TF
from tx_kernels import reference as R
from tx_kernels.ops import ops

from conftest import assert_within_torch_error, devices, max_abs_err, rel_err

ACTS = ["relu", "gelu", "gelu_tanh"]




def _torch_act(x, act):
    if act == "relu":
        return F.relu(x)
    return F.gelu(x, approximate="tanh" if act == "gelu_tanh" else "none")


def _away_from_kinks(x, act):
    # relu has a kink at 0; keep finite-difference and rounding tests away from it.
    if act == "relu":
        return torch.where(x >= 0, x + 0.05, x - 0.05)
    return x




# ----------------------------------------------------------------------------------------------
# Forward / backward against float64
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("cols", [1, 7, 31, 768, 1023, 2053])  # 2053 > one 2048-column tile
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_backward_match_reference(device, dtype, act, cols, with_bias, poison):
    x = (torch.randn(3, 11, cols, dtype=dtype, device=device) * 3).requires_grad_()
    b = torch.randn(cols, dtype=dtype, device=device).requires_grad_() if with_bias else None
    out = TF.bias_act(x, b, act)
    xr = x.detach().double().requires_grad_()
    br = b.detach().double().requires_grad_() if with_bias else None
    out_ref = R.bias_act(xr, br, act)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, out_ref) < 1e-5, rel_err(out, out_ref)

    g = torch.randn_like(out)
    leaves = (x, b) if with_bias else (x,)
    leaves_ref = (xr, br) if with_bias else (xr,)
    grads = torch.autograd.grad(out, leaves, g)
    grads_ref = torch.autograd.grad(out_ref, leaves_ref, g.double())
    for a, e in zip(grads, grads_ref):
        assert a.dtype == dtype and a.shape == e.shape
        assert rel_err(a, e) < 1e-4, rel_err(a, e)


@pytest.mark.parametrize("cols,dtype", [(4096, torch.float32), (1023, torch.float32), (4096, torch.bfloat16)])
def test_large_streaming_store_path(cols, dtype, poison):
    # Outputs of 8 MiB or more use non-temporal stores (aligned tiles only; 1023 mixes both).
    rows = (8 << 20) // (cols * torch.tensor([], dtype=dtype).element_size()) + 3
    x = (torch.randn(rows, cols) * 2).to(dtype)
    b = torch.randn(cols)
    g = torch.randn(rows, cols).to(dtype)
    out = ops.bias_act_fwd(x, b, "gelu_tanh", 0.0, None)
    gx, gb = ops.bias_act_bwd(g, x, b, "gelu_tanh", 0.0, None)
    xr, br = x.double().requires_grad_(), b.double().requires_grad_()
    ref = R.bias_act(xr, br, "gelu_tanh")
    gx_ref, gb_ref = torch.autograd.grad(ref, (xr, br), g.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(out, ref) < tol and rel_err(gx, gx_ref) < 10 * tol and rel_err(gb, gb_ref) < 10 * tol
    drop = ops.bias_act_fwd(x, b, "relu", 0.5, torch.tensor([9, 9]))
    keep = R.dropout_keep_mask(9, 9, x.numel(), 0.5).reshape(x.shape)
    assert torch.equal(drop, torch.where(keep, (F.relu(x.float() + b) * 2).to(dtype), torch.zeros((), dtype=dtype)))


@pytest.mark.parametrize("act", ACTS)
def test_activation_accuracy_full_range(act):
    # Every fp32 input range the polynomial exp/erf must cover, including saturation and overflow.
    v = torch.cat([torch.linspace(-20, 20, 40001), torch.tensor([-1e4, -90.0, -50.0, 50.0, 90.0, 1e4, 0.0])])
    out = ops.bias_act_fwd(v, None, act, 0.0, None)
    ref = R.bias_act(v.double(), None, act)
    big = ref.abs() > 1e-2
    rel = (out.double() - ref).abs() / ref.abs()
    # Exact GELU uses the erf approximation of at::vec (Abramowitz & Stegun 7.1.26, absolute error
    # 1.5e-7): for negative v, 1 + erf(v / sqrt2) is small and that absolute error becomes up to
    # ~3e-5 relative (torch's own fp32 GELU has the same); elsewhere a few ulp.
    tol = 5e-5 if act == "gelu" else 1e-6
    assert (rel[big] < tol).all(), v[big][rel[big] >= tol][:5]
    assert_within_torch_error(out, _torch_act(v, act), ref, atol=1e-7, name=act)
    g = ops.bias_act_bwd(torch.ones_like(v), v, None, act, 0.0, None)[0]
    vr = v.double().requires_grad_()
    (g_ref,) = torch.autograd.grad(R.bias_act(vr, None, act).sum(), vr)
    if act == "relu":
        # At exactly 0 the reference's clamp_min passes the gradient; torch.relu (and we) do not.
        assert g[v == 0].eq(0).all()
        vr0 = torch.tensor([0.0], requires_grad=True)
        torch.relu(vr0).backward()
        assert vr0.grad.item() == 0.0
        g, g_ref = g[v != 0], g_ref[v != 0]
        v = v[v != 0]
    vt = v.clone().requires_grad_()
    (g_torch,) = torch.autograd.grad(_torch_act(vt, act).sum(), vt)
    assert_within_torch_error(g, g_torch, g_ref, atol=1e-6, name=f"{act}'")


@pytest.mark.parametrize("act", ACTS)
def test_nan_propagates(act):
    v = torch.tensor([float("nan"), 1.0, -1.0, float("nan")] * 5)
    out = ops.bias_act_fwd(v, None, act, 0.0, None)
    assert torch.equal(out.isnan(), v.isnan())


def test_gradcheck_fp64():
    # The bias reaches the kernel as fp32 (params.h): a finite-difference step of 1e-3 keeps its
    # rounding (~1e-7 / 1e-3) well inside gradcheck's tolerance.
    for act in ACTS:
        x = _away_from_kinks(torch.randn(4, 9, dtype=torch.float64), act).requires_grad_()
        b = torch.zeros(9, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, b: TF.bias_act(x, b, act), (x, b), eps=1e-3, atol=1e-4)
        assert torch.autograd.gradcheck(lambda x: TF.bias_act(x, None, act), (x,), eps=1e-6)


def test_functional_wrappers():
    x = torch.randn(5, 33)
    b = torch.randn(33)
    assert torch.equal(TF.bias_gelu(x, b), TF.bias_act(x, b, "gelu"))
    assert torch.equal(TF.bias_gelu(x, b, approximate="tanh"), TF.bias_act(x, b, "gelu_tanh"))
    assert torch.equal(TF.bias_relu(x, b), TF.bias_act(x, b, "relu"))
    assert torch.equal(TF.bias_relu(x, b), F.relu(x + b))


def test_empty():
    x = torch.randn(0, 5, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    out = TF.bias_act(x, b, "gelu")
    out.sum().backward()
    assert out.shape == (0, 5) and torch.equal(b.grad, torch.zeros(5))


# ----------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ACTS)
def test_noncontiguous_same_answer(act, poison):
    base = torch.randn(20, 7, 300)
    b = torch.randn(256)
    views = [base[:, :, 10:266],                          # strided rows, no copy
             torch.randn(7, 20, 256).transpose(0, 1),     # copied by the binding
             torch.randn(20, 512)[:, ::2]]                # non-unit last stride
    for v in views:
        bb = b if v.shape[-1] == 256 else None
        assert torch.equal(TF.bias_act(v, bb, act), TF.bias_act(v.contiguous(), bb, act))
        g = torch.randn(v.shape)
        ga = ops.bias_act_bwd(g, v, bb, act, 0.0, None)
        gc = ops.bias_act_bwd(g, v.contiguous(), bb, act, 0.0, None)
        assert all(torch.equal(p, q) for p, q in zip(ga, gc))


# ----------------------------------------------------------------------------------------------
# Low precision
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ACTS)
def test_low_precision_within_torch_error(dtype, act, poison):
    x = _away_from_kinks(torch.randn(16, 1031) * 2, act).to(dtype).requires_grad_()
    b = (torch.randn(1031) * 0.5).to(dtype).requires_grad_()
    g = torch.randn(16, 1031).to(dtype)
    out = TF.bias_act(x, b, act)
    ours = torch.autograd.grad(out, (x, b), g)
    out_t = _torch_act(x + b, act)
    theirs = torch.autograd.grad(out_t, (x, b), g)
    xr, br = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    out_ref = R.bias_act(xr, br, act)
    refs = torch.autograd.grad(out_ref, (xr, br), g.double())
    assert out.dtype == dtype
    assert_within_torch_error(out, out_t, out_ref, name="out")
    for name, a, t, e in zip(("input", "bias"), ours, theirs, refs):
        assert a.dtype == dtype
        assert_within_torch_error(a, t, e, atol=1e-3 * e.abs().max().item(), name=f"grad {name}")


# ----------------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,p", [((3, 5), 0.5), ((7, 2051), 0.3), ((2, 4099), 0.9), ((64, 768), 0.1)])
def test_dropout_mask_is_philox_h(shape, p, poison):
    # Odd row lengths put Philox groups across rows and tiles; large seed/offset use the high words.
    for seed, offset in ((123, 0), (2**63 - 5, 2**40 + 17), (-(2**62), 3)):
        rng = torch.tensor([seed, offset], dtype=torch.int64)
        x = torch.rand(shape) + 1.0  # relu(x) = x > 0: output is 0 exactly where dropped
        out = ops.bias_act_fwd(x, None, "relu", p, rng)
        keep = R.dropout_keep_mask(seed, offset, x.numel(), p).reshape(shape)
        assert torch.equal(out != 0, keep)
        assert torch.allclose(out, x * keep / (1 - p), rtol=1e-6, atol=0)


@pytest.mark.parametrize("act", ACTS)
def test_dropout_backward_regenerates_mask(act):
    x = _away_from_kinks(torch.randn(9, 517), act).requires_grad_()
    b = torch.randn(517, requires_grad=True)
    torch.manual_seed(7)
    out = TF.bias_act(x, b, act, dropout_p=0.4)
    g = torch.randn_like(out)
    gx, gb = torch.autograd.grad(out, (x, b), g)
    # Rebuild the same draw: the functional draws [seed, offset] from torch's generator.
    torch.manual_seed(7)
    rng = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64)
    keep = R.dropout_keep_mask(int(rng[0]), int(rng[1]), x.numel(), 0.4).reshape(x.shape)
    xr, br = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    out_ref = R.bias_act(xr, br, act) * keep / 0.6
    assert rel_err(out, out_ref) < 1e-5
    gx_ref, gb_ref = torch.autograd.grad(out_ref, (xr, br), g.double())
    assert rel_err(gx, gx_ref) < 1e-4 and rel_err(gb, gb_ref) < 1e-4


def test_dropout_statistics_and_edge_probabilities():
    x = torch.rand(256, 4096) + 1.0
    n = x.numel()
    for p in (0.1, 0.5, 0.9):
        out = TF.bias_act(x, None, "relu", dropout_p=p)
        kept = (out != 0).double().mean().item()
        assert abs(kept - (1 - p)) < 6 * math.sqrt(p * (1 - p) / n), (p, kept)
        # kept values are scaled so the expectation is unchanged
        assert torch.allclose(out[out != 0], (x / (1 - p))[out != 0])
    xg = x.clone().requires_grad_()
    out = TF.bias_act(xg, None, "gelu", dropout_p=1.0)
    assert torch.equal(out, torch.zeros_like(out))
    out.backward(torch.ones_like(out))
    assert torch.equal(xg.grad, torch.zeros_like(x))
    # p = 0 with an rng is plain activation
    assert torch.equal(ops.bias_act_fwd(x, None, "gelu", 0.0, torch.tensor([1, 2])), TF.bias_act(x, None, "gelu"))


def test_dropout_same_rng_same_output():
    x = torch.randn(33, 301)
    rng = torch.tensor([42, 1000], dtype=torch.int64)
    a = ops.bias_act_fwd(x, None, "gelu", 0.25, rng)
    assert torch.equal(a, ops.bias_act_fwd(x, None, "gelu", 0.25, rng.clone()))
    assert not torch.equal(a, ops.bias_act_fwd(x, None, "gelu", 0.25, torch.tensor([42, 1001])))
    assert not torch.equal(a, ops.bias_act_fwd(x, None, "gelu", 0.25, torch.tensor([43, 1000])))
    torch.manual_seed(3)
    c = TF.bias_act(x, None, "gelu", dropout_p=0.25)
    torch.manual_seed(3)
    assert torch.equal(c, TF.bias_act(x, None, "gelu", dropout_p=0.25))
    assert not torch.equal(c, TF.bias_act(x, None, "gelu", dropout_p=0.25))  # fresh draw


# ----------------------------------------------------------------------------------------------
# Determinism of grad_bias
# ----------------------------------------------------------------------------------------------
def test_grad_bias_deterministic_across_runs_and_threads():
    x = torch.randn(999, 301)
    b = torch.randn(301)
    g = torch.randn_like(x)
    first = ops.bias_act_bwd(g, x, b, "gelu_tanh", 0.0, None)
    n = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            res = ops.bias_act_bwd(g, x, b, "gelu_tanh", 0.0, None)
            assert torch.equal(res[0], first[0]) and torch.equal(res[1], first[1])
    finally:
        torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------
def test_opcheck():
    x = torch.randn(5, 3, 40, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    rng = torch.tensor([5, 6], dtype=torch.int64)
    for act in ACTS:
        torch.library.opcheck(ops.bias_act_fwd, (x, b, act, 0.0, None))
    torch.library.opcheck(ops.bias_act_fwd, (x, None, "gelu", 0.3, rng))
    g = torch.randn(5, 3, 40)
    torch.library.opcheck(ops.bias_act_bwd, (g, x.detach(), b.detach(), "gelu_tanh", 0.0, None))
    torch.library.opcheck(ops.bias_act_bwd, (g, x.detach(), None, "relu", 0.3, rng))


def test_torch_compile_fullgraph():
    def f(x, b):
        return TF.bias_gelu(x, b, approximate="tanh") + TF.bias_act(x * 2, None, "relu", dropout_p=0.0)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 24, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    out = compiled(x, b)
    expected = f(x, b)
    assert torch.allclose(out, expected)
    g = torch.randn_like(out)
    for a, e in zip(torch.autograd.grad(out, (x, b), g), torch.autograd.grad(expected, (x, b), g)):
        assert torch.allclose(a, e, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------
def test_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="input"):
        TF.bias_act(torch.ones(4, 8, dtype=torch.int64), None, "relu")
    with pytest.raises(ValueError, match="activation"):
        TF.bias_act(x, None, "swish")
    with pytest.raises(ValueError, match="activation"):
        ops.bias_act_fwd(x, None, "swish", 0.0, None)
    with pytest.raises(ValueError, match="approximate"):
        TF.bias_gelu(x, None, approximate="fast")
    with pytest.raises(ValueError, match="bias"):
        TF.bias_act(x, torch.randn(7), "relu")
    with pytest.raises(ValueError, match="bias"):
        TF.bias_act(x, torch.randn(2, 8), "relu")
    with pytest.raises(TypeError, match="bias"):
        TF.bias_act(x, torch.ones(8, dtype=torch.int32), "relu")
    with pytest.raises(ValueError, match="dropout_p"):
        TF.bias_act(x, None, "relu", dropout_p=1.5)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.bias_act_fwd(x, None, "relu", -0.1, None)
    with pytest.raises(ValueError, match="rng"):
        ops.bias_act_fwd(x, None, "relu", 0.5, None)
    with pytest.raises(ValueError, match="rng"):
        ops.bias_act_fwd(x, None, "relu", 0.5, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="grad_out"):
        ops.bias_act_bwd(torch.randn(4, 7), x, None, "relu", 0.0, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a CUDA device")
def test_device_mismatch():
    with pytest.raises(ValueError, match="bias"):
        TF.bias_act(torch.randn(4, 8), torch.randn(8, device="cuda"), "relu")
