"""CUDA kernels of the memory-bound ops: (add +) LayerNorm, bias + ReLU/GELU (+ dropout), feed_forward.

Every test runs on each backend of tests/cuda_backends.py: the CPU emulator of the kernels ("emu",
always; TF.* and autograd route to the emulated kernels) and a real GPU ("cuda", when present).

Rules followed (ARCHITECTURE.md): fp32 against float64 references from tx_kernels/reference.py
(relative error < 1e-5 forward, 1e-4 gradients); fp16/bf16 against the fp32 reference with a max
error at most 2x stock torch's in the same precision; awkward hidden sizes; outputs poisoned with
NaN before every launch (see poison_allocator; on the emulator every CPU allocation is junk-filled); weight/bias gradients bit-identical over reruns;
the CUDA dropout mask equal to an independent Python Philox and to the CPU kernel's mask.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tx_kernels.functional as TF
from tx_kernels import reference as R

from conftest import assert_within_torch_error, rel_err
from cuda_backends import BE, CPU_OPS, philox_keep

pytestmark = pytest.mark.usefixtures("cuda_backend")

# 1 and 7: one thread's worth; 768/4096/8192: the 16-byte path (8192 the last fp32 register-path
# width of the backward); 1023/8191: the scalar path; 12288: the backward's block-per-row fallback;
# 16392: the forward's block-per-row fallback on the 16-byte path.
HIDDEN = [1, 7, 768, 1023, 4096, 8191, 8192, 12288, 16392]
LOW = [torch.float16, torch.bfloat16]
DTYPES = [torch.float32] + LOW


def rows_for(cols):
    # Enough rows for statistics on small rows (and several rows per CTA / warp), fewer for wide ones.
    return 67 if cols <= 1024 else (9 if cols <= 12288 else 3)


def poison_allocator(*tensors_like):
    """Make the caching allocator hand NaN-filled memory to the next allocations.

    For each expected output (given as (shape, dtype)), allocate a NaN-filled block of that size
    and free it. PyTorch's caching allocator keeps freed blocks for the stream and serves the next
    request of a fitting size from them (best fit, most recently freed first), so the op's outputs
    land, as far as the allocator lets us steer it, on NaN memory: any element the kernel fails to
    write stays NaN and the finiteness checks fail. Sizes are doubled so the blocks also cover
    outputs that the allocator rounds up. (The emulator needs none of this: conftest's `poison`
    junk-fills every CPU allocation while the test runs.)
    """
    if BE.emu:
        return
    bufs = []
    for shape, dtype in tensors_like:
        n = 1
        for s in shape:
            n *= s
        bufs.append(torch.full((max(2 * n, 1),), float("nan"), dtype=dtype, device=BE.device))
        bufs.append(torch.full((max(n, 1),), float("nan"), dtype=dtype, device=BE.device))
    torch.cuda.synchronize()
    del bufs


def check_low(ours, torch_lp, ref, name):
    assert_within_torch_error(ours.float(), torch_lp.float(), ref.float(), factor=2.0, atol=1e-6,
                              name=name)


def check_fp32(ours, ref, name, tol):
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = rel_err(ours, ref)
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.0e}"


def leaf(t):
    return t.detach().clone().requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# LayerNorm / add + LayerNorm
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cols", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["ln", "add_ln", "add_ln_out_only"])
def test_layer_norm(cols, dtype, variant):
    # add_ln_out_only: return_residual=False (post-LN), the sum never written; the backward
    # re-reads both inputs.
    residual = variant != "ln"
    returns_sum = variant == "add_ln"
    rows = rows_for(cols)
    dev = BE.device
    x0 = torch.randn(rows, cols, device=dev).to(dtype)
    r0 = torch.randn(rows, cols, device=dev).to(dtype)
    w0 = (1 + 0.5 * torch.randn(cols, device=dev)).to(dtype)
    b0 = (0.5 * torch.randn(cols, device=dev)).to(dtype)
    g_out = torch.randn(rows, cols, device=dev).to(dtype)
    g_res = torch.randn(rows, cols, device=dev).to(dtype)

    def run(fn, cast):
        x, r, w, b = (leaf(cast(t)) for t in (x0, r0, w0, b0))
        if returns_sum:
            out, res = fn(x, r, w, b)
            loss = (out * cast(g_out)).sum() + (res * cast(g_res)).sum()
            outs = [out, res]
        elif residual:
            out = fn(x, r, w, b)
            loss = (out * cast(g_out)).sum()
            outs = [out]
        else:
            out = fn(x, None, w, b)
            loss = (out * cast(g_out)).sum()
            outs = [out]
        loss.backward()
        grads = [x.grad, w.grad, b.grad] + ([r.grad] if residual else [])
        return [o.detach() for o in outs], grads

    def ours(x, r, w, b):
        poison_allocator(((rows, cols), dtype), ((rows, cols), dtype), ((rows,), torch.float32))
        if residual:
            return TF.add_layer_norm(x, r, (cols,), w, b, return_residual=returns_sum)
        return TF.layer_norm(x, (cols,), w, b)

    def stock(x, r, w, b):
        if residual:
            s = x + r
            return (F.layer_norm(s, (cols,), w, b), s) if returns_sum else F.layer_norm(s, (cols,), w, b)
        return F.layer_norm(x, (cols,), w, b)

    def ref(x, r, w, b):
        if residual:
            out, s = R.add_layer_norm(x, r, w, b)
            return (out, s) if returns_sum else out
        return R.layer_norm(x, w, b)

    names_out = ["out", "residual_out"]
    names_grad = ["grad_input", "grad_weight", "grad_bias", "grad_residual"]
    o_ours, g_ours = run(ours, lambda t: t)
    if dtype == torch.float32:
        o_ref, g_ref = run(ref, lambda t: t.double())
        for a, b_, n in zip(o_ours, o_ref, names_out):
            check_fp32(a, b_, n, 1e-5)
        for a, b_, n in zip(g_ours, g_ref, names_grad):
            check_fp32(a, b_, n, 1e-4)
    else:
        o_ref, g_ref = run(ref, lambda t: t.float())
        o_tor, g_tor = run(stock, lambda t: t)
        for a, t, b_, n in zip(o_ours, o_tor, o_ref, names_out):
            check_low(a, t, b_, n)
        for a, t, b_, n in zip(g_ours, g_tor, g_ref, names_grad):
            check_low(a, t, b_, n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_no_affine_and_statistics(dtype):
    rows, cols = 45, 1000
    x = torch.randn(rows, cols, device=BE.device).to(dtype) * 3 + 1
    poison_allocator(((rows, cols), dtype), ((rows,), torch.float32))
    out, mean, rstd = BE.ops.layer_norm_fwd(x, None, None, 1, 1e-5)
    xd = x.double()
    ref_mean = xd.mean(-1)
    ref_rstd = 1 / torch.sqrt(xd.var(-1, unbiased=False) + 1e-5)
    check_fp32(mean, ref_mean, "mean", 1e-5)
    check_fp32(rstd, ref_rstd, "rstd", 1e-5)
    if dtype == torch.float32:
        check_fp32(out, R.layer_norm(xd), "out", 1e-5)
    else:
        check_low(out, F.layer_norm(x, (cols,)), R.layer_norm(x.float()), "out")


@pytest.mark.parametrize("layout", ["row_slice", "row_slice_aligned", "transposed", "expanded_rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_layer_norm_non_contiguous(layout, dtype):
    rows, cols = 50, 768
    # Leaves in fp32; the views below are built from them (cast first), so gradients flow back
    # through slices, transposes and expands of the same storage.
    leaves0 = {"base": torch.randn(rows, cols + 8, device=BE.device),
               "xt": torch.randn(cols, rows, device=BE.device), "rt": torch.randn(cols, rows, device=BE.device),
               "x1": torch.randn(1, cols, device=BE.device),
               "w": torch.randn(cols, device=BE.device), "b": torch.randn(cols, device=BE.device)}

    def views(lv):
        base = lv["base"]
        if layout == "row_slice":  # row stride cols + 8 and a 3-element offset: scalar path
            return base[:, 3:3 + cols], base[:, 8:8 + cols]
        if layout == "row_slice_aligned":  # row stride cols + 8, 16-byte aligned: vector path
            return base[:, 8:8 + cols], base[:, :cols]
        if layout == "transposed":  # last dim not contiguous: the binding copies
            return lv["xt"].t(), lv["rt"].t()
        return lv["x1"].expand(rows, cols), base[:, :cols]  # row stride 0

    def run(fn, cast):
        lv = {k: leaf(cast(t)) for k, t in leaves0.items()}
        x, r = views(lv)
        out, res = fn(x, r, lv["w"], lv["b"])
        (out.double().sum() + res.double().pow(2).sum()).backward()
        grads = {k: (t.grad if t.grad is not None else torch.zeros_like(t)) for k, t in lv.items()}
        return out.detach(), res.detach(), grads

    def ours(x, r, w, b):
        poison_allocator(((rows, cols), dtype), ((rows, cols), dtype))
        return TF.add_layer_norm(x, r, (cols,), w, b)

    out, res, g = run(ours, lambda t: t.to(dtype))
    out_r, res_r, g_r = run(R.add_layer_norm, lambda t: t.to(dtype).double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    check_fp32(out, out_r, "out", tol)
    check_fp32(res, res_r, "residual_out", tol)
    for k in leaves0:
        check_fp32(g[k], g_r[k], f"grad of {k}", 10 * tol)


@pytest.mark.parametrize("rows,cols", [(4096, 768), (64, 1023), (16, 12288), (3000, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_grads_deterministic(rows, cols, dtype):
    # Many rows per CTA of the persistent grid even at emulator sizes (grid ~ a few CTAs per SM).
    rows = BE.pick(min(rows, 700), rows)
    x = torch.randn(rows, cols, device=BE.device).to(dtype)
    w = torch.randn(cols, device=BE.device)
    b = torch.randn(cols, device=BE.device)
    g = torch.randn(rows, cols, device=BE.device).to(dtype)
    g_res = torch.randn(rows, cols, device=BE.device).to(dtype)
    out, res, mean, rstd = BE.ops.add_layer_norm_fwd(x, x, w, b, 1, 1e-5)
    first = BE.ops.layer_norm_bwd(g, g_res, res, mean, rstd, w, b, 1)
    for _ in range(3):
        again = BE.ops.layer_norm_bwd(g, g_res, res, mean, rstd, w, b, 1)
        for a, b_, n in zip(first, again, ["grad_input", "grad_weight", "grad_bias"]):
            assert torch.equal(a, b_), f"{n} differs between identical runs"


# ---------------------------------------------------------------------------------------------
# Bias + activation
# ---------------------------------------------------------------------------------------------
def stock_act(y, activation):
    if activation == "relu":
        return F.relu(y)
    return F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")


@pytest.mark.parametrize("cols", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
def test_bias_act(cols, dtype, activation):
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
        poison_allocator(((rows, cols), dtype), ((cols,), torch.float32))
        return TF.bias_act(x, b, activation)

    res_ours = run(ours, lambda t: t)
    names = ["out", "grad_input", "grad_bias"]
    if dtype == torch.float32:
        res_ref = run(lambda x, b: R.bias_act(x, b, activation), lambda t: t.double())
        for a, r, n, tol in zip(res_ours[:2], res_ref[:2], names, (1e-5, 1e-4)):
            check_fp32(a, r, n, tol)
        # grad_bias sums `rows` terms that may cancel (with one column, its norm is one such sum):
        # measure its error against the norm of the terms' magnitudes, not of the sum.
        magnitude = res_ref[1].abs().sum(0).norm().item()
        err = (res_ours[2].double() - res_ref[2]).norm().item() / max(magnitude, 1e-300)
        assert torch.isfinite(res_ours[2]).all() and err < 1e-4, f"grad_bias: error {err:.3e} of the terms' magnitude"
    else:
        res_ref = run(lambda x, b: R.bias_act(x, b, activation), lambda t: t.float())
        res_tor = run(lambda x, b: stock_act(x + b, activation), lambda t: t)
        for a, t, r, n in zip(res_ours, res_tor, res_ref, names):
            check_low(a, t, r, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_bias_act_no_bias_and_strided_rows(dtype):
    rows, cols = 77, 3072
    base = torch.randn(rows, cols + 5, device=BE.device).to(dtype)
    for x in (base[:, :cols], base[:, 5:]):  # row stride cols + 5, aligned / misaligned start
        xl = leaf(x)
        poison_allocator(((rows, cols), dtype))
        y = TF.bias_gelu(xl, None)
        y.float().sum().backward()
        xr = leaf(x.double())
        yr = R.gelu(xr)
        yr.sum().backward()
        tol = 1e-5 if dtype == torch.float32 else 1e-3
        check_fp32(y, yr, "out", tol)
        check_fp32(xl.grad, xr.grad, "grad_input", 10 * tol)


@pytest.mark.parametrize("rows,cols", [(4096, 3072), (33, 1023), (1000, 7)])
def test_bias_grad_deterministic(rows, cols):
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
def test_dropout_mask_matches_philox(rows, cols, dtype, activation):
    p = 0.3
    rng = torch.tensor([0x1234_5678_9ABC_DEF0 - 2**63, 977], dtype=torch.int64)
    # Positive inputs: every activation is nonzero there, so an output is 0 exactly where the
    # element was dropped.
    x = (torch.rand(rows, cols, device=BE.device) + 0.5).to(dtype)
    b = (0.1 * torch.rand(cols, device=BE.device)).to(dtype)
    poison_allocator(((rows, cols), dtype))
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
    check_fp32(gi, xd.grad, "grad_input", tol)
    check_fp32(gb, bd.grad, "grad_bias", tol)



@pytest.mark.parametrize("rows,cols", [(37, 768), (5, 1023)])
def test_dropout_mask_matches_cpu_kernel(rows, cols):
    p = 0.3
    rng = torch.tensor([-77, 2**40 + 3], dtype=torch.int64)
    x = torch.rand(rows, cols, device=BE.device) + 0.5
    kept_cuda = (BE.ops.bias_act_fwd(x, None, "relu", p, rng) != 0).cpu()
    out_cpu = CPU_OPS.bias_act_fwd(x.cpu(), None, "relu", p, rng)
    assert torch.equal(out_cpu != 0, kept_cuda), "CUDA and CPU dropout masks differ"


# ---------------------------------------------------------------------------------------------
# feed_forward (GEMMs through ATen, bias + activation fused)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
def test_feed_forward(dtype, activation):
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
            check_fp32(a, r, nm, 1e-4)
    else:
        ref = run(lambda *a: R.feed_forward(*a, activation=activation), lambda t: t.float())
        tor = run(lambda x, w1, b1, w2, b2: F.linear(stock_act(F.linear(x, w1, b1), activation), w2, b2),
                  lambda t: t.to(dtype))
        for a, t, r, nm in zip(ours, tor, ref, names):
            check_low(a, t, r, nm)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def test_fp64_rejected_on_cuda_with_argument_name():
    # The CUDA binding code (shared by the emulator) has no fp64 kernels for these ops.
    x = torch.randn(4, 8, device=BE.device, dtype=torch.float64)
    with pytest.raises(TypeError, match="`input`"):
        TF.layer_norm(x, (8,))
    with pytest.raises(TypeError, match="`input`"):
        TF.bias_gelu(x, None)
    with pytest.raises(TypeError, match="`input`"):
        TF.add_layer_norm(x, x, (8,))


# ----------------------------------------------------------------------------------------------
# NaN, Inf and huge values: the same non-finite pattern as torch in float64 (params.h)
# ----------------------------------------------------------------------------------------------
SPECIAL = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.0, 0.5, -3.0]


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bias_act_special_values(activation, dtype):
    x = torch.tensor(SPECIAL * 5, device=BE.device).reshape(5, 8).to(dtype)
    b = torch.zeros(8, device=BE.device)
    xo, bo = leaf(x), leaf(b)
    y = TF.bias_act(xo, bo, activation)
    y.backward(torch.ones_like(y))
    xr = x.detach().cpu().double().requires_grad_()
    yr = stock_act(xr, activation)
    yr.backward(torch.ones_like(yr))
    for name, ours, ref in (("out", y, yr), ("grad_input", xo.grad, xr.grad)):
        ours, ref = ours.detach().cpu().double(), ref.detach()
        assert torch.equal(ours.isnan(), ref.isnan()), f"{name}: NaN at {ours.isnan().nonzero().tolist()}, torch {ref.isnan().nonzero().tolist()}"
        finite = ref.isfinite()
        assert torch.equal(ours.isinf(), ref.isinf()) and torch.equal(ours[~finite & ~ref.isnan()], ref[~finite & ~ref.isnan()]), name
        torch.testing.assert_close(ours[finite], ref[finite], rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-6)


@pytest.mark.parametrize("cols", [64, 768, 5000])
def test_layer_norm_non_finite_rows(cols):
    x = torch.randn(5, cols, device=BE.device)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    x[2] *= 1e20  # the variance overflows fp32
    w = torch.randn(cols, device=BE.device)
    b = torch.randn(cols, device=BE.device)
    out = TF.layer_norm(x, (cols,), w, b)
    ref = F.layer_norm(x.cpu().double(), (cols,), w.cpu().double(), b.cpu().double())
    ours_finite = out.cpu().isfinite().all(1)
    assert ours_finite.tolist() == [False, False, False, True, True], ours_finite.tolist()
    # Rows 0-1 are NaN in torch too; torch in fp32 may turn the overflow of row 2 into 0 or NaN,
    # never a meaningful number, so a finite row 2 would be a silent wrong answer.
    assert not ref[:2].isfinite().all(1).any()
    torch.testing.assert_close(out.cpu()[3:].double(), ref[3:], rtol=1e-5, atol=1e-5)
