"""bias + activation (+ dropout), forward and backward, against float64 references, on every
backend (tests/cuda_backends.py): the CPU kernels, the CUDA kernels (csrc/kernels/bias_act.cu)
emulated on the CPU, and a GPU when present.

fp32 within 1e-5 (forward) and 1e-4 (gradients) relative to tx_kernels/reference.py in float64;
fp16/bf16 against the fp32 reference with a max error at most 2x stock torch's in the same
precision (README, "Testing"); outputs poisoned with NaN before every launch; the bias gradient
bit-identical over reruns; the dropout mask equal to an independent Python Philox (philox.h) and,
on the CUDA kernels, to the CPU kernel's mask.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import tx_kernels.functional as TF
from tx_kernels import reference as R
from tx_kernels._activations import KERNEL as KERNEL_ACTIVATIONS

from conftest import assert_within_torch_error, check_low, check_rel_err, leaf, rel_err
from cuda_backends import (BE, CPU_OPS, CUDA_WIDTHS, fp64_on_cpu, philox_keep, poison_outputs, registered_ops,
                           rows_for)

pytestmark = pytest.mark.usefixtures("backend")

ACTS = ["relu", "gelu", "gelu_tanh"]
LOW = [torch.float16, torch.bfloat16]
DTYPES = [torch.float32] + LOW


def _torch_act(x, act):
    """Stock torch's function for a kernel activation name (the table tx_kernels itself reads)."""
    return KERNEL_ACTIVATIONS[act](x)


def _away_from_kinks(x, act):
    # relu has a kink at 0; keep finite-difference and rounding tests away from it.
    if act == "relu":
        return torch.where(x >= 0, x + 0.05, x - 0.05)
    return x


# ----------------------------------------------------------------------------------------------
# Forward / backward against float64
# ----------------------------------------------------------------------------------------------
@fp64_on_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("cols", [1, 7, 31, 768, 1023, 2053])  # 2053 > one 2048-column tile
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_backward_match_reference(dtype, act, cols, with_bias):
    device = BE.device
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
    grads_ref = torch.autograd.grad(out_ref, leaves_ref, g.double(), retain_graph=True)
    for a, e in zip(grads, grads_ref):
        assert a.dtype == dtype and a.shape == e.shape
    assert rel_err(grads[0], grads_ref[0]) < 1e-4, rel_err(grads[0], grads_ref[0])
    if with_bias:
        # grad_bias sums g * act'(v) over the rows; where that sum nearly cancels (a few columns,
        # 33 rows) any fp32 sum is off by more than 1e-4 of the result, so the error is measured
        # against the sum of the terms' magnitudes, the scale fp32 rounding works at.
        (slope,) = torch.autograd.grad(out_ref.sum(), xr)
        magnitude = (g.double() * slope).abs().reshape(-1, cols).sum(0)
        err = (grads[1].double() - grads_ref[1]).norm().item() / (magnitude.norm().item() or 1.0)
        assert err < 1e-4, err


@pytest.mark.backends("cpu")  # the CPU kernels' non-temporal stores
@pytest.mark.parametrize("cols,dtype", [(4096, torch.float32), (1023, torch.float32), (4096, torch.bfloat16)])
def test_large_streaming_store_path(cols, dtype):
    # Outputs of 8 MiB or more use non-temporal stores (aligned tiles only; 1023 mixes both).
    rows = (8 << 20) // (cols * torch.tensor([], dtype=dtype).element_size()) + 3
    x = (torch.randn(rows, cols) * 2).to(dtype)
    b = torch.randn(cols)
    g = torch.randn(rows, cols).to(dtype)
    out = BE.ops.bias_act_fwd(x, b, "gelu_tanh", 0.0, None)
    gx, gb = BE.ops.bias_act_bwd(g, x, b, "gelu_tanh", 0.0, None)
    xr, br = x.double().requires_grad_(), b.double().requires_grad_()
    ref = R.bias_act(xr, br, "gelu_tanh")
    gx_ref, gb_ref = torch.autograd.grad(ref, (xr, br), g.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(out, ref) < tol and rel_err(gx, gx_ref) < 10 * tol and rel_err(gb, gb_ref) < 10 * tol
    drop = BE.ops.bias_act_fwd(x, b, "relu", 0.5, torch.tensor([9, 9]))
    keep = R.dropout_keep_mask(9, 9, x.numel(), 0.5).reshape(x.shape)
    assert torch.equal(drop, torch.where(keep, (F.relu(x.float() + b) * 2).to(dtype), torch.zeros((), dtype=dtype)))


# The CPU kernels' polynomial exp/erf (at::vec); the CUDA kernels use the CUDA math library's
# functions, whose accuracy the emulator does not model (it runs the accurate host functions).
@pytest.mark.backends("cpu")
@pytest.mark.parametrize("act", ACTS)
def test_activation_accuracy_full_range(act):
    # Every fp32 input range the polynomial exp/erf must cover, including saturation and overflow.
    v = torch.cat([torch.linspace(-20, 20, 40001), torch.tensor([-1e4, -90.0, -50.0, 50.0, 90.0, 1e4, 0.0])])
    out = BE.ops.bias_act_fwd(v, None, act, 0.0, None)
    ref = R.bias_act(v.double(), None, act)
    big = ref.abs() > 1e-2
    rel = (out.double() - ref).abs() / ref.abs()
    # Exact GELU uses the erf approximation of at::vec (Abramowitz & Stegun 7.1.26, absolute error
    # 1.5e-7): for negative v, 1 + erf(v / sqrt2) is small and that absolute error becomes up to
    # ~3e-5 relative (torch's own fp32 GELU has the same); elsewhere a few ulp.
    tol = 5e-5 if act == "gelu" else 1e-6
    assert (rel[big] < tol).all(), v[big][rel[big] >= tol][:5]
    assert_within_torch_error(out, _torch_act(v, act), ref, atol=1e-7, name=act)
    g = BE.ops.bias_act_bwd(torch.ones_like(v), v, None, act, 0.0, None)[0]
    vr = v.double().requires_grad_()
    (g_ref,) = torch.autograd.grad(R.bias_act(vr, None, act).sum(), vr)
    if act == "relu":
        # torch.relu's derivative at exactly 0 is 0 (torch.randn draws an exact 0 about once in
        # 1e7 values, so a reference with another subgradient fails at random).
        assert g[v == 0].eq(0).all() and g_ref[v == 0].eq(0).all()
    vt = v.clone().requires_grad_()
    (g_torch,) = torch.autograd.grad(_torch_act(vt, act).sum(), vt)
    assert_within_torch_error(g, g_torch, g_ref, atol=1e-6, name=f"{act}'")


@pytest.mark.parametrize("act", ACTS)
def test_nan_propagates(act):
    v = torch.tensor([float("nan"), 1.0, -1.0, float("nan")] * 5, device=BE.device)
    out = BE.ops.bias_act_fwd(v, None, act, 0.0, None)
    assert torch.equal(out.isnan(), v.isnan())


@pytest.mark.backends("cpu")  # fp64: the CPU kernels only
def test_gradcheck_fp64():
    # The bias reaches the kernel as fp32 (params.h): a finite-difference step of 1e-3 keeps its
    # rounding (~1e-7 / 1e-3) well inside gradcheck's tolerance.
    for act in ACTS:
        x = _away_from_kinks(torch.randn(4, 9, dtype=torch.float64), act).requires_grad_()
        b = torch.zeros(9, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, b: TF.bias_act(x, b, act), (x, b), eps=1e-3, atol=1e-4)
        assert torch.autograd.gradcheck(lambda x: TF.bias_act(x, None, act), (x,), eps=1e-6)


def test_functional_wrappers():
    x = torch.randn(5, 33, device=BE.device)
    b = torch.randn(33, device=BE.device)
    assert torch.equal(TF.bias_gelu(x, b), TF.bias_act(x, b, "gelu"))
    assert torch.equal(TF.bias_gelu(x, b, approximate="tanh"), TF.bias_act(x, b, "gelu_tanh"))
    assert torch.equal(TF.bias_relu(x, b), TF.bias_act(x, b, "relu"))
    assert torch.equal(TF.bias_relu(x, b), F.relu(x + b))


def test_empty():
    x = torch.randn(0, 5, device=BE.device, requires_grad=True)
    b = torch.randn(5, device=BE.device, requires_grad=True)
    out = TF.bias_act(x, b, "gelu")
    out.sum().backward()
    assert out.shape == (0, 5) and torch.equal(b.grad, torch.zeros(5, device=BE.device))


# ----------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ACTS)
def test_noncontiguous_same_answer(act):
    dev = BE.device
    base = torch.randn(20, 7, 300, device=dev)
    b = torch.randn(256, device=dev)
    views = [base[:, :, 10:266],                                 # strided rows, no copy
             torch.randn(7, 20, 256, device=dev).transpose(0, 1),  # copied by the binding
             torch.randn(20, 512, device=dev)[:, ::2]]             # non-unit last stride
    for v in views:
        bb = b if v.shape[-1] == 256 else None
        assert torch.equal(TF.bias_act(v, bb, act), TF.bias_act(v.contiguous(), bb, act))
        g = torch.randn(v.shape, device=dev)
        ga = BE.ops.bias_act_bwd(g, v, bb, act, 0.0, None)
        gc = BE.ops.bias_act_bwd(g, v.contiguous(), bb, act, 0.0, None)
        assert torch.equal(ga[0], gc[0])
        if bb is not None:
            if BE.cpu:
                assert torch.equal(ga[1], gc[1])
            else:
                # The CUDA kernels take their scalar path for rows that are not 16-byte aligned,
                # whose bias-gradient reduction adds the rows in another order than the vector path.
                assert rel_err(ga[1], gc[1]) < 1e-6


# ----------------------------------------------------------------------------------------------
# Low precision
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ACTS)
def test_low_precision_within_torch_error(dtype, act):
    dev = BE.device
    x = _away_from_kinks(torch.randn(16, 1031, device=dev) * 2, act).to(dtype).requires_grad_()
    b = (torch.randn(1031, device=dev) * 0.5).to(dtype).requires_grad_()
    g = torch.randn(16, 1031, device=dev).to(dtype)
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
def test_dropout_mask_is_philox_h(shape, p):
    # Odd row lengths put Philox groups across rows and tiles; large seed/offset use the high words.
    for seed, offset in ((123, 0), (2**63 - 5, 2**40 + 17), (-(2**62), 3)):
        rng = torch.tensor([seed, offset], dtype=torch.int64)
        x = torch.rand(shape, device=BE.device) + 1.0  # relu(x) = x > 0: output is 0 exactly where dropped
        out = BE.ops.bias_act_fwd(x, None, "relu", p, rng)
        keep = R.dropout_keep_mask(seed, offset, x.numel(), p).reshape(shape).to(BE.device)
        assert torch.equal(out != 0, keep)
        assert torch.allclose(out, x * keep / (1 - p), rtol=1e-6, atol=0)


@pytest.mark.parametrize("act", ACTS)
def test_dropout_backward_regenerates_mask(act):
    x = _away_from_kinks(torch.randn(9, 517, device=BE.device), act).requires_grad_()
    b = torch.randn(517, device=BE.device, requires_grad=True)
    torch.manual_seed(7)
    out = TF.bias_act(x, b, act, dropout_p=0.4)
    g = torch.randn_like(out)
    gx, gb = torch.autograd.grad(out, (x, b), g)
    # Rebuild the same draw: the functional draws [seed, offset] from torch's generator.
    torch.manual_seed(7)
    rng = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64)
    keep = R.dropout_keep_mask(int(rng[0]), int(rng[1]), x.numel(), 0.4).reshape(x.shape).to(BE.device)
    xr, br = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    out_ref = R.bias_act(xr, br, act) * keep / 0.6
    assert rel_err(out, out_ref) < 1e-5
    gx_ref, gb_ref = torch.autograd.grad(out_ref, (xr, br), g.double())
    assert rel_err(gx, gx_ref) < 1e-4 and rel_err(gb, gb_ref) < 1e-4


def test_dropout_statistics_and_edge_probabilities():
    x = torch.rand(BE.pick(32, 256), 4096, device=BE.device) + 1.0
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
    assert torch.equal(BE.ops.bias_act_fwd(x, None, "gelu", 0.0, torch.tensor([1, 2])), TF.bias_act(x, None, "gelu"))


def test_dropout_same_rng_same_output():
    x = torch.randn(33, 301, device=BE.device)
    rng = torch.tensor([42, 1000], dtype=torch.int64)
    a = BE.ops.bias_act_fwd(x, None, "gelu", 0.25, rng)
    assert torch.equal(a, BE.ops.bias_act_fwd(x, None, "gelu", 0.25, rng.clone()))
    assert not torch.equal(a, BE.ops.bias_act_fwd(x, None, "gelu", 0.25, torch.tensor([42, 1001])))
    assert not torch.equal(a, BE.ops.bias_act_fwd(x, None, "gelu", 0.25, torch.tensor([43, 1000])))
    torch.manual_seed(3)
    c = TF.bias_act(x, None, "gelu", dropout_p=0.25)
    torch.manual_seed(3)
    assert torch.equal(c, TF.bias_act(x, None, "gelu", dropout_p=0.25))
    assert not torch.equal(c, TF.bias_act(x, None, "gelu", dropout_p=0.25))  # fresh draw


# ----------------------------------------------------------------------------------------------
# Determinism of grad_bias
# ----------------------------------------------------------------------------------------------
@pytest.mark.backends("cpu")  # the CPU kernels' OpenMP threads
def test_grad_bias_deterministic_across_runs_and_threads():
    x = torch.randn(999, 301)
    b = torch.randn(301)
    g = torch.randn_like(x)
    first = BE.ops.bias_act_bwd(g, x, b, "gelu_tanh", 0.0, None)
    n = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            res = BE.ops.bias_act_bwd(g, x, b, "gelu_tanh", 0.0, None)
            assert torch.equal(res[0], first[0]) and torch.equal(res[1], first[1])
    finally:
        torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------
@registered_ops
def test_opcheck():
    ops = BE.ops
    x = torch.randn(5, 3, 40, device=BE.device, requires_grad=True)
    b = torch.randn(40, device=BE.device, requires_grad=True)
    rng = torch.tensor([5, 6], dtype=torch.int64)
    for act in ACTS:
        torch.library.opcheck(ops.bias_act_fwd, (x, b, act, 0.0, None))
    torch.library.opcheck(ops.bias_act_fwd, (x, None, "gelu", 0.3, rng))
    g = torch.randn(5, 3, 40, device=BE.device)
    torch.library.opcheck(ops.bias_act_bwd, (g, x.detach(), b.detach(), "gelu_tanh", 0.0, None))
    torch.library.opcheck(ops.bias_act_bwd, (g, x.detach(), None, "relu", 0.3, rng))


@registered_ops
def test_torch_compile_fullgraph():
    def f(x, b):
        return TF.bias_gelu(x, b, approximate="tanh") + TF.bias_act(x * 2, None, "relu", dropout_p=0.0)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 24, device=BE.device, requires_grad=True)
    b = torch.randn(24, device=BE.device, requires_grad=True)
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
    ops, dev = BE.ops, BE.device
    x = torch.randn(4, 8, device=dev)
    with pytest.raises(TypeError, match="input"):
        TF.bias_act(torch.ones(4, 8, dtype=torch.int64, device=dev), None, "relu")
    with pytest.raises(ValueError, match="activation"):
        TF.bias_act(x, None, "swish")
    with pytest.raises(ValueError, match="activation"):
        ops.bias_act_fwd(x, None, "swish", 0.0, None)
    with pytest.raises(ValueError, match="approximate"):
        TF.bias_gelu(x, None, approximate="fast")
    with pytest.raises(ValueError, match="bias"):
        TF.bias_act(x, torch.randn(7, device=dev), "relu")
    with pytest.raises(ValueError, match="bias"):
        TF.bias_act(x, torch.randn(2, 8, device=dev), "relu")
    with pytest.raises(TypeError, match="bias"):
        TF.bias_act(x, torch.ones(8, dtype=torch.int32, device=dev), "relu")
    with pytest.raises(ValueError, match="dropout_p"):
        TF.bias_act(x, None, "relu", dropout_p=1.5)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.bias_act_fwd(x, None, "relu", -0.1, None)
    with pytest.raises(ValueError, match="rng"):
        ops.bias_act_fwd(x, None, "relu", 0.5, None)
    with pytest.raises(ValueError, match="rng"):
        ops.bias_act_fwd(x, None, "relu", 0.5, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="grad_out"):
        ops.bias_act_bwd(torch.randn(4, 7, device=dev), x, None, "relu", 0.0, None)


@pytest.mark.backends("cuda")  # needs a second device
def test_device_mismatch():
    with pytest.raises(ValueError, match="bias"):
        TF.bias_act(torch.randn(4, 8), torch.randn(8, device="cuda"), "relu")


# ---------------------------------------------------------------------------------------------
# The widths of CUDA_WIDTHS, every dtype and activation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cols", CUDA_WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
def test_widths_and_dtypes(cols, dtype, activation):
    rows = rows_for(cols)
    x0 = (2 * torch.randn(rows, cols, device=BE.device)).to(dtype)
    b0 = torch.randn(cols, device=BE.device).to(dtype)
    g = torch.randn(rows, cols, device=BE.device).to(dtype)

    def run(fn, cast):
        x, b = leaf(cast(x0)), leaf(cast(b0))
        y = fn(x, b)
        (y * cast(g)).sum().backward()
        return y.detach(), x.grad, b.grad

    def ours(x, b):
        poison_outputs(((rows, cols), dtype), ((cols,), torch.float32))
        return TF.bias_act(x, b, activation)

    res_ours = run(ours, lambda t: t)
    names = ["out", "grad_input", "grad_bias"]
    if dtype == torch.float32:
        res_ref = run(lambda x, b: R.bias_act(x, b, activation), lambda t: t.double())
        for a, r, n, tol in zip(res_ours[:2], res_ref[:2], names, (1e-5, 1e-4)):
            check_rel_err(a, r, n, tol)
        # grad_bias sums `rows` terms that may cancel (with one column, its norm is one such sum):
        # measure its error against the norm of the terms' magnitudes, not of the sum.
        magnitude = res_ref[1].abs().sum(0).norm().item()
        err = (res_ours[2].double() - res_ref[2]).norm().item() / max(magnitude, 1e-300)
        assert torch.isfinite(res_ours[2]).all() and err < 1e-4, f"grad_bias: error {err:.3e} of the terms' magnitude"
    else:
        res_ref = run(lambda x, b: R.bias_act(x, b, activation), lambda t: t.float())
        res_tor = run(lambda x, b: _torch_act(x + b, activation), lambda t: t)
        for a, t, r, n in zip(res_ours, res_tor, res_ref, names):
            check_low(a, t, r, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_no_bias_and_strided_rows(dtype):
    rows, cols = 77, 3072
    base = torch.randn(rows, cols + 5, device=BE.device).to(dtype)
    for x in (base[:, :cols], base[:, 5:]):  # row stride cols + 5, aligned / misaligned start
        xl = leaf(x)
        poison_outputs(((rows, cols), dtype))
        y = TF.bias_gelu(xl, None)
        y.float().sum().backward()
        xr = leaf(x.double())
        yr = R.gelu(xr)
        yr.sum().backward()
        tol = 1e-5 if dtype == torch.float32 else 1e-3
        check_rel_err(y, yr, "out", tol)
        check_rel_err(xl.grad, xr.grad, "grad_input", 10 * tol)


@pytest.mark.parametrize("rows,cols", [(4096, 3072), (33, 1023), (1000, 7)])
def test_grad_bias_deterministic(rows, cols):
    rows = BE.pick(min(rows, 400), rows)
    x = torch.randn(rows, cols, device=BE.device, dtype=torch.bfloat16)
    b = torch.randn(cols, device=BE.device)
    g = torch.randn(rows, cols, device=BE.device, dtype=torch.bfloat16)
    first = BE.ops.bias_act_bwd(g, x, b, "gelu", 0.0, None)
    for _ in range(3):
        again = BE.ops.bias_act_bwd(g, x, b, "gelu", 0.0, None)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


# ---------------------------------------------------------------------------------------------
# Dropout: the mask must be the one documented in csrc/kernels/philox.h
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows,cols", [(37, 768), (5, 1023), (64, 7)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
def test_dropout_mask_and_backward_match_philox(rows, cols, dtype, activation):
    p = 0.3
    rng = torch.tensor([0x1234_5678_9ABC_DEF0 - 2**63, 977], dtype=torch.int64)
    # Positive inputs: every activation is nonzero there, so an output is 0 exactly where the
    # element was dropped.
    x = (torch.rand(rows, cols, device=BE.device) + 0.5).to(dtype)
    b = (0.1 * torch.rand(cols, device=BE.device)).to(dtype)
    poison_outputs(((rows, cols), dtype))
    out = BE.ops.bias_act_fwd(x, b, activation, float(p), rng)
    kept = (out != 0).cpu()
    expected = philox_keep(rows * cols, p, rng)
    assert torch.equal(kept.reshape(-1), expected), "CUDA dropout mask differs from philox.h's scheme"
    scale = 1.0 / (1.0 - float(torch.tensor(p, dtype=torch.float32)))
    y = R.bias_act(x.double(), b.double(), activation)
    want = torch.where(expected.reshape(rows, cols).to(BE.device), y * scale, torch.zeros((), device=BE.device))
    assert (out.double() - want).abs().max().item() <= 1e-2 * want.abs().max().item()  # bf16 rounding

    # The backward regenerates the same mask: exactly the dropped elements get no gradient
    # (the activations' derivatives are nonzero for these inputs).
    g = torch.randn(rows, cols, device=BE.device).to(dtype)
    gi, gb = BE.ops.bias_act_bwd(g, x, b, activation, float(p), rng)
    assert torch.equal((gi != 0).cpu() | (g == 0).cpu(), kept | (g == 0).cpu())
    xd, bd = leaf(x.double()), leaf(b.double())
    (R.bias_act(xd, bd, activation) * torch.where(expected.reshape(rows, cols).to(BE.device),
                                                  g.double() * scale, 0.0)).sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    check_rel_err(gi, xd.grad, "grad_input", tol)
    check_rel_err(gb, bd.grad, "grad_bias", tol)


@pytest.mark.backends("emu", "cuda")  # on the CPU backend both sides would be the same call
@pytest.mark.parametrize("rows,cols", [(37, 768), (5, 1023)])
def test_dropout_mask_matches_cpu_kernel(rows, cols):
    p = 0.3
    rng = torch.tensor([-77, 2**40 + 3], dtype=torch.int64)
    x = torch.rand(rows, cols, device=BE.device) + 0.5
    kept_cuda = (BE.ops.bias_act_fwd(x, None, "relu", p, rng) != 0).cpu()
    out_cpu = CPU_OPS.bias_act_fwd(x.cpu(), None, "relu", p, rng)
    assert torch.equal(out_cpu != 0, kept_cuda), "CUDA and CPU dropout masks differ"


@pytest.mark.backends("emu", "cuda")
def test_fp64_rejected_on_cuda():
    # The CUDA binding (shared by the emulator) has no fp64 kernels for this op.
    x = torch.randn(4, 8, device=BE.device, dtype=torch.float64)
    with pytest.raises(TypeError, match="`input`"):
        TF.bias_gelu(x, None)


# ----------------------------------------------------------------------------------------------
# NaN, Inf and huge values: the same non-finite pattern as torch in float64 (params.h)
# ----------------------------------------------------------------------------------------------
SPECIAL = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.0, 0.5, -3.0]


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_special_values(activation, dtype):
    x = torch.tensor(SPECIAL * 5, device=BE.device).reshape(5, 8).to(dtype)
    b = torch.zeros(8, device=BE.device)
    xo, bo = leaf(x), leaf(b)
    y = TF.bias_act(xo, bo, activation)
    y.backward(torch.ones_like(y))
    xr = x.detach().cpu().double().requires_grad_()
    yr = _torch_act(xr, activation)
    yr.backward(torch.ones_like(yr))
    for name, ours, ref in (("out", y, yr), ("grad_input", xo.grad, xr.grad)):
        ours, ref = ours.detach().cpu().double(), ref.detach()
        assert torch.equal(ours.isnan(), ref.isnan()), f"{name}: NaN at {ours.isnan().nonzero().tolist()}, torch {ref.isnan().nonzero().tolist()}"
        finite = ref.isfinite()
        assert torch.equal(ours.isinf(), ref.isinf()) and torch.equal(ours[~finite & ~ref.isnan()], ref[~finite & ~ref.isnan()]), name
        torch.testing.assert_close(ours[finite], ref[finite], rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-6)
