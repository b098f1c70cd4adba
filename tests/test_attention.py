"""Fused attention (tx_kernels.functional.scaled_dot_product_attention, the attention_fwd op)
against float64 references, on every backend (tests/cuda_backends.py): the CPU kernels, the CUDA
kernels (csrc/kernels/attention_fwd.cu) emulated on the CPU, and a GPU when present. The cases
through TF.* run the op's backward too; tests/test_attention_bwd.py tests the backward op itself.

Rules (README, "Testing"):
- fp32/fp64: relative error vs a float64 reference under 1e-5 / 1e-12 (forward) and 1e-4 / 1e-5
  (gradients); test_fp64_fwd_bwd_at_fp64_accuracy holds fp64 gradients to 1e-12 too.
- fp16/bf16: max |out - ref| at most 2x stock torch's max error at the same precision, where the
  reference is tx_kernels.reference.attention on float64 upcasts of the very same inputs and
  "stock torch" is the naive composite run in the low precision, as in FlashAttention's own tests
  (torch's CPU SDPA computes partly in fp32: no same-precision baseline for the emulated CUDA
  kernels), and torch's SDPA itself for the CPU kernels and a GPU in
  test_low_precision_within_2x_torch_sdpa_error.
- lse: the float64 logsumexp of the scaled + masked scores (of the same upcast inputs).
- Outputs are poisoned: on the CPU backends every allocation is junk filled (NaN); on a GPU,
  before each op call NaN-filled blocks of exactly the sizes the op will allocate are freed, so
  the caching allocator hands those blocks to the op. Any element the kernel fails to write stays
  NaN and fails the finiteness / equality checks; test_poisoning_reaches_the_op checks the poison
  reaches the op.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tx_kernels.emu
import tx_kernels.functional as TF
from tx_kernels import reference as R
from tx_kernels.reference import philox_words

from attention_refs import attention_inputs, check_lse, make_mask, ref_fwd, torch_low_precision
from conftest import assert_attention_within_torch_error, assert_within_torch_error, rel_err
from cuda_backends import BE, CPU_OPS, allocation_sizes, philox_keep, registered_ops

pytestmark = pytest.mark.usefixtures("backend")
gpu_only = pytest.mark.gpu_only
emu_only = pytest.mark.emu_only

LOW = [torch.float16, torch.bfloat16]
# fp64 at fp64 accuracy on every backend (params.h: scale, lse and every accumulation are double).
FP64_FWD_TOL = 1e-12


def tols(dtype):
    """(forward, gradient) relative-error bounds of the full-precision rule on this backend."""
    if dtype == torch.float64:
        return FP64_FWD_TOL, 1e-5
    return 1e-5, 1e-4


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def run_fwd(q, k, v, mask=None, causal=False, scale=None, dropout_p=0.0, rng=None):
    """The backend's attention_fwd with poisoned output memory; returns (out, lse, reused)."""
    N, H, L, E = q.shape
    Ev = v.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(E)
    if dropout_p > 0.0 and rng is None:
        rng = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64)
    ptrs = BE.poison_blocks([N * H * L * Ev * q.element_size(), N * H * L * 4])
    out, lse = BE.ops.attention_fwd(q, k, v, mask, float(scale), bool(causal), float(dropout_p), rng)
    BE.sync()
    reused = out.data_ptr() in ptrs or lse.data_ptr() in ptrs
    return out, lse, reused


def check_low_precision(q, k, v, mask=None, causal=False, scale=None, name="", result=None):
    """Checks the op's (out, lse) -- `result` when the caller already ran it -- against the rules."""
    out, lse, _ = result or run_fwd(q, k, v, mask=mask, causal=causal, scale=scale)
    ref_out, ref_lse = ref_fwd(q, k, v, mask=mask, causal=causal, scale=scale)
    base = torch_low_precision(q, k, v, mask=mask, causal=causal, scale=scale)
    assert out.dtype == q.dtype and out.shape == (*q.shape[:3], v.shape[-1])
    assert_within_torch_error(out, base, ref_out, factor=2.0, atol=1e-5, name=name)
    check_lse(lse, ref_lse, name)
    return out, lse


def check_through_autograd(shape, dtype, mask_kind=None, is_causal=False):
    """TF.scaled_dot_product_attention and its gradients vs the float64 reference."""
    N, H, Hkv, L, S, E, Ev = shape
    fwd_tol, grad_tol = tols(dtype)
    q, k, v = attention_inputs(N, H, Hkv, L, S, E, Ev, dtype=dtype, requires_grad=True)
    mask = make_mask(mask_kind, N, H, L, S, dtype)
    out = TF.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
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


# ----------------------------------------------------------------------------------------------
# full precision through the functional API (forward and backward)
# ----------------------------------------------------------------------------------------------
# (N, H, Hkv, L, S, E, Ev): ones, odd sizes, primes, one past a tile (65, 129, 257), L != S, Ev != E
SHAPES = [
    (1, 1, 1, 1, 1, 8, 8),
    (2, 3, 3, 5, 7, 16, 16),
    (1, 2, 2, 17, 1, 8, 8),
    (2, 4, 2, 65, 31, 32, 24),
    (1, 3, 1, 129, 257, 64, 64),
    (1, 2, 2, 300, 97, 13, 7),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_reference(shape, dtype, is_causal):
    check_through_autograd(shape, dtype, is_causal=is_causal)


@pytest.mark.parametrize("mask_kind", ["bool_full", "bool_keys", "add_2d", "add_heads"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_masks_through_autograd(mask_kind, is_causal):
    for shape in [(2, 2, 2, 33, 65, 16, 16), (1, 4, 2, 70, 70, 8, 12)]:
        check_through_autograd(shape, torch.float64, mask_kind, is_causal)


def test_fully_masked_rows_give_zero_output_and_gradient():
    N, H, L, S, E = 2, 2, 9, 11, 8
    q, k, v = attention_inputs(N, H, H, L, S, E, dtype=torch.float32, requires_grad=True)
    bool_mask = torch.rand(N, H, L, S, device=BE.device) > 0.5
    bool_mask[:, :, 3] = False  # row 3 sees nothing
    add_mask = torch.zeros(N, 1, L, S, device=BE.device)
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
    pad = torch.ones(1, 1, 1, S, dtype=torch.bool, device=BE.device)
    pad[..., 0] = False
    out = TF.scaled_dot_product_attention(q, k, v, attn_mask=pad, is_causal=True)
    assert (out[:, :, 0] == 0).all() and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_all_minus_inf_without_a_mask_are_nan(dtype):
    # Only the mask (and causality) empties a row. Scores that are all -inf for another reason,
    # here an infinite scale with q . k < 0, give NaN as torch's softmax does, gradients too; the
    # row the mask empties stays 0. (The CUDA general kernels gave 0 for both.)
    N, H, L, S, E = 1, 2, 5, 3, 4
    q = torch.ones(N, H, L, E, dtype=dtype, device=BE.device, requires_grad=True)
    k = -torch.ones(N, H, S, E, dtype=dtype, device=BE.device, requires_grad=True)
    v = torch.randn(N, H, S, E, dtype=dtype, device=BE.device, requires_grad=True)
    mask = torch.ones(L, S, dtype=torch.bool, device=BE.device)
    mask[2] = False
    out = TF.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=float("inf"))
    ref = R.attention(q.detach().cpu().double(), k.detach().cpu().double(), v.detach().cpu().double(),
                      attn_mask=mask.cpu(), scale=float("inf"))
    assert torch.equal(out.isnan().cpu(), ref.isnan()), out
    assert (out[:, :, 2] == 0).all()
    out.backward(torch.ones_like(out))
    assert q.grad.isnan().any() and v.grad.isnan().any()


# The CPU kernels against torch's own SDPA in the same precision (on CPU tensors that baseline
# computes partly in fp32, see attention_refs.torch_sdpa; the CUDA kernels meet the composite's
# rule in test_fast_head_dims and test_masks below, and torch's fused SDPA on a GPU here).
@pytest.mark.backends("cpu", "cuda")
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("is_causal", [False, True])
def test_low_precision_within_2x_torch_sdpa_error(dtype, is_causal):
    L, S = 129, 200
    q, k, v = attention_inputs(2, 4, 4, L, S, 64, dtype=dtype, requires_grad=True)
    mask = torch.randn(1, 1, L, S, dtype=dtype, device=BE.device)
    out = TF.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = R.attention(q64, k64, v64, mask.double(), is_causal=is_causal)
    # Stock torch in the same precision: SDPA with the mask (and causality folded into it).
    causal_mask = torch.ones(L, S, dtype=torch.bool, device=BE.device).tril()
    full_mask = mask if not is_causal else mask.masked_fill(~causal_mask, float("-inf"))
    qt, kt, vt = (t.detach().clone().requires_grad_() for t in (q, k, v))
    torch_out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=full_mask)
    assert_attention_within_torch_error(out, torch_out, ref, (q, k, v), (qt, kt, vt), (q64, k64, v64))


def test_strided_inputs_without_copies():
    N, L, S, H, E = 2, 37, 29, 3, 16
    tol = FP64_FWD_TOL
    # (N, L, H, E) storage viewed as (N, H, L, E): the layout of a fused QKV projection.
    qkv = torch.randn(N, L, 3, H, E, device=BE.device, dtype=torch.float64)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    k, v = k[:, :, :S], v[:, :, :S]
    out = TF.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = R.attention(q, k, v, is_causal=True)
    assert rel_err(out, ref) < tol
    # The output follows the query's layout, so out.transpose(1, 2) is contiguous (N, L, H, E).
    assert out.transpose(1, 2).is_contiguous()
    # A non-unit last-dim stride is accepted too (copied internally).
    q2 = torch.randn(N, H, L, 2 * E, device=BE.device, dtype=torch.float64)[..., ::2]
    out2 = TF.scaled_dot_product_attention(q2, k, v)
    assert rel_err(out2, R.attention(q2, k, v)) < tol


def test_three_dim_inputs_and_default_scale():
    tol = FP64_FWD_TOL
    q, k, v = (torch.randn(3, n, 8, dtype=torch.float64, device=BE.device) for n in (5, 6, 6))
    mask = torch.rand(3, 5, 6, device=BE.device) > 0.2
    mask[..., 0] = True
    out = TF.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert out.shape == (3, 5, 8) and rel_err(out, ref) < tol
    out = TF.scaled_dot_product_attention(q, k, v, scale=0.3)
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v, scale=0.3)) < tol


def test_mask_gradient_reduces_over_broadcast_dims():
    q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64, device=BE.device) for n in (7, 9, 9))
    mask = torch.randn(7, 9, dtype=torch.float64, device=BE.device, requires_grad=True)
    TF.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
    ref_mask = mask.detach().clone().requires_grad_()
    R.attention(q, k, v, ref_mask).sum().backward()
    assert mask.grad.shape == mask.shape
    assert rel_err(mask.grad, ref_mask.grad) < 1e-5


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_key_padding_spanning_whole_key_blocks(kind):
    # Sequence 0 keeps 100 of 600 keys: whole blocks of keys are masked for every query and skipped.
    N, H, L, S, E = 2, 2, BE.pick(17, 70), 600, 16
    dtype = torch.float64
    q, k, v = attention_inputs(N, H, H, L, S, E, dtype=dtype, requires_grad=True)
    keep = torch.arange(S, device=BE.device)[None, :] < torch.tensor([100, 600], device=BE.device)[:, None]
    mask = keep.view(N, 1, 1, S)
    if kind == "additive":
        mask = torch.zeros(N, 1, 1, S, dtype=dtype, device=BE.device).masked_fill(~mask, float("-inf"))
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


def test_autocast_runs_in_the_autocast_dtype():
    q, k, v = (torch.randn(1, 2, 9, 16, device=BE.device) for _ in range(3))
    with torch.autocast(q.device.type, dtype=torch.bfloat16):
        out = TF.scaled_dot_product_attention(q, k, v)
        torch_out = F.scaled_dot_product_attention(q, k, v)
    assert out.dtype == torch_out.dtype == torch.bfloat16
    if BE.emu:  # the CUDA kernels' baseline (torch's CPU SDPA computes partly in fp32)
        torch_out = torch_low_precision(*(t.bfloat16() for t in (q, k, v)))
    assert_within_torch_error(out, torch_out, R.attention(q.double(), k.double(), v.double()))


def test_functional_api():
    q, k, v = attention_inputs(2, 4, 4, 33, 47, 64, dtype=torch.float16)
    out = TF.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref_out, _ = ref_fwd(q, k, v, causal=True)
    base = torch_low_precision(q, k, v, causal=True)
    assert_within_torch_error(out, base, ref_out, name="functional")


# ----------------------------------------------------------------------------------------------
# the op on low precision: head dims x dtypes x causal x awkward lengths (the CUDA fast path)
# ----------------------------------------------------------------------------------------------
# (L, S): one row/key, lengths off every tile size (64/128 rows, 32/64 keys), L != S both ways.
LENGTHS = [(1, 1), (17, 129), (127, 1000), (129, 127), (200, 64)]
LENGTHS_EMU = [(1, 1), (7, 65), (129, 33)]


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("E", [32, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fast_head_dims(dtype, E, causal):
    N, H = BE.pick((1, 2), (2, 3))
    for L, S in BE.pick(LENGTHS_EMU, LENGTHS):
        q, k, v = attention_inputs(N, H, H, L, S, E, dtype=dtype)
        check_low_precision(q, k, v, causal=causal, name=f"E={E} L={L} S={S} causal={causal}")


@gpu_only
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_long_sequence(causal):
    q, k, v = attention_inputs(1, 2, 2, 4097, 4097, 128, dtype=torch.bfloat16)
    check_low_precision(q, k, v, causal=causal, name=f"L=S=4097 causal={causal}")


def test_scale_and_large_scores():
    # Large logits stress the online-softmax rescaling (running max changing between tiles).
    L, S = BE.pick((130, 300), (300, 700))
    q, k, v = attention_inputs(1, 2, 2, L, S, 64, dtype=torch.float16)
    k[:, :, S - 200:S - 190] *= 8.0
    check_low_precision(q, k, v, scale=0.5, name="scale=0.5, spiky keys")


def test_gqa_and_mqa():
    N, H, L, S = BE.pick((1, 4, 65, 130), (2, 8, 129, 257))
    for Hkv in (2, 1):
        q, k, v = attention_inputs(N, H, Hkv, L, S, 64, dtype=torch.bfloat16)
        check_low_precision(q, k, v, name=f"GQA H={H} Hkv={Hkv}")
        check_low_precision(q, k, v, causal=True, name=f"GQA causal H={H} Hkv={Hkv}")


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
def test_transposed_layout(dtype):
    N, H, L, S = BE.pick((1, 3, 70, 90), (2, 4, 129, 200))
    q, k, v = attention_inputs(N, H, H, L, S, 64, dtype=dtype, layout="nlhe")
    assert q.stride(1) < q.stride(2)
    out, _ = check_low_precision(q, k, v, causal=True, name="(N, L, H, E) views")
    # The binding lays the output out like q (heads inner); the values are what matters here.
    assert out.shape == q.shape


# ----------------------------------------------------------------------------------------------
# masks on the op
# ----------------------------------------------------------------------------------------------
MASK_SHAPES = {
    "LS": lambda N, H, L, S: (L, S),
    "N11S": lambda N, H, L, S: (N, 1, 1, S),
    "1HLS": lambda N, H, L, S: (1, H, L, S),
    "NHLS": lambda N, H, L, S: (N, H, L, S),
    "N1L1": lambda N, H, L, S: (N, 1, L, 1),
}


@pytest.mark.parametrize("kind,mdtype", [("bool", None), ("add", torch.float32),
                                         ("add", torch.bfloat16), ("add", torch.float16)],
                         ids=["bool", "add_fp32", "add_bf16", "add_fp16"])
@pytest.mark.parametrize("shape", list(MASK_SHAPES), ids=list(MASK_SHAPES))
@pytest.mark.parametrize("causal", [False, True], ids=["nocausal", "causal"])
def test_masks(kind, mdtype, shape, causal):
    N, H, L, S, E = BE.pick((2, 2, 65, 77, 64), (2, 3, 129, 143, 64))
    q, k, v = attention_inputs(N, H, H, L, S, E, dtype=torch.bfloat16)
    mshape = MASK_SHAPES[shape](N, H, L, S)
    if kind == "bool":
        mask = torch.rand(mshape, device=BE.device) > 0.3
        if shape == "N1L1":
            mask[0, 0, 1] = False  # a whole row masked through a broadcast key dimension
    else:
        mask = (torch.randn(mshape, device=BE.device) * 2.0).to(mdtype)
    check_low_precision(q, k, v, mask=mask, causal=causal, name=f"mask {kind} {mdtype} {shape}")


def test_mask_with_other_dims_and_fp16_inputs():
    # A mask that is itself a strided view (transposed (S, L) storage) and an E=128 instantiation.
    N, H, L, S, E = 1, 2, 77, 300, 128
    q, k, v = attention_inputs(N, H, H, L, S, E, dtype=torch.float16)
    mask = (torch.randn(S, L, device=BE.device)).t()  # stride (1, L)
    check_low_precision(q, k, v, mask=mask, name="transposed additive mask")


def test_fully_masked_rows():
    N, H, L, S, E = 2, 2, 40, 150, 64
    q, k, v = attention_inputs(N, H, H, L, S, E, dtype=torch.bfloat16)
    mask = torch.rand(N, H, L, S, device=BE.device) > 0.5
    mask[:, :, 0] = False
    mask[1, 0, 17] = False
    out, lse, _ = run_fwd(q, k, v, mask=mask)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0])), "fully masked row not zero"
    assert torch.equal(out[1, 0, 17], torch.zeros_like(out[1, 0, 17]))
    assert torch.isneginf(lse[:, :, 0]).all() and torch.isneginf(lse[1, 0, 17])
    ref_out, ref_lse = ref_fwd(q, k, v, mask=mask)
    base = torch_low_precision(q, k, v, mask=mask)
    assert_within_torch_error(out, base, ref_out, name="fully masked rows")
    check_lse(lse, ref_lse, "fully masked rows")
    # The same with an additive mask of -inf, and on the general (fp32) path.
    add = torch.zeros(L, S, device=BE.device)
    add[3] = float("-inf")
    out, lse, _ = run_fwd(q, k, v, mask=add)
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3])) and torch.isneginf(lse[:, :, 3]).all()
    ref_out, ref_lse = ref_fwd(q, k, v, mask=add)
    assert_within_torch_error(out, torch_low_precision(q, k, v, mask=add), ref_out, name="-inf rows")
    check_lse(lse, ref_lse, "-inf rows")
    q32, k32, v32 = q.float(), k.float(), v.float()
    out32, lse32, _ = run_fwd(q32, k32, v32, mask=mask)
    assert torch.equal(out32[:, :, 0], torch.zeros_like(out32[:, :, 0]))
    assert torch.isneginf(lse32[:, :, 0]).all()
    ref_out, ref_lse = ref_fwd(q32, k32, v32, mask=mask)
    assert rel_err(out32, ref_out) < 1e-5
    check_lse(lse32, ref_lse, "fully masked rows, fp32")


# ----------------------------------------------------------------------------------------------
# fp32, fp64, Ev != E, odd head dims (the CUDA general kernel)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_general_full_precision(dtype, causal):
    long_S = BE.pick(200, 1000)
    for (L, S, E, Ev) in [(1, 1, 64, 64), (17, 129, 64, 48), (129, long_S, 33, 65)]:
        q, k, v = attention_inputs(2, 2, 1, L, S, E, Ev, dtype=dtype)
        mask = torch.randn(L, S, device=BE.device, dtype=dtype)
        out, lse, _ = run_fwd(q, k, v, mask=mask, causal=causal)
        ref_out, ref_lse = ref_fwd(q, k, v, mask=mask, causal=causal)
        assert rel_err(out, ref_out) < 1e-5, f"{dtype} L={L} S={S} E={E} Ev={Ev}: {rel_err(out, ref_out)}"
        check_lse(lse, ref_lse, f"{dtype} L={L} S={S}", dtype=dtype)


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
def test_general_low_precision_shapes(dtype):
    # Ev != E, E not a multiple of 8, E > 256: all on the CUDA general kernel in fp32 math.
    for (E, Ev) in [(64, 32), (33, 33), (300, 300), (8, 72)]:
        q, k, v = attention_inputs(1, 2, 2, 65, 130, E, Ev, dtype=dtype)
        check_low_precision(q, k, v, causal=True, name=f"general E={E} Ev={Ev}")


def test_misaligned_views_fall_back():
    # A view starting 4 elements into its storage is not 16-byte aligned: CUDA's general kernel.
    base = torch.randn(1, 2, 100, 68, device=BE.device, dtype=torch.bfloat16)
    q = base[..., 4:]
    k = torch.randn(1, 2, 90, 64, device=BE.device, dtype=torch.bfloat16)
    v = torch.randn(1, 2, 90, 64, device=BE.device, dtype=torch.bfloat16)
    check_low_precision(q, k, v, name="misaligned q")


# ----------------------------------------------------------------------------------------------
# decode (split-KV on CUDA when the binding passes a workspace)
# ----------------------------------------------------------------------------------------------
def run_fwd_counting_splits(q, k, v, mask=None, causal=False):
    """run_fwd on the emulator, plus how many key splits the forward used, read from its workspace
    allocation: (splits, N*H*L, Ev + 1) fp32 partial outputs and lse (split_workspace_bytes)."""
    N, H, L, _ = q.shape
    row_bytes = N * H * L * (v.shape[-1] + 1) * 4
    result, sizes = allocation_sizes(lambda: run_fwd(q, k, v, mask=mask, causal=causal))
    splits = [n // row_bytes for n in sizes if n % row_bytes == 0 and n // row_bytes >= 2]
    assert len(splits) <= 1, f"ambiguous workspace allocations {sizes}"
    return result, (splits[0] if splits else 1)


def check_decode(q, k, v, mask=None, causal=False, name="", split=True):
    if not BE.emu:
        # The CPU kernels do not split keys; a GPU's workspace is not visible to the profiler.
        return check_low_precision(q, k, v, mask=mask, causal=causal, name=name)
    result, splits = run_fwd_counting_splits(q, k, v, mask=mask, causal=causal)
    # The emulated shapes here are chosen to split (or, split=False, not to); a kernel that
    # silently ran unsplit would pass the numerics without testing the split/combine kernels.
    assert (splits >= 2) == split, f"{name}: {splits} key splits"
    return check_low_precision(q, k, v, mask=mask, causal=causal, name=name, result=result)


@pytest.mark.parametrize("L", [1, 5, 16])
@pytest.mark.parametrize("Hkv", [8, 2])
def test_decode_long_kv(L, Hkv):
    if BE.emu:
        # 2 x 8 heads = 16 blocks < 132 SMs; 400 keys = 13 tiles of 32: 6 splits of 2 tiles.
        N, H, S, E = 2, 8, 400, 128
        tx_kernels.emu.set_device("H100")
    else:
        N, H, S, E = 2, 8, 8192, 128
    q, k, v = attention_inputs(N, H, Hkv, L, S, E, dtype=torch.bfloat16)
    check_decode(q, k, v, name=f"decode L={L} Hkv={Hkv}")
    # padding mask of a KV cache: only the first s_n keys of batch n are valid
    mask = torch.zeros(N, 1, 1, S, dtype=torch.bool, device=BE.device)
    mask[0, ..., :S * 5 // 8] = True
    mask[-1, ..., :S - 1] = True
    check_decode(q, k, v, mask=mask, name=f"decode padded L={L} Hkv={Hkv}")


def test_decode_fp16_head_dims():
    S = BE.pick(700, 3000)
    for E in (64, 256):
        q, k, v = attention_inputs(1, 4, 1, 3, S, E, dtype=torch.float16)
        check_decode(q, k, v, name=f"decode E={E}")
        # causal with L=3: only keys 0..2 are useful, one tile: must not split.
        check_decode(q, k, v, causal=True, name=f"decode causal E={E}", split=False)


@emu_only
@pytest.mark.parametrize("E", [64, 128, 256])
def test_a100_device(E):
    # 108 SMs and 163 KB of shared memory: other split counts; every fast config still fits.
    with tx_kernels.emu.device("A100"):
        q, k, v = attention_inputs(1, 4, 2, 2, 900, E, dtype=torch.bfloat16)
        check_decode(q, k, v, name=f"A100 decode E={E}")
        q, k, v = attention_inputs(1, 2, 2, 65, 100, E, dtype=torch.bfloat16)
        check_low_precision(q, k, v, causal=True, name=f"A100 E={E}")


# ----------------------------------------------------------------------------------------------
# dropout: the exact Philox mask of csrc/kernels/philox.h (tx_kernels.reference re-implements it)
# ----------------------------------------------------------------------------------------------
def philox_keep_mask(N, H, L, S, p, rng):
    return philox_keep(N * H * L * S, p, rng).reshape(N, H, L, S).to(BE.device)


@pytest.mark.backends("cpu")  # backend-independent: the NumPy Philox itself
def test_philox_reimplementation_matches_spec_vector():
    # Philox4x32-10 known-answer test (Random123 kat_vectors: counter 0, key 0).
    w = philox_words(np.array([0], dtype=np.uint64), 0, 0)[0]
    assert [hex(int(x)) for x in w] == ["0x6627e8d5", "0xe169c58d", "0xbc57ac4c", "0x9b00dbd8"]


@pytest.mark.parametrize("dtype", LOW + [torch.float32, torch.float64], ids=["fp16", "bf16", "fp32", "fp64"])
def test_dropout_mask_exact(dtype):
    # q = k = 0 gives uniform probabilities 1/S and v = I_S turns the output into the kept
    # probability matrix itself: out[n, h, i, j] = keep(n, h, i, j) / ((1 - p) S).
    N, H, L, S, p = 2, 3, 37, 64, 0.3
    q = torch.zeros(N, H, L, S, device=BE.device, dtype=dtype)
    k = torch.zeros(N, H, S, S, device=BE.device, dtype=dtype)
    v = torch.eye(S, device=BE.device, dtype=dtype).expand(N, H, S, S).contiguous()
    rng = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64)
    out, lse, _ = run_fwd(q, k, v, dropout_p=p, rng=rng)
    keep = philox_keep_mask(N, H, L, S, p, rng)
    kernel_keep = out != 0
    assert torch.equal(kernel_keep, keep), (
        f"dropout mask differs at {(kernel_keep != keep).sum().item()} of {keep.numel()} elements")
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 0.02, f"keep fraction {frac:.4f}, expected {1 - p}"
    expected = keep.double() / ((1 - p) * S)
    # bf16 rounds twice (P before P V, then the output): 2 x 2^-9 relative at most.
    tol = 1e-6 if dtype in (torch.float32, torch.float64) else 1e-2 * expected.max().item()
    assert (out.double() - expected).abs().max().item() <= tol
    # lse ignores dropout: log(S * exp(0)) = log(S)
    assert torch.allclose(lse, torch.full_like(lse, math.log(S)), atol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout_random_inputs(causal):
    N, H, L, S, E, p = 1, 2, 130, 200, 64, 0.2
    q, k, v = attention_inputs(N, H, H, L, S, E, dtype=torch.bfloat16)
    mask = torch.rand(L, S, device=BE.device) > 0.2  # also exercises the mask + dropout combination
    rng = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64)
    out, lse, _ = run_fwd(q, k, v, mask=mask, causal=causal, dropout_p=p, rng=rng)
    keep = philox_keep_mask(N, H, L, S, p, rng)
    ref_out, ref_lse = ref_fwd(q, k, v, mask=mask, causal=causal, dropout_mask=keep, dropout_p=p)
    base = torch_low_precision(q, k, v, mask=mask, causal=causal, dropout_mask=keep, dropout_p=p)
    assert_within_torch_error(out, base, ref_out, factor=2.0, atol=1e-5, name="dropout")
    check_lse(lse, ref_lse, "dropout")


def test_dropout_matches_cpu_op():
    N, H, L, S, E, p = 1, 2, 70, 90, 64, 0.25
    q, k, v = attention_inputs(N, H, H, L, S, E, dtype=torch.bfloat16)
    rng = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64)
    out, _, _ = run_fwd(q, k, v, causal=True, dropout_p=p, rng=rng)
    scale = 1.0 / math.sqrt(E)
    cpu_out, _ = CPU_OPS.attention_fwd(q.double().cpu(), k.double().cpu(), v.double().cpu(), None,
                                       scale, True, p, rng)
    keep = philox_keep_mask(N, H, L, S, p, rng)
    ref_out, _ = ref_fwd(q, k, v, causal=True, dropout_mask=keep, dropout_p=p)
    # The CPU op on float64 upcasts must equal the float64 reference with the Philox mask...
    assert rel_err(cpu_out, ref_out.cpu()) < 1e-8
    # ...and this backend's bf16 output must be as close to it as stock torch in bf16 with the
    # same keep mask: a single differing keep decision would be an O(|v|) error and fail this.
    base = torch_low_precision(q, k, v, causal=True, dropout_mask=keep, dropout_p=p)
    assert_within_torch_error(out.cpu(), base.cpu(), cpu_out, name="dropout vs the CPU op")


def _keep_mask(q, k, rng, p):
    """The dropout keep-mask the kernel draws for this rng, read back by attending to one-hot values."""
    N, H, L, E = q.shape
    S = k.shape[2]
    eye = torch.eye(S, dtype=q.dtype, device=q.device).expand(N, k.shape[1], S, S)
    probs, _ = BE.ops.attention_fwd(q, k, eye, None, 1.0 / math.sqrt(E), False, p, rng)
    return probs != 0


def test_dropout_through_autograd():
    N, H, L, S, E, p = 2, 3, 40, 50, 8, 0.3
    q, k, v = (torch.randn(N, H, n, E, dtype=torch.float64, device=BE.device) for n in (L, S, S))
    rng = torch.tensor([1234567, 89], dtype=torch.int64)
    keep = _keep_mask(q, k, rng, p)
    assert abs(keep.double().mean().item() - (1 - p)) < 0.02
    # Same rng, same mask; the output equals the reference with that mask, and so do gradients.
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out, _ = BE.ops.attention_fwd(qg, kg, vg, None, 1.0 / math.sqrt(E), False, p, rng)
    ref = R.attention(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(),
                      dropout_mask=keep, dropout_p=p)
    assert rel_err(out, ref) < FP64_FWD_TOL
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


# ----------------------------------------------------------------------------------------------
# harness, registration, gradcheck
# ----------------------------------------------------------------------------------------------
def test_poisoning_reaches_the_op():
    q, k, v = attention_inputs(2, 3, 3, 129, 130, 64, dtype=torch.bfloat16)
    N, H, L, _ = q.shape
    if BE.name in ("cpu", "emu"):
        # The op's outputs must be fresh CPU allocations (junk filled while the test runs, as the
        # probe shows), not memory handed out before the fill was switched on.
        probe = torch.empty(N * H * L, dtype=torch.float32)
        assert probe.isnan().all(), "CPU junk fill is off: unwritten outputs would go unnoticed"
        _, sizes = allocation_sizes(lambda: run_fwd(q, k, v))
        for name, nbytes in (("out", N * H * L * v.shape[-1] * 2), ("lse", N * H * L * 4)):
            assert nbytes in sizes, f"`{name}` ({nbytes} bytes) was not allocated by the op: {sizes}"
        return
    reused_any = False
    for _ in range(3):
        _, _, reused = run_fwd(q, k, v)
        reused_any |= reused
    assert reused_any, ("the caching allocator did not hand the NaN-poisoned blocks to the op; "
                        "every unwritten-output check of this file is blind")


def test_gradcheck_fp64():
    torch.manual_seed(0)
    make = lambda *s: torch.randn(*s, dtype=torch.float64, device=BE.device, requires_grad=True)  # noqa: E731
    q, k, v = make(1, 2, 4, 5), make(1, 2, 6, 5), make(1, 2, 6, 5)
    mask = make(1, 1, 4, 6)
    torch.autograd.gradcheck(lambda q, k, v, m: TF.scaled_dot_product_attention(q, k, v, attn_mask=m),
                             (q, k, v, mask))
    torch.autograd.gradcheck(lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, is_causal=True),
                             (q, k, v))
    kv_heads = [make(1, 1, 6, 5) for _ in range(2)]
    torch.autograd.gradcheck(
        lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, enable_gqa=True), (q, *kv_heads))
    rng = torch.tensor([5, 6], dtype=torch.int64)
    torch.autograd.gradcheck(lambda q, k, v: BE.ops.attention_fwd(q, k, v, None, 0.5, False, 0.25, rng)[0],
                             (q, k, v))


def _opcheck_samples():
    make = lambda *s: torch.randn(*s, device=BE.device, requires_grad=True)  # noqa: E731
    q, k, v = make(2, 4, 5, 8), make(2, 4, 7, 8), make(2, 4, 7, 8)
    kv = [make(2, 2, 7, 8) for _ in range(2)]
    mask = torch.randn(1, 4, 5, 7, device=BE.device)
    bmask = torch.rand(2, 1, 1, 7, device=BE.device) > 0.3
    rng = torch.tensor([3, 4], dtype=torch.int64)
    return [
        (q, k, v, None, 0.35, False, 0.0, None),
        (q, *kv, bmask, 0.35, True, 0.0, None),
        (q, k, v, mask, 0.35, False, 0.2, rng),
        (q.transpose(1, 2).contiguous().transpose(1, 2), k, v, None, 0.35, True, 0.0, None),
    ]


@registered_ops
@pytest.mark.parametrize("sample", range(4))
def test_opcheck(sample):
    args = _opcheck_samples()[sample]
    torch.library.opcheck(BE.ops.attention_fwd, args)
    out, lse = BE.ops.attention_fwd(*args)
    q, k, v, mask, scale, causal, p, rng = args
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, mask,
                scale, causal, p, rng, mask is not None and mask.is_floating_point())
    torch.library.opcheck(BE.ops.attention_bwd, bwd_args)


@registered_ops
def test_torch_compile_fullgraph():
    q, k, v = (torch.randn(2, 2, 9, 8, device=BE.device, requires_grad=True) for _ in range(3))
    mask = torch.randn(9, 9, device=BE.device)

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


# ----------------------------------------------------------------------------------------------
# fp64 at fp64 accuracy, forward and backward: a kernel that narrows the scale, the dropout factor,
# lse or an accumulation to float is off by ~1e-8 relative, a million times what fp64 costs here.
# ----------------------------------------------------------------------------------------------
FP64_SCALE = 1.0 / 3.0  # not a float: narrowing it to float shows (3e-8 relative)


def _fp64_inputs(N, H, Hkv, L, S, E, Ev):
    make = lambda *s: torch.randn(*s, device=BE.device, dtype=torch.float64)
    return make(N, H, L, E), make(N, Hkv, S, E), make(N, Hkv, S, Ev)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "additive"])
def test_fp64_fwd_bwd_at_fp64_accuracy(causal, masked):
    N, H, Hkv, L, S, E, Ev = 1, 2, 1, 23, 37, 16, 12
    q, k, v = _fp64_inputs(N, H, Hkv, L, S, E, Ev)
    mask = torch.randn(1, H, L, S, device=BE.device, dtype=torch.float64) if masked else None
    out, lse = BE.ops.attention_fwd(q, k, v, mask, FP64_SCALE, causal, 0.0, None)
    grad = torch.randn_like(out)
    dq, dk, dv, dmask = BE.ops.attention_bwd(grad, q, k, v, out, lse, mask, FP64_SCALE, causal, 0.0, None, masked)
    BE.sync()
    assert out.dtype == lse.dtype == torch.float64

    q64, k64, v64 = (t.detach().cpu().requires_grad_() for t in (q, k, v))
    m64 = mask.detach().cpu().requires_grad_() if masked else None
    ref = R.attention(q64, k64, v64, m64, is_causal=causal, scale=FP64_SCALE)
    scores = torch.matmul(q64, k64.repeat_interleave(H // Hkv, 1).transpose(-2, -1)) * FP64_SCALE
    if masked:
        scores = scores + m64
    if causal:
        scores = scores.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
    ref_lse = torch.logsumexp(scores, -1)
    inputs = [q64, k64, v64] + ([m64] if masked else [])
    want = torch.autograd.grad(ref, inputs, grad.cpu())

    assert rel_err(out.cpu(), ref) < FP64_FWD_TOL, f"out: {rel_err(out.cpu(), ref):.3e}"
    assert rel_err(lse.cpu(), ref_lse) < FP64_FWD_TOL, f"lse: {rel_err(lse.cpu(), ref_lse):.3e}"
    got = [dq, dk, dv] + ([dmask] if masked else [])
    for name, a, b in zip(("dq", "dk", "dv", "dmask"), got, want):
        assert rel_err(a.cpu(), b) < FP64_FWD_TOL, f"{name}: relative error {rel_err(a.cpu(), b):.3e}"


@pytest.mark.backends("emu", "cuda")
def test_fp64_dropout_at_fp64_accuracy():
    # The dropout factor 1 / (1 - p) is double too; the CPU op (fp64 throughout, the same Philox
    # keep decisions) is the reference.
    N, H, Hkv, L, S, E, Ev, p = 1, 2, 2, 19, 29, 8, 8, 0.3
    q, k, v = _fp64_inputs(N, H, Hkv, L, S, E, Ev)
    rng = torch.tensor([int(torch.randint(0, 2**62, ()).item()), 5], dtype=torch.int64)
    out, lse = BE.ops.attention_fwd(q, k, v, None, FP64_SCALE, True, p, rng)
    grad = torch.randn_like(out)
    got = BE.ops.attention_bwd(grad, q, k, v, out, lse, None, FP64_SCALE, True, p, rng, False)[:3]
    BE.sync()
    cpu = [t.cpu() for t in (q, k, v, grad)]
    out_c, lse_c = CPU_OPS.attention_fwd(cpu[0], cpu[1], cpu[2], None, FP64_SCALE, True, p, rng)
    want = CPU_OPS.attention_bwd(cpu[3], cpu[0], cpu[1], cpu[2], out_c, lse_c, None, FP64_SCALE, True, p, rng,
                                 False)[:3]
    assert rel_err(out.cpu(), out_c) < FP64_FWD_TOL, f"out: {rel_err(out.cpu(), out_c):.3e}"
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert rel_err(a.cpu(), b) < FP64_FWD_TOL, f"{name}: relative error {rel_err(a.cpu(), b):.3e}"
