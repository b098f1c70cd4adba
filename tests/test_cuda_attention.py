"""CUDA attention forward (csrc/kernels/attention_fwd.cu) against float64 references.

Every test runs on each CUDA backend of tests/cuda_backends.py: the CPU emulator of the kernels
("emu", always; small shapes that still reach every code path) and a real GPU ("cuda", when present;
the same tests, plus a few large shapes marked gpu_only).

Rules followed (see /work/shared/ARCHITECTURE.md):
- fp16/bf16: max |out - ref| at most 2x stock torch's max error at the same precision, where the
  reference is tx_kernels.reference.attention on float64 upcasts of the very same inputs and
  "stock torch" is the naive composite (reference.attention) run in the low precision, as in
  FlashAttention's own tests.
- fp32/fp64 (general kernel): relative error under 1e-5.
- lse: the float64 logsumexp of the scaled + masked scores (of the same upcast inputs).
- Outputs are poisoned: on a GPU, before each op call we allocate NaN-filled tensors of exactly
  the sizes the op will allocate (out, lse) and free them, so the CUDA caching allocator hands those
  blocks to the op (same size class, same stream); on the emulator every CPU allocation is junk
  filled. Any element the kernel fails to write stays NaN and fails the isfinite / equality checks.
  test_poisoning_reaches_the_op checks the poison reaches the op.
"""
import math

import numpy as np
import pytest
import torch

import tx_kernels
import tx_kernels.emu
from tx_kernels import reference

from conftest import assert_within_torch_error, rel_err
from cuda_backends import BE, CPU_OPS, allocation_sizes, philox_keep
from tx_kernels.reference import philox_words

pytestmark = pytest.mark.usefixtures("cuda_backend")
gpu_only = pytest.mark.gpu_only

LOW = [torch.float16, torch.bfloat16]


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


def _expand_kv(t, H):
    return t.repeat_interleave(H // t.shape[1], dim=1) if t.shape[1] != H else t


def ref_fwd(q, k, v, mask=None, causal=False, scale=None, dropout_mask=None, dropout_p=0.0):
    """float64 reference output and lse from the definitions (tx_kernels.reference)."""
    N, H, L, E = q.shape
    S = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(E)
    q64, k64, v64 = q.double(), k.double(), v.double()
    m64 = mask if mask is None or mask.dtype == torch.bool else mask.double()
    out = reference.attention(q64, k64, v64, attn_mask=m64, is_causal=causal, scale=scale,
                              dropout_mask=dropout_mask, dropout_p=dropout_p)
    kk = _expand_kv(k64, H)
    scores = torch.matmul(q64, kk.transpose(-2, -1)) * scale
    allowed = torch.ones(L, S, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()
    allowed = allowed.expand(N, H, L, S)
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask.expand(N, H, L, S)
        else:
            scores = scores + m64
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return out, lse


def torch_low_precision(q, k, v, mask=None, causal=False, scale=None, dropout_mask=None,
                        dropout_p=0.0):
    """Stock torch at the inputs' precision: the naive composite (matmul, softmax, matmul) run in
    fp16/bf16, FlashAttention's own baseline. (F.scaled_dot_product_attention is allowed too by
    the brief; it gives NaN on fully masked rows and picks backends by shape, so the composite is
    the stable choice.)"""
    H = q.shape[1]
    m = mask if mask is None or mask.dtype == torch.bool else mask.to(q.dtype)
    return reference.attention(q, _expand_kv(k, H), _expand_kv(v, H), attn_mask=m,
                               is_causal=causal, scale=scale, dropout_mask=dropout_mask,
                               dropout_p=dropout_p)


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


def check_low_precision(q, k, v, mask=None, causal=False, scale=None, name="", result=None):
    """Checks the op's (out, lse) -- `result` when the caller already ran it -- against the rules."""
    out, lse, _ = result or run_fwd(q, k, v, mask=mask, causal=causal, scale=scale)
    ref_out, ref_lse = ref_fwd(q, k, v, mask=mask, causal=causal, scale=scale)
    base = torch_low_precision(q, k, v, mask=mask, causal=causal, scale=scale)
    assert out.dtype == q.dtype and out.shape == (*q.shape[:3], v.shape[-1])
    assert_within_torch_error(out, base, ref_out, factor=2.0, atol=1e-5, name=name)
    check_lse(lse, ref_lse, name)
    return out, lse


def rand_qkv(N, H, L, S, E, Ev=None, Hkv=None, dtype=torch.bfloat16, layout="nhle"):
    Ev = E if Ev is None else Ev
    Hkv = H if Hkv is None else Hkv
    if layout == "nlhe":  # (N, L, H, E) memory viewed as (N, H, L, E)
        q = torch.randn(N, L, H, E, device=BE.device, dtype=dtype).transpose(1, 2)
        k = torch.randn(N, S, Hkv, E, device=BE.device, dtype=dtype).transpose(1, 2)
        v = torch.randn(N, S, Hkv, Ev, device=BE.device, dtype=dtype).transpose(1, 2)
    else:
        q = torch.randn(N, H, L, E, device=BE.device, dtype=dtype)
        k = torch.randn(N, Hkv, S, E, device=BE.device, dtype=dtype)
        v = torch.randn(N, Hkv, S, Ev, device=BE.device, dtype=dtype)
    return q, k, v


# ----------------------------------------------------------------------------------------------
# fast path: head dims x dtypes x causal x awkward lengths
# ----------------------------------------------------------------------------------------------
# (L, S): one row/key, lengths off every tile size (64/128 rows, 32/64 keys), L != S both ways.
SHAPES = [(1, 1), (17, 129), (127, 1000), (129, 127), (200, 64)]
SHAPES_EMU = [(1, 1), (7, 65), (129, 33)]


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("E", [32, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fast_head_dims(dtype, E, causal):
    N, H = (1, 2) if BE.emu else (2, 3)
    for L, S in (SHAPES_EMU if BE.emu else SHAPES):
        q, k, v = rand_qkv(N, H, L, S, E, dtype=dtype)
        check_low_precision(q, k, v, causal=causal, name=f"E={E} L={L} S={S} causal={causal}")


@gpu_only
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_long_sequence(causal):
    q, k, v = rand_qkv(1, 2, 4097, 4097, 128, dtype=torch.bfloat16)
    check_low_precision(q, k, v, causal=causal, name=f"L=S=4097 causal={causal}")


def test_scale_and_large_scores():
    # Large logits stress the online-softmax rescaling (running max changing between tiles).
    L, S = (130, 300) if BE.emu else (300, 700)
    q, k, v = rand_qkv(1, 2, L, S, 64, dtype=torch.float16)
    k[:, :, S - 200:S - 190] *= 8.0
    check_low_precision(q, k, v, scale=0.5, name="scale=0.5, spiky keys")


def test_gqa_and_mqa():
    N, H, L, S = (1, 4, 65, 130) if BE.emu else (2, 8, 129, 257)
    for Hkv in (2, 1):
        q, k, v = rand_qkv(N, H, L, S, 64, Hkv=Hkv, dtype=torch.bfloat16)
        check_low_precision(q, k, v, name=f"GQA H={H} Hkv={Hkv}")
        check_low_precision(q, k, v, causal=True, name=f"GQA causal H={H} Hkv={Hkv}")


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
def test_transposed_layout(dtype):
    N, H, L, S = (1, 3, 70, 90) if BE.emu else (2, 4, 129, 200)
    q, k, v = rand_qkv(N, H, L, S, 64, dtype=dtype, layout="nlhe")
    assert q.stride(1) < q.stride(2)
    out, _ = check_low_precision(q, k, v, causal=True, name="(N, L, H, E) views")
    # The binding lays the output out like q (heads inner); the values are what matters here.
    assert out.shape == q.shape


# ----------------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------------
def _mask(shape, kind, dtype=None):
    if kind == "bool":
        m = torch.rand(shape, device=BE.device) > 0.3
        return m
    return (torch.randn(shape, device=BE.device) * 2.0).to(dtype)


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
    N, H, L, S, E = (2, 2, 65, 77, 64) if BE.emu else (2, 3, 129, 143, 64)
    q, k, v = rand_qkv(N, H, L, S, E, dtype=torch.bfloat16)
    mask = _mask(MASK_SHAPES[shape](N, H, L, S), kind, mdtype)
    if kind == "bool" and shape == "N1L1":
        mask[0, 0, 1] = False  # a whole row masked through a broadcast key dimension
    check_low_precision(q, k, v, mask=mask, causal=causal, name=f"mask {kind} {mdtype} {shape}")


def test_mask_with_other_dims_and_fp16_inputs():
    # A mask that is itself a strided view (transposed (S, L) storage) and an E=128 instantiation.
    N, H, L, S, E = 1, 2, 77, 300, 128
    q, k, v = rand_qkv(N, H, L, S, E, dtype=torch.float16)
    mask = (torch.randn(S, L, device=BE.device)).t()  # stride (1, L)
    check_low_precision(q, k, v, mask=mask, name="transposed additive mask")


def test_fully_masked_rows():
    N, H, L, S, E = 2, 2, 40, 150, 64
    q, k, v = rand_qkv(N, H, L, S, E, dtype=torch.bfloat16)
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
# general kernel: fp32, fp64, Ev != E, odd head dims
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_general_full_precision(dtype, causal):
    long_S = 200 if BE.emu else 1000
    for (L, S, E, Ev) in [(1, 1, 64, 64), (17, 129, 64, 48), (129, long_S, 33, 65)]:
        q, k, v = rand_qkv(2, 2, L, S, E, Ev=Ev, Hkv=1, dtype=dtype)
        mask = torch.randn(L, S, device=BE.device, dtype=dtype)
        out, lse, _ = run_fwd(q, k, v, mask=mask, causal=causal)
        ref_out, ref_lse = ref_fwd(q, k, v, mask=mask, causal=causal)
        assert rel_err(out, ref_out) < 1e-5, f"{dtype} L={L} S={S} E={E} Ev={Ev}: {rel_err(out, ref_out)}"
        check_lse(lse, ref_lse, f"{dtype} L={L} S={S}", dtype=dtype)


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
def test_general_low_precision_shapes(dtype):
    # Ev != E, E not a multiple of 8, E > 256: all on the general kernel in fp32 math.
    for (E, Ev) in [(64, 32), (33, 33), (300, 300), (8, 72)]:
        q, k, v = rand_qkv(1, 2, 65, 130, E, Ev=Ev, dtype=dtype)
        check_low_precision(q, k, v, causal=True, name=f"general E={E} Ev={Ev}")


def test_misaligned_views_fall_back():
    # A view starting 4 elements into its storage is not 16-byte aligned: general kernel.
    base = torch.randn(1, 2, 100, 68, device=BE.device, dtype=torch.bfloat16)
    q = base[..., 4:]
    k = torch.randn(1, 2, 90, 64, device=BE.device, dtype=torch.bfloat16)
    v = torch.randn(1, 2, 90, 64, device=BE.device, dtype=torch.bfloat16)
    check_low_precision(q, k, v, name="misaligned q")


# ----------------------------------------------------------------------------------------------
# decode (split-KV when the binding passes a workspace)
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
    q, k, v = rand_qkv(N, H, L, S, E, Hkv=Hkv, dtype=torch.bfloat16)
    check_decode(q, k, v, name=f"decode L={L} Hkv={Hkv}")
    # padding mask of a KV cache: only the first s_n keys of batch n are valid
    mask = torch.zeros(N, 1, 1, S, dtype=torch.bool, device=BE.device)
    mask[0, ..., :S * 5 // 8] = True
    mask[-1, ..., :S - 1] = True
    check_decode(q, k, v, mask=mask, name=f"decode padded L={L} Hkv={Hkv}")


def test_decode_fp16_head_dims():
    S = 700 if BE.emu else 3000
    for E in (64, 256):
        q, k, v = rand_qkv(1, 4, 3, S, E, Hkv=1, dtype=torch.float16)
        check_decode(q, k, v, name=f"decode E={E}")
        # causal with L=3: only keys 0..2 are useful, one tile: must not split.
        check_decode(q, k, v, causal=True, name=f"decode causal E={E}", split=False)


@pytest.mark.emu_only
@pytest.mark.parametrize("E", [64, 128, 256])
def test_a100_device(E):
    # 108 SMs and 163 KB of shared memory: other split counts; every fast config still fits.
    with tx_kernels.emu.device("A100"):
        q, k, v = rand_qkv(1, 4, 2, 900, E, Hkv=2, dtype=torch.bfloat16)
        check_decode(q, k, v, name=f"A100 decode E={E}")
        q, k, v = rand_qkv(1, 2, 65, 100, E, dtype=torch.bfloat16)
        check_low_precision(q, k, v, causal=True, name=f"A100 E={E}")


# ----------------------------------------------------------------------------------------------
# dropout: the exact Philox mask of csrc/kernels/philox.h, re-implemented in cuda_backends.py
# ----------------------------------------------------------------------------------------------
def philox_keep_mask(N, H, L, S, p, rng):
    return philox_keep(N * H * L * S, p, rng).reshape(N, H, L, S)


def test_philox_reimplementation_matches_spec_vector():
    # Philox4x32-10 known-answer test (Random123 kat_vectors: counter 0, key 0).
    w = philox_words(np.array([0], dtype=np.uint64), 0, 0)[0]
    assert [hex(int(x)) for x in w] == ["0x6627e8d5", "0xe169c58d", "0xbc57ac4c", "0x9b00dbd8"]


@pytest.mark.parametrize("dtype", LOW + [torch.float32], ids=["fp16", "bf16", "fp32"])
def test_dropout_mask_exact(dtype):
    # q = k = 0 gives uniform probabilities 1/S and v = I_S turns the output into the kept
    # probability matrix itself: out[n, h, i, j] = keep(n, h, i, j) / ((1 - p) S).
    N, H, L, S, p = 2, 3, 37, 64, 0.3
    q = torch.zeros(N, H, L, S, device=BE.device, dtype=dtype)
    k = torch.zeros(N, H, S, S, device=BE.device, dtype=dtype)
    v = torch.eye(S, device=BE.device, dtype=dtype).expand(N, H, S, S).contiguous()
    rng = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64)
    out, lse, _ = run_fwd(q, k, v, dropout_p=p, rng=rng)
    keep = philox_keep_mask(N, H, L, S, p, rng).to(BE.device)
    kernel_keep = out != 0
    assert torch.equal(kernel_keep, keep), (
        f"dropout mask differs at {(kernel_keep != keep).sum().item()} of {keep.numel()} elements")
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 0.02, f"keep fraction {frac:.4f}, expected {1 - p}"
    expected = keep.double() / ((1 - p) * S)
    # bf16 rounds twice (P before P V, then the output): 2 x 2^-9 relative at most.
    tol = 1e-6 if dtype == torch.float32 else 1e-2 * expected.max().item()
    assert (out.double() - expected).abs().max().item() <= tol
    # lse ignores dropout: log(S * exp(0)) = log(S)
    assert torch.allclose(lse, torch.full_like(lse, math.log(S)), atol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout_random_inputs(causal):
    N, H, L, S, E, p = 1, 2, 130, 200, 64, 0.2
    q, k, v = rand_qkv(N, H, L, S, E, dtype=torch.bfloat16)
    mask = torch.rand(L, S, device=BE.device) > 0.2  # also exercises the mask + dropout combination
    rng = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64)
    out, lse, _ = run_fwd(q, k, v, mask=mask, causal=causal, dropout_p=p, rng=rng)
    keep = philox_keep_mask(N, H, L, S, p, rng).to(BE.device)
    ref_out, ref_lse = ref_fwd(q, k, v, mask=mask, causal=causal, dropout_mask=keep, dropout_p=p)
    base = torch_low_precision(q, k, v, mask=mask, causal=causal, dropout_mask=keep, dropout_p=p)
    assert_within_torch_error(out, base, ref_out, factor=2.0, atol=1e-5, name="dropout")
    check_lse(lse, ref_lse, "dropout")


def test_dropout_matches_cpu_op():
    N, H, L, S, E, p = 1, 2, 70, 90, 64, 0.25
    q, k, v = rand_qkv(N, H, L, S, E, dtype=torch.bfloat16)
    rng = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64)
    out, _, _ = run_fwd(q, k, v, causal=True, dropout_p=p, rng=rng)
    scale = 1.0 / math.sqrt(E)
    cpu_out, _ = CPU_OPS.attention_fwd(q.double().cpu(), k.double().cpu(), v.double().cpu(), None,
                                       scale, True, p, rng)
    keep = philox_keep_mask(N, H, L, S, p, rng)
    ref_out, _ = ref_fwd(q, k, v, causal=True, dropout_mask=keep.to(BE.device), dropout_p=p)
    # The CPU op on float64 upcasts must equal the float64 reference with the Philox mask...
    assert rel_err(cpu_out, ref_out.cpu()) < 1e-8
    # ...and the CUDA bf16 output must be as close to it as stock torch in bf16 with the same
    # keep mask: a single differing keep decision would be an O(|v|) error and fail this.
    base = torch_low_precision(q, k, v, causal=True, dropout_mask=keep.to(BE.device), dropout_p=p)
    assert_within_torch_error(out.cpu(), base.cpu(), cpu_out, name="CUDA vs CPU dropout")


# ----------------------------------------------------------------------------------------------
# harness checks
# ----------------------------------------------------------------------------------------------
def test_poisoning_reaches_the_op():
    q, k, v = rand_qkv(2, 3, 129, 130, 64, dtype=torch.bfloat16)
    N, H, L, _ = q.shape
    if BE.emu:
        # The op's outputs come from the same junk-filled CPU allocator as this tensor.
        probe = torch.empty(N * H * L, dtype=torch.float32)
        assert probe.isnan().all(), "CPU junk fill is off: unwritten outputs would go unnoticed"
        return
    reused_any = False
    for _ in range(3):
        _, _, reused = run_fwd(q, k, v)
        reused_any |= reused
    assert reused_any, ("the caching allocator did not hand the NaN-poisoned blocks to the op; "
                        "every unwritten-output check of this file is blind")


def test_functional_api_on_cuda():
    q, k, v = rand_qkv(2, 4, 33, 47, 64, dtype=torch.float16)
    out = tx_kernels.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref_out, _ = ref_fwd(q, k, v, causal=True)
    base = torch_low_precision(q, k, v, causal=True)
    assert_within_torch_error(out, base, ref_out, name="functional")
