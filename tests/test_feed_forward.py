"""tx_kernels.functional.feed_forward (Linear -> bias + activation -> Linear) against float64, on
every backend of its fused bias + activation (tests/cuda_backends.py: the CPU kernels, the CUDA
kernels emulated, a GPU); the GEMMs run through ATen on the tensors' device."""
import pytest
import torch
import torch.nn.functional as F

import tx_kernels.functional as TF
from tx_kernels import reference as R
from tx_kernels._activations import KERNEL as KERNEL_ACTIVATIONS

from conftest import assert_within_torch_error, check_low, check_rel_err, leaf, rel_err
from cuda_backends import BE, fp64_on_cpu, registered_ops

pytestmark = pytest.mark.usefixtures("backend")

ACTS = ["relu", "gelu", "gelu_tanh"]


def _make(d, h, dtype, bias1=True, bias2=True, batch=(3, 17)):
    randn = lambda *s: torch.randn(*s, dtype=dtype, device=BE.device)  # noqa: E731
    x = randn(*batch, d).requires_grad_()
    w1 = (randn(h, d) / d**0.5).requires_grad_()
    b1 = (randn(h) * 0.1).requires_grad_() if bias1 else None
    w2 = (randn(d, h) / h**0.5).requires_grad_()
    b2 = (randn(d) * 0.1).requires_grad_() if bias2 else None
    return x, w1, b1, w2, b2


def _double(ts):
    return [None if t is None else t.detach().double().requires_grad_() for t in ts]


@fp64_on_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("biases", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("d,h", [(16, 64), (31, 7)])
def test_matches_reference(dtype, act, biases, d, h):
    args = _make(d, h, dtype, *biases)
    out = TF.feed_forward(*args, activation=act)
    ref_args = _double(args)
    out_ref = R.feed_forward(*ref_args, activation=act)
    assert out.dtype == dtype and out.shape == args[0].shape
    assert rel_err(out, out_ref) < 1e-5
    leaves = [t for t in args if t is not None]
    leaves_ref = [t for t in ref_args if t is not None]
    g = torch.randn_like(out)
    for a, e in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(out_ref, leaves_ref, g.double())):
        assert a.shape == e.shape and a.dtype == dtype
        assert rel_err(a, e) < 1e-4, rel_err(a, e)


@pytest.mark.backends("cpu")  # fp64: the CPU kernels only
def test_gradcheck_fp64():
    # b1 reaches the fused kernel as fp32 (params.h): a 1e-3 step keeps its rounding negligible.
    for act in ACTS:
        x, w1, b1, w2, b2 = _make(6, 10, torch.float64, batch=(2, 3))
        with torch.no_grad():  # keep relu's kink out of the finite differences
            h = F.linear(x, w1, b1)
            b1 += torch.where(h.abs() < 0.05, 0.1, 0.0).amax(dim=(0, 1))
        assert torch.autograd.gradcheck(lambda *a: TF.feed_forward(*a, activation=act),
                                        (x, w1, b1, w2, b2), eps=1e-3, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["gelu_tanh", "relu"])
def test_low_precision_within_torch_error(dtype, act):
    # relu without bias1: feed_forward rounds x @ w1^T to bf16/fp16 before adding bias1 in the
    # fused kernel, while torch adds the bias inside the GEMM; near 0 that flips the relu mask of a
    # few more elements than torch's rounding does, each costing a whole g * w2 term in grad_input.
    # A kink-free activation (gelu_tanh) covers bias1 in low precision.
    args = _make(64, 256, torch.float32, bias1=act != "relu", batch=(4, 9))
    args = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in args]
    x, w1, b1, w2, b2 = args
    g = torch.randn(x.shape, device=BE.device).to(dtype)
    leaves = [t for t in args if t is not None]
    out = TF.feed_forward(*args, activation=act)
    ours = torch.autograd.grad(out, leaves, g)

    def torch_ffn(x, w1, b1, w2, b2):
        h = F.linear(x, w1, b1)
        h = F.relu(h) if act == "relu" else F.gelu(h, approximate="tanh")
        return F.linear(h, w2, b2)

    out_t = torch_ffn(*args)
    theirs = torch.autograd.grad(out_t, leaves, g)
    ref_args = _double(args)
    out_ref = R.feed_forward(*ref_args, activation=act)
    refs = torch.autograd.grad(out_ref, [t for t in ref_args if t is not None], g.double())
    assert_within_torch_error(out, out_t, out_ref, name="out")
    names = [n for n, t in zip(("input", "weight1", "bias1", "weight2", "bias2"), args) if t is not None]
    for name, a, t, e in zip(names, ours, theirs, refs):
        assert_within_torch_error(a, t, e, atol=1e-3 * e.abs().max().item(), name=f"grad {name}")


def test_dropout_is_reproducible_and_scaled():
    x, w1, b1, w2, b2 = _make(16, 64, torch.float32)
    torch.manual_seed(11)
    a = TF.feed_forward(x, w1, b1, w2, b2, "gelu", dropout_p=0.5)
    torch.manual_seed(11)
    b = TF.feed_forward(x, w1, b1, w2, b2, "gelu", dropout_p=0.5)
    assert torch.equal(a, b)
    no_drop = TF.feed_forward(x, w1, b1, w2, b2, "gelu")
    assert not torch.allclose(a, no_drop)
    assert torch.allclose(TF.feed_forward(x, w1, b1, w2, None, "gelu", dropout_p=1.0),
                          torch.zeros_like(a))


def test_noncontiguous_input():
    x, w1, b1, w2, b2 = _make(16, 40, torch.float32)
    xt = torch.randn(17, 3, 16, device=BE.device).transpose(0, 1)
    assert torch.allclose(TF.feed_forward(xt, w1, b1, w2, b2, "gelu"),
                          TF.feed_forward(xt.contiguous(), w1, b1, w2, b2, "gelu"), atol=1e-6)


@registered_ops
def test_torch_compile_fullgraph():
    # One compile with the default (inductor) backend: the ops must trace as opaque custom ops
    # with the GEMMs around them, forward and backward.
    x, w1, b1, w2, b2 = _make(8, 16, torch.float32, batch=(2, 3))
    f = torch.compile(lambda *a: TF.feed_forward(*a, activation="gelu_tanh"), fullgraph=True)
    out = f(x, w1, b1, w2, b2)
    expected = TF.feed_forward(x, w1, b1, w2, b2, activation="gelu_tanh")
    assert torch.allclose(out, expected, atol=1e-6)
    args = (x, w1, b1, w2, b2)
    g = torch.randn_like(out)
    for a, e in zip(torch.autograd.grad(out, args, g), torch.autograd.grad(expected, args, g)):
        assert torch.allclose(a, e, atol=1e-5)


def test_bad_inputs():
    x, w1, b1, w2, b2 = _make(16, 40, torch.float32)
    with pytest.raises(ValueError, match="weight1"):
        TF.feed_forward(x, w1[:, :15], b1, w2, b2)
    with pytest.raises(ValueError, match="weight2"):
        TF.feed_forward(x, w1, b1, w2[:, :39], b2)
    with pytest.raises(ValueError, match="weight1"):
        TF.feed_forward(x, w1.reshape(-1), b1, w2, b2)
    with pytest.raises(ValueError, match="bias"):
        TF.feed_forward(x, w1, b1[:39], w2, b2)
    with pytest.raises(ValueError, match="activation"):
        TF.feed_forward(x, w1, b1, w2, b2, activation="tanh")
    with pytest.raises(TypeError, match="input"):
        TF.feed_forward(x.tolist(), w1, b1, w2, b2)


# ---------------------------------------------------------------------------------------------
# Awkward sizes (129 features, 515 hidden) in every dtype
# ---------------------------------------------------------------------------------------------
def _torch_act(x, act):
    """Stock torch's function for a kernel activation name (the table tx_kernels itself reads)."""
    return KERNEL_ACTIVATIONS[act](x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
def test_awkward_sizes_every_dtype(dtype, activation):
    n, d, h = 67, 129, 515
    tensors = [torch.randn(3, n, d, device=BE.device), torch.randn(h, d, device=BE.device) / d ** 0.5,
               torch.randn(h, device=BE.device), torch.randn(d, h, device=BE.device) / h ** 0.5,
               torch.randn(d, device=BE.device)]
    if activation == "relu":
        # relu' jumps at 0: a pre-activation within rounding of 0 may round to either side in any
        # implementation, and one such unit moves a whole row of grad_input by far more than 2x
        # torch's error. Biases of +-5 against x . w ~ N(0, 1) keep every unit on one side.
        tensors[2] = torch.sign(tensors[2]) * 5.0
    g = torch.randn(3, n, d, device=BE.device)

    def run(fn, cast):
        args = [leaf(cast(t)) for t in tensors]
        y = fn(*args)
        (y * cast(g)).sum().backward()
        return [y.detach()] + [a.grad for a in args]

    names = ["out", "grad_input", "grad_weight1", "grad_bias1", "grad_weight2", "grad_bias2"]
    ours = run(lambda *a: TF.feed_forward(*a, activation=activation), lambda t: t.to(dtype))
    if dtype == torch.float32:
        # TF32 matmuls would dominate the error; the default (highest) precision keeps fp32 GEMMs.
        ref = run(lambda *a: R.feed_forward(*a, activation=activation), lambda t: t.double())
        for a, r, nm in zip(ours, ref, names):
            check_rel_err(a, r, nm, 1e-4)
    else:
        ref = run(lambda *a: R.feed_forward(*a, activation=activation), lambda t: t.float())
        tor = run(lambda x, w1, b1, w2, b2: F.linear(_torch_act(F.linear(x, w1, b1), activation), w2, b2),
                  lambda t: t.to(dtype))
        for a, t, r, nm in zip(ours, tor, ref, names):
            check_low(a, t, r, nm)
