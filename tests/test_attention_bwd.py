"""The attention backward op (attention_bwd) against float64 references, on every backend
(tests/cuda_backends.py): the CPU kernels, the CUDA kernels (csrc/kernels/attention_bwd.cu)
emulated on the CPU, and a GPU when present.

fp16/bf16: the max error of dq, dk, dv (and of an additive mask's gradient) against a float64
reference (tx_kernels.reference.attention, autograd) is at most 2x that of stock torch in the same
precision (attention_refs.torch_sdpa: torch's fused SDPA on a GPU, the composite on CPU tensors)
plus 4 ulps of the gradient's scale (README, "Testing").
fp32/fp64 (the general kernels): relative error under 1e-4 / 1e-5.
Every gradient buffer is poisoned first: on the CPU backends every allocation is junk filled; on
a GPU NaN-filled tensors of the output sizes are allocated and freed right before the backward
runs, so the caching allocator hands that memory to the op. Any element the kernels fail to
write shows up as NaN.

CUDA kernel variants covered: the fast tensor-core path (fp16/bf16, E == Ev, E % 8 == 0,
E <= 128: head dims 32/64/96/128 and padded ones like 48), with atomic dQ or the deterministic dQ
pass (torch.use_deterministic_algorithms(True)), with and without mask/dropout; the general path
(fp32, fp64, Ev != E, E = 20 or 256). The CPU kernels run the same cases.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import tx_kernels.functional as TF

from attention_refs import attention_inputs, make_mask, ref_grads, torch_grads
from conftest import assert_within_torch_error, rel_err, ulp_floor
from cuda_backends import BE, CPU_OPS

pytestmark = pytest.mark.usefixtures("backend")
gpu_only = pytest.mark.gpu_only

# Absolute slack added to the 2x rule: well under one ulp at magnitude 1, for entries whose exact
# value is 0 (e.g. dq with a single key), where torch may happen to round to exactly 0.
ATOL = {torch.float16: 2e-4, torch.bfloat16: 2e-3}


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _poison(q, k, v, mask_grad):
    """On a GPU: NaN blocks the size of every buffer the backward allocates, freed for the op
    (the CPU backends' allocations are junk-filled already)."""
    N, H, L, E = q.shape
    S = k.shape[2]
    sizes = [t.numel() * t.element_size() for t in (q, k, v)]
    sizes.append((N * H * L * (E + 2) + 64) * 4)  # the workspace: Dsum and the fp32 dq accumulator
    if mask_grad:
        sizes.append(N * H * L * S * 4)
    BE.poison_blocks(sizes)


def _fwd_bwd(q, k, v, mask, causal, scale, grad=None, p=0.0, rng=None, mask_grad=False):
    out, lse = BE.ops.attention_fwd(q, k, v, mask, scale, causal, p, rng)
    if grad is None:
        grad = torch.randn_like(out)
    _poison(q, k, v, mask_grad)
    dq, dk, dv, dmask = BE.ops.attention_bwd(grad, q, k, v, out, lse, mask, scale, causal, p, rng, mask_grad)
    BE.sync()
    grads = [dq, dk, dv] + ([dmask] if mask_grad else [])
    return out, grad, grads


def _check_2x_torch(q, k, v, mask=None, causal=False, scale=None, name=""):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask_grad = mask is not None and mask.is_floating_point()
    _, grad, ours = _fwd_bwd(q, k, v, mask, causal, scale, mask_grad=mask_grad)
    ref = ref_grads(q, k, v, mask, causal, scale, grad)
    theirs = torch_grads(q, k, v, mask, causal, scale, grad)
    for gname, a, b, c in zip(("dq", "dk", "dv", "dmask"), ours, theirs, ref):
        assert a.shape == c.shape, f"{name} {gname}: shape {tuple(a.shape)} vs {tuple(c.shape)}"
        # The project's rule: 2x torch plus 4 ulps of the gradient's scale (a key-broadcast mask
        # gradient sums L * H entries and is then rounded to the mask's dtype).
        atol = max(ATOL[q.dtype], ulp_floor(c, q.dtype))
        assert_within_torch_error(a, b, c, atol=atol, name=f"{name} {gname}")
    return ours


# ----------------------------------------------------------------------------------------------
# Fast path: fp16 / bf16 against 2x stock torch
# ----------------------------------------------------------------------------------------------
# (N, H, Hkv, L, S, E): ones, primes, one past a tile (65, 129), L != S both ways, GQA
SHAPES = [
    (1, 1, 1, 1, 1, 64),
    (2, 3, 3, 17, 17, 64),
    (1, 2, 2, 127, 129, 64),
    (2, 4, 2, 129, 127, 64),
    pytest.param((1, 2, 1, 1000, 1000, 64), marks=gpu_only),
    (1, 2, 2, 1, 300, 64),
    (1, 2, 2, 300, 1, 64),
    (1, 6, 2, 200, 77, 32),
    (2, 2, 2, 129, 257, 96),
    (1, 4, 1, 257, 129, 128),
    (1, 2, 2, 99, 130, 48),  # padded to the 64 instantiation
    (1, 2, 2, 65, 7, 80),  # padded to the 96 instantiation
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fast_path_within_2x_torch(shape, dtype, causal):
    N, H, Hkv, L, S, E = shape
    q, k, v = attention_inputs(N, H, Hkv, L, S, E, E, dtype)
    _check_2x_torch(q, k, v, causal=causal, name=f"{shape}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["bool_keys", "bool_2d", "add_heads", "add_2d", "add_keys"])
@pytest.mark.parametrize("E", [64, 128])
def test_masks_and_mask_gradient(kind, dtype, causal, E):
    N, H, Hkv, L, S = BE.pick((2, 2, 1, 65, 77), (2, 4, 2, 131, 200))
    q, k, v = attention_inputs(N, H, Hkv, L, S, E, E, dtype)
    mask = make_mask(kind, N, H, L, S, dtype)
    _check_2x_torch(q, k, v, mask, causal, name=kind)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_transposed_layout_and_custom_scale(dtype):
    # (N, L, H, E) storage viewed as (N, H, L, E): strided rows, no copy.
    N, H, L, S = BE.pick((2, 2, 70, 90), (2, 4, 150, 190))
    q, k, v = attention_inputs(N, H, H, L, S, 64, 64, dtype, layout="nlhe")
    assert not q.is_contiguous()
    _check_2x_torch(q, k, v, make_mask("add_heads", N, H, L, S, dtype), causal=True, scale=0.3)


def test_fp32_mask_on_fp16_inputs():
    # An additive mask of another floating dtype than the inputs: compared with the reference
    # (torch SDPA would need the mask in the inputs' dtype).
    N, H, L, S, E = 2, 2, 70, 90, 64
    q, k, v = attention_inputs(N, H, H, L, S, E, E, torch.float16)
    mask = torch.randn(N, 1, L, S, device=BE.device, dtype=torch.float32)
    scale = 1 / 8
    _, grad, ours = _fwd_bwd(q, k, v, mask, False, scale, mask_grad=True)
    ref = ref_grads(q, k, v, mask, False, scale, grad)
    assert ours[3].dtype == torch.float32 and ours[3].shape == mask.shape
    for name, a, b in zip(("dq", "dk", "dv", "dmask"), ours, ref):
        assert rel_err(a, b) < 1e-2, f"{name}: relative error {rel_err(a, b):.3e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fully_masked_rows_give_zero_gradients(dtype):
    N, H, L, S, E = 2, 2, 75, 140, 64
    q, k, v = attention_inputs(N, H, H, L, S, E, E, dtype)
    bool_mask = torch.rand(N, H, L, S, device=BE.device) > 0.5
    bool_mask[:, :, 3] = False  # row 3 sees nothing
    bool_mask[:, :, 70] = False  # a row in the second query tile
    add_mask = torch.zeros(N, 1, L, S, device=BE.device, dtype=dtype)
    add_mask[1, :, 5] = float("-inf")
    scale = 1 / 8
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-4}[dtype]
    for mask, dead in [(bool_mask, (slice(None), slice(None), [3, 70])), (add_mask, (1, slice(None), 5))]:
        mask_grad = mask.is_floating_point()
        out, grad, ours = _fwd_bwd(q, k, v, mask, False, scale, mask_grad=mask_grad)
        for t in ours:
            assert torch.isfinite(t).all()
        assert (ours[0][dead] == 0).all()
        if mask_grad:
            assert (ours[3][dead] == 0).all()
        ref = ref_grads(q, k, v, mask, False, scale, grad)
        for name, a, b in zip(("dq", "dk", "dv", "dmask"), ours, ref):
            assert rel_err(a, b) < tol, f"{name}: relative error {rel_err(a, b):.3e}"
    # Causal + padding of key 0: query 0 sees nothing.
    pad = torch.ones(1, 1, 1, S, dtype=torch.bool, device=BE.device)
    pad[..., 0] = False
    _, grad, ours = _fwd_bwd(q, k, v, pad, True, scale)
    assert all(torch.isfinite(t).all() for t in ours)
    assert (ours[0][:, :, 0] == 0).all()


def test_end_to_end_autograd():
    q, k, v = (t.requires_grad_() for t in attention_inputs(2, 4, 2, 100, 100, 64, 64, torch.float16))
    out = TF.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = ref_grads(q, k, v, None, True, 1 / 8, grad)
    theirs = torch_grads(q, k, v, None, True, 1 / 8, grad)
    for name, a, b, c in zip(("dq", "dk", "dv"), got, theirs, ref):
        assert_within_torch_error(a, b, c, atol=ATOL[torch.float16], name=name)


# ----------------------------------------------------------------------------------------------
# General path
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 8, 8), (2, 4, 2, 65, 31, 32, 24), (1, 3, 1, 129, 257, 64, 64),
                                   (1, 2, 2, 300, 97, 13, 7)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", [None, "bool_keys", "add_heads"])
def test_general_fp32(shape, causal, mask_kind):
    N, H, Hkv, L, S, E, Ev = shape
    q, k, v = attention_inputs(N, H, Hkv, L, S, E, Ev, torch.float32)
    mask = make_mask(mask_kind, N, H, L, S, torch.float32)
    scale = 1 / math.sqrt(E)
    _, grad, ours = _fwd_bwd(q, k, v, mask, causal, scale, mask_grad=mask is not None and mask.is_floating_point())
    ref = ref_grads(q, k, v, mask, causal, scale, grad)
    for name, a, b in zip(("dq", "dk", "dv", "dmask"), ours, ref):
        assert rel_err(a, b) < 1e-4, f"{name}: relative error {rel_err(a, b):.3e}"


@pytest.mark.parametrize("shape", [(5, 40, 17), (13, 7, 8)], ids=lambda s: "x".join(map(str, s)))
def test_fp32_sharp_softmax_within_2x_torch(shape):
    # A large scale makes each row's softmax nearly one-hot: dq and dk are then small sums of
    # large cancelling terms, and an error common to a row's probabilities survives in them. The
    # CUDA general kernels used to score in the log2 domain forward and in natural units backward,
    # and took Dsum from the rescored probabilities: 10-100x the max error of torch's fused fp32
    # kernel (which, like ours now, takes Dsum = rowsum(dO * O)). Stock torch here is
    # F.scaled_dot_product_attention in fp32.
    L, S, E = shape
    q, k, v = attention_inputs(2, 2, 2, L, S, E, E, torch.float32)
    _, grad, ours = _fwd_bwd(q, k, v, None, False, 3.0)
    ref = ref_grads(q, k, v, None, False, 3.0, grad)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    theirs = torch.autograd.grad(F.scaled_dot_product_attention(*leaves, scale=3.0), leaves, grad)
    for name, a, b, c in zip(("dq", "dk", "dv"), ours, theirs, ref):
        assert_within_torch_error(a, b, c, atol=1e-6 * c.abs().max().item(), name=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dims", [(64, 32), (20, 20), (256, 256)], ids=lambda d: f"E{d[0]}_Ev{d[1]}")
def test_general_low_precision_within_2x_torch(dtype, dims):
    E, Ev = dims
    q, k, v = attention_inputs(2, 2, 1, 77, 130, E, Ev, dtype)
    _check_2x_torch(q, k, v, make_mask("add_2d", 2, 2, 77, 130, dtype), causal=True, name=f"E={E} Ev={Ev}")


def test_general_fp64():
    # The same 1e-5 bound as the fp64 gradients through the functional API (test_attention.py).
    q, k, v = attention_inputs(1, 2, 1, 45, 70, 16, 24, torch.float64)
    mask = make_mask("add_heads", 1, 2, 45, 70, torch.float64)
    _, grad, ours = _fwd_bwd(q, k, v, mask, True, 0.25, mask_grad=True)
    ref = ref_grads(q, k, v, mask, True, 0.25, grad)
    for name, a, b in zip(("dq", "dk", "dv", "dmask"), ours, ref):
        assert rel_err(a, b) < 1e-5, f"{name}: relative error {rel_err(a, b):.3e}"


# ----------------------------------------------------------------------------------------------
# Dropout: the same mask as the CPU op for the same rng tensor
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("E", [64, 128])
def test_dropout_matches_cpu_op(dtype, causal, E):
    N, H, Hkv, L, S, p = BE.pick((2, 2, 1, 77, 131), (2, 4, 2, 77, 131)) + (0.3,)
    q, k, v = attention_inputs(N, H, Hkv, L, S, E, E, dtype)
    mask = torch.randn(1, H, L, S, device=BE.device, dtype=dtype)
    rng = torch.tensor([int(torch.randint(0, 2**62, ()).item()), 17], dtype=torch.int64)
    scale = 1 / math.sqrt(E)
    _, grad, ours = _fwd_bwd(q, k, v, mask, causal, scale, p=p, rng=rng, mask_grad=True)
    # The CPU op on the same inputs upcast to float64, same rng.
    cpu = [t.detach().cpu().double() for t in (q, k, v, mask, grad)]
    out_c, lse_c = CPU_OPS.attention_fwd(cpu[0], cpu[1], cpu[2], cpu[3], scale, causal, p, rng)
    want = CPU_OPS.attention_bwd(cpu[4], cpu[0], cpu[1], cpu[2], out_c, lse_c, cpu[3], scale, causal, p, rng, True)
    # A different keep-mask would give errors of order 1; rounding of the inputs' precision stays
    # far below these bounds.
    tol = {torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float32: 1e-4}[dtype]
    for name, a, b in zip(("dq", "dk", "dv", "dmask"), ours, want):
        assert rel_err(a.cpu(), b) < tol, f"{name}: relative error {rel_err(a.cpu(), b):.3e}"


# ----------------------------------------------------------------------------------------------
# Deterministic mode
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("E,features", [(64, False), (128, True), (32, True), (96, False)])
def test_deterministic_mode_is_bit_identical(dtype, E, features):
    # Several key blocks (128 keys each) add into every dq row, so the atomic order can differ run
    # to run (the emulator, like a GPU, runs blocks in a different order every launch).
    N, H, Hkv, L, S = BE.pick((1, 2, 1, 129, 300), (2, 4, 2, 300, 257))
    q, k, v = attention_inputs(N, H, Hkv, L, S, E, E, dtype)
    mask = torch.randn(1, H, L, S, device=BE.device, dtype=dtype) if features else None
    p = 0.2 if features else 0.0
    rng = torch.tensor([12345, 6], dtype=torch.int64) if features else None
    scale = 1 / math.sqrt(E)
    out, lse = BE.ops.attention_fwd(q, k, v, mask, scale, True, p, rng)
    grad = torch.randn_like(out)
    args = (grad, q, k, v, out, lse, mask, scale, True, p, rng, features)
    atomic = BE.ops.attention_bwd(*args)
    runs = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            _poison(q, k, v, features)
            runs.append(BE.ops.attention_bwd(*args))
            BE.sync()
    finally:
        torch.use_deterministic_algorithms(False)
    n_out = 4 if features else 3
    for name, a, b, c in zip(("dq", "dk", "dv", "dmask"), runs[0][:n_out], runs[1][:n_out], atomic[:n_out]):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        assert torch.equal(a, b), f"{name}: deterministic runs differ"
        # Same math, different summation order for dq only: equal up to rounding.
        assert rel_err(a, c) < 1e-2, f"{name}: deterministic vs atomic {rel_err(a, c):.3e}"
    if not features:
        ref = ref_grads(q, k, v, None, True, scale, grad)
        theirs = torch_grads(q, k, v, None, True, scale, grad)
        for name, a, b, c in zip(("dq", "dk", "dv"), runs[0], theirs, ref):
            assert_within_torch_error(a, b, c, atol=ATOL[dtype], name=f"deterministic {name}")


# ----------------------------------------------------------------------------------------------
# NaN and Inf (params.h: they propagate as in torch's composite; fully masked rows stay 0)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["query", "key", "value", "mask", "scale"])
@pytest.mark.parametrize("dtype,E,L,S", [(torch.bfloat16, 64, 5, 300), (torch.float16, 128, 1, 700),
                                         (torch.float32, 40, 5, 90)],
                         ids=["fast-bf16", "split-kv-fp16", "general-fp32"])
def test_nan_propagates_like_torch(where, dtype, E, L, S):
    q, k, v = attention_inputs(2, 2, 2, L, S, E, E, dtype)
    mask = torch.randn(L, S, device=BE.device, dtype=dtype)
    if L > 1:
        mask[0, :] = -math.inf  # row 0 is fully masked: it stays 0 whatever NaN is elsewhere
    scale = 0.125
    nan = float("nan")
    if where == "query":
        q[1, 0, L - 1, 3] = nan
    elif where == "key":
        k[0, 1, S // 2, 0] = nan
    elif where == "value":
        v[0, 0, S - 1, 5] = nan
    elif where == "mask":
        mask[L - 1, S // 3] = nan
    else:
        scale = nan
    out, lse = BE.ops.attention_fwd(q, k, v, mask, scale, False, 0.0, None)
    grad = torch.randn_like(out)
    ours = BE.ops.attention_bwd(grad, q, k, v, out, lse, mask, scale, False, 0.0, None, True)
    args = [t.detach().cpu().double().requires_grad_() for t in (q, k, v, mask)]
    scores = args[0] @ args[1].transpose(-1, -2) * scale + args[3]
    scores = scores.masked_fill(torch.isneginf(args[3]), -math.inf)
    # By contract a fully masked row is 0 with zero gradients (torch: NaN); softmax over a
    # finite stand-in row keeps its backward finite too.
    empty = torch.isneginf(args[3]).all(-1, keepdim=True)
    ref = (torch.softmax(scores.masked_fill(empty, 0.0), -1) @ args[2]).masked_fill(empty, 0.0)
    ref_grads = torch.autograd.grad(ref, args, grad.cpu().double())
    out = out.cpu()
    assert torch.equal(out.isnan(), ref.isnan()), f"out: NaN at {out.isnan().sum()} places, torch {ref.isnan().sum()}"
    if L > 1 and where != "scale":
        assert (out[:, :, 0] == 0).all(), "a fully masked row must stay 0"
    for name, a, b in zip(("dq", "dk", "dv", "dmask"), ours, ref_grads):
        a = a.cpu()
        if b.isnan().any():
            assert a.isnan().any(), f"{name}: finite where torch's gradient is NaN"
        assert not (a.isnan() & ~b.isnan()).any(), f"{name}: NaN where torch's gradient is finite"
