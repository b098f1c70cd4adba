"""Variable-length attention (tx_kernels.functional.attention_varlen) against float64 references.

The reference attends each sequence on its own with tx_kernels.reference.attention (the textbook
formula), so packing, offsets and the per-sequence causal mask are all checked independently.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import tx_kernels.functional as TF
from tx_kernels import reference as R
from tx_kernels.ops import ops

from conftest import assert_attention_within_torch_error, rel_err
from cuda_backends import BE, CPU_OPS

pytestmark = pytest.mark.usefixtures("poison")

# (H, Hkv, E, Ev, q lengths, k lengths or None for self-attention): lengths 0 and 1, primes, one
# past a tile (65, 257), all-empty batches, cross-attention with lengths that differ per sequence.
CASES = [
    (1, 1, 8, 8, [1], None),
    (2, 2, 16, 16, [5, 0, 7, 1, 3], None),
    (4, 2, 32, 24, [65, 1, 2, 0, 31], None),
    (3, 1, 13, 7, [129, 17, 257], None),
    (2, 2, 8, 8, [0, 0], None),
    (2, 1, 16, 16, [9, 4, 0, 6], [3, 11, 5, 0]),
    (4, 4, 8, 12, [70, 1], [1, 300]),
]


def _cu(lengths):
    return TF.cu_seqlens_from_lengths(torch.tensor(lengths, dtype=torch.int64))


def _inputs(H, Hkv, E, Ev, lq, lk, dtype, requires_grad=True):
    make = lambda *s: torch.randn(*s, dtype=dtype).requires_grad_(requires_grad)
    return make(sum(lq), H, E), make(sum(lk), Hkv, E), make(sum(lk), Hkv, Ev)


def reference(q, k, v, lq, lk, causal=False, scale=None, keep=None, p=0.0):
    """Each sequence attended alone (in q's dtype); keep[b] is its (H, max_q, max_k) keep-mask."""
    outs, i0, j0 = [], 0, 0
    for b, (L, S) in enumerate(zip(lq, lk)):
        qb, kb, vb = q[i0:i0 + L], k[j0:j0 + S], v[j0:j0 + S]
        if S == 0:  # no key at all: the fully-masked-row rule gives 0
            outs.append(q.new_zeros(L, q.shape[1], v.shape[2]) + 0 * qb.sum())
        else:
            drop = None if keep is None else keep[b][:, :L, :S].unsqueeze(0)
            o = R.attention(qb.transpose(0, 1)[None], kb.transpose(0, 1)[None], vb.transpose(0, 1)[None],
                            is_causal=causal, scale=scale, dropout_mask=drop, dropout_p=p)
            outs.append(o[0].transpose(0, 1))
        i0, j0 = i0 + L, j0 + S
    return torch.cat(outs) if outs else q.new_zeros(0, q.shape[1], v.shape[2])


def _run(q, k, v, lq, lk, causal, **kw):
    return TF.attention_varlen(q, k, v, _cu(lq), _cu(lk), max(lq, default=0), max(lk, default=0),
                               causal=causal, **kw)


# fp64 gradients: the saved logsumexp is fp32 (as for the padded op; tests/test_attention.py).
TOLS = {torch.float64: (1e-12, 1e-5), torch.float32: (1e-5, 1e-4)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"H{c[0]}kv{c[1]}-{c[4]}-{c[5]}")
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference(case, dtype, causal):
    H, Hkv, E, Ev, lq, lk = case
    lk = lq if lk is None else lk
    q, k, v = _inputs(H, Hkv, E, Ev, lq, lk, dtype)
    out = _run(q, k, v, lq, lk, causal)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, lq, lk, causal)
    assert out.shape == ref.shape == (sum(lq), H, Ev) and out.dtype == dtype
    fwd_tol, grad_tol = TOLS[dtype]
    assert rel_err(out, ref) < fwd_tol, f"forward error {rel_err(out, ref):.3e}"
    if out.numel() == 0:
        return
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q64, k64, v64), grad.double(), allow_unused=True)
    for name, g, w in zip("qkv", got, want):
        w = torch.zeros_like(g, dtype=torch.float64) if w is None else w
        assert rel_err(g, w) < grad_tol, f"d{name} error {rel_err(g, w):.3e}"


def test_strided_packed_qkv_and_scale():
    # BERT's fused QKV projection viewed as q, k, v without a copy: (T, 3, H, E)[:, i].
    lq, H, E = [6, 0, 11, 1], 3, 16
    qkv = torch.randn(sum(lq), 3, H, E, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous()
    out = _run(q, k, v, lq, lq, True, softmax_scale=0.3)
    ref = reference(q, k, v, lq, lq, True, scale=0.3)
    assert rel_err(out, ref) < 1e-12
    grad = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, qkv, grad)
    (w,) = torch.autograd.grad(ref, qkv, grad)
    assert rel_err(g, w) < 1e-5


def test_equals_padded_op_with_key_padding_mask():
    lq, H, E = [7, 1, 12, 3], 2, 8
    N, L = len(lq), max(lq)
    x = torch.randn(N, L, 3, H, E, dtype=torch.float64)
    real = torch.arange(L)[None] < torch.tensor(lq)[:, None]
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    padded = TF.scaled_dot_product_attention(q, k, v, attn_mask=real[:, None, None, :])
    packed, idx, cu, max_len = TF.unpad_input(x, real)
    assert torch.equal(cu, _cu(lq)) and max_len == L
    out = TF.attention_varlen(packed[:, 0], packed[:, 1], packed[:, 2], cu, cu, max_len, max_len)
    back = TF.pad_input(out, idx, N, L)
    assert rel_err(back[real], padded.transpose(1, 2)[real]) < 1e-12
    assert (back[~real] == 0).all()


def _keep_masks(lq, lk, H, E, rng, p):
    """Keep-masks (per sequence, (H, max_q, max_k)) read back from the padded op on a one-hot value.

    The varlen op documents that it drops what the padded op drops on the batch padded to the
    maximum lengths; tests/test_attention.py checks the padded op's dropout against a reference.
    """
    N, Lm, Sm = len(lq), max(lq), max(lk)
    q, k = torch.randn(N, H, Lm, E, dtype=torch.float64), torch.randn(N, H, Sm, E, dtype=torch.float64)
    eye = torch.eye(Sm, dtype=torch.float64).expand(N, H, Sm, Sm)
    probs, _ = ops.attention_fwd(q, k, eye, None, 1.0, False, p, rng)
    return probs != 0


def test_dropout():
    lq, lk, H, E, p = [9, 0, 40, 3], [20, 5, 33, 1], 3, 8, 0.3
    q, k, v = _inputs(H, H, E, E, lq, lk, torch.float64)
    rng = torch.tensor([987654321, 12], dtype=torch.int64)
    keep = _keep_masks(lq, lk, H, E, rng, p)
    scale = 1.0 / math.sqrt(E)
    out, _ = ops.attention_varlen_fwd(q, k, v, _cu(lq), _cu(lk), max(lq), max(lk), scale, True, p, rng)
    q64, k64, v64 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, lq, lk, True, keep=keep, p=p)
    assert rel_err(out, ref) < 1e-12
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q64, k64, v64), grad)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5
    # The functional API draws a fresh stream per call, reproducible from torch's seed.
    torch.manual_seed(3)
    o1 = _run(q, k, v, lq, lk, False, dropout_p=p)
    torch.manual_seed(3)
    assert torch.equal(o1, _run(q, k, v, lq, lk, False, dropout_p=p))
    assert not torch.equal(o1, _run(q, k, v, lq, lk, False, dropout_p=p))
    assert (_run(q, k, v, lq, lk, False, dropout_p=1.0) == 0).all()


def test_sequences_without_keys_give_zero_output_and_gradient():
    lq, lk, H, E = [4, 3, 5], [6, 0, 2], 2, 8
    q, k, v = _inputs(H, H, E, E, lq, lk, torch.float32)
    out = _run(q, k, v, lq, lk, False)
    assert torch.isfinite(out).all() and (out[4:7] == 0).all()
    out.backward(torch.randn_like(out))
    assert (q.grad[4:7] == 0).all() and torch.isfinite(q.grad).all()


def test_nan_stays_in_its_sequence():
    lq, H, E = [5, 6, 4], 2, 8
    q, k, v = _inputs(H, H, E, E, lq, lq, torch.float64, requires_grad=False)
    v[5 + 2, 1, 3] = float("nan")  # sequence 1, key 2, head 1
    out = _run(q, k, v, lq, lq, True)
    # Queries 2.. of sequence 1 attend to key 2. (Queries 0, 1 may see the NaN too: as in torch,
    # a masked probability of 0 times NaN is NaN.)
    assert out[5 + 2:11, 1, 3].isnan().all()
    assert torch.isfinite(out[:5]).all() and torch.isfinite(out[11:]).all()
    assert torch.isfinite(out[5:11, 0]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_within_2x_torch_error(dtype, causal):
    lq, H, Hkv, E = [129, 3, 64, 200], 4, 2, 64
    q, k, v = _inputs(H, Hkv, E, E, lq, lq, dtype)
    out = _run(q, k, v, lq, lq, causal)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, lq, lq, causal)
    # Stock torch in the same precision: SDPA on each sequence.
    qt, kt, vt = (t.detach().clone().requires_grad_() for t in (q, k, v))
    outs, i0 = [], 0
    for L in lq:
        sl = lambda t: t[i0:i0 + L].transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(sl(qt), sl(kt), sl(vt), is_causal=causal, enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
        i0 += L
    torch_out = torch.cat(outs)
    assert_attention_within_torch_error(out, torch_out, ref, (q, k, v), (qt, kt, vt), (q64, k64, v64))


def _args(lq=(3, 0, 5), lk=None, H=2, E=4):
    lk = lq if lk is None else lk
    q, k, v = _inputs(H, H, E, E, list(lq), list(lk), torch.float32, requires_grad=False)
    return [q, k, v, _cu(list(lq)), _cu(list(lk)), max(lq), max(lk), 0.5, False, 0.0, None]


I32 = lambda *x: torch.tensor(x, dtype=torch.int32)

# (id, argument index, bad value, exception, message pattern); the good batch packs 8 rows.
BAD = [
    ("not monotonic", 3, I32(0, 5, 3, 8), ValueError, r"`cu_seqlens_q` must be non-decreasing.*index 2"),
    ("not monotonic k", 4, I32(0, 3, 1, 8), ValueError, r"`cu_seqlens_k` must be non-decreasing"),
    ("negative", 3, I32(0, -1, 3, 8), ValueError, r"`cu_seqlens_q` has a negative offset -1 at index 1"),
    ("last offset short", 3, I32(0, 3, 3, 7), ValueError,
     r"last offset of `cu_seqlens_q` is 7 but `query` packs 8 rows"),
    ("last offset long", 4, I32(0, 3, 3, 9), ValueError,
     r"last offset of `cu_seqlens_k` is 9 but `key` packs 8 rows"),
    ("wrong length", 4, I32(0, 3, 8), ValueError, r"`cu_seqlens_k` has 3 offsets but `cu_seqlens_q` has 4"),
    ("not starting at 0", 3, I32(1, 3, 3, 8), ValueError, r"`cu_seqlens_q` must start at 0"),
    ("empty", 3, I32(), ValueError, r"`cu_seqlens_q` must be 1-D"),
    ("2-D", 3, I32(0, 3, 3, 8).reshape(1, 4), ValueError, r"`cu_seqlens_q` must be 1-D"),
    ("int64", 3, torch.tensor([0, 3, 3, 8]), TypeError, r"`cu_seqlens_q` must be int32"),
    ("max_seqlen_q too small", 5, 4, ValueError, r"length 5, more than `max_seqlen_q` = 4"),
    ("max_seqlen_k negative", 6, -1, ValueError, r"`max_seqlen_k` must be >= 0"),
    ("query 4-D", 0, torch.randn(8, 2, 4, 1), ValueError, r"`query` must have 3 dimensions"),
    ("heads not a multiple", 0, torch.randn(8, 3, 4), ValueError, r"not a multiple of the 2 heads"),
    ("value rows", 2, torch.randn(7, 2, 4), ValueError, r"`value` has size 7 in dimension 0"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_arguments_raise_naming_them(case):
    _, i, value, exc, pattern = case
    args = _args()
    out, lse = ops.attention_varlen_fwd(*args)
    args[i] = value
    with pytest.raises(exc, match=pattern):
        ops.attention_varlen_fwd(*args)
    # The backward checks its arguments the same way.
    with pytest.raises(exc, match=pattern):
        ops.attention_varlen_bwd(out, *args[:3], out, lse, *args[3:])


def test_functional_argument_checks():
    q, k, v, cu, cu_k, mq, mk = _args()[:7]
    with pytest.raises(TypeError, match="`max_seqlen_q` must be an int"):
        TF.attention_varlen(q, k, v, cu, cu_k, 5.0, mk)
    with pytest.raises(TypeError, match="`cu_seqlens_k` must be a torch.Tensor"):
        TF.attention_varlen(q, k, v, cu, [0, 3, 3, 8], mq, mk)
    with pytest.raises(ValueError, match="`dropout_p`"):
        TF.attention_varlen(q, k, v, cu, cu_k, mq, mk, dropout_p=1.5)
    with pytest.raises(ValueError, match="`attention_mask` must have shape"):
        TF.unpad_input(torch.randn(2, 5, 3), torch.ones(2, 4))


@pytest.mark.parametrize("causal", [False, True])
def test_opcheck(causal):
    lq, lk = [3, 0, 5], [4, 2, 1]
    q, k, v = _inputs(2, 1, 8, 4, lq, lk, torch.float64)
    args = (q, k, v, _cu(lq), _cu(lk), 5, 4, 0.4, causal, 0.0, None)
    torch.library.opcheck(ops.attention_varlen_fwd, args)
    out, lse = ops.attention_varlen_fwd(*args)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse) + args[3:]
    torch.library.opcheck(ops.attention_varlen_bwd, bwd_args)


def test_compiles_fullgraph():
    lq = [3, 6, 2]
    q, k, v = _inputs(2, 2, 8, 8, lq, lq, torch.float32)
    cu = _cu(lq)
    fn = torch.compile(lambda q, k, v: TF.attention_varlen(q, k, v, cu, cu, 6, 6, causal=True),
                       fullgraph=True, backend="aot_eager")
    out = fn(q, k, v)
    assert rel_err(out, _run(q, k, v, lq, lq, True)) < 1e-6


@pytest.mark.parametrize("causal", [False, True])
def test_jagged_nested_tensors_in_sdpa(causal):
    lq, H, E = [5, 1, 12], 2, 8
    q, k, v = _inputs(H, H, E, E, lq, lq, torch.float64)
    offsets = _cu(lq).long()
    nest = lambda t: torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2)  # (N, H, j, E)
    out = TF.scaled_dot_product_attention(nest(q), nest(k), nest(v), is_causal=causal)
    assert out.is_nested and out.shape[1] == H
    packed = out.transpose(1, 2).values()
    ref = reference(q, k, v, lq, lq, causal)
    assert rel_err(packed, ref) < 1e-12
    grad = torch.randn_like(packed)
    got = torch.autograd.grad(packed, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5
    with pytest.raises(ValueError, match="`attn_mask` cannot be combined with nested"):
        TF.scaled_dot_product_attention(nest(q), nest(k), nest(v), attn_mask=torch.ones(1, dtype=torch.bool))

# ----------------------------------------------------------------------------------------------
# The CUDA kernels' packed-batch paths (csrc/kernels/attention_{fwd,bwd}.cu) on each CUDA backend
# (the emulator always, a GPU when present), with poisoned outputs, against float64 references:
# each sequence attended alone (reference), or, with dropout, the CPU op in float64 on the same
# rng, which keeps what the padded op keeps on the batch padded to the maximum lengths
# (params.h). Shapes stay small: the emulator runs every thread.
# ----------------------------------------------------------------------------------------------
cuda_kernels = pytest.mark.usefixtures("cuda_backend")

# (H, Hkv, E, Ev, q lengths, k lengths or None for self-attention): lengths 0 and 1, primes, one
# past a tile, L != S per sequence, GQA, Ev != E (general path) and E = 64 (tensor-core path).
CUDA_CASES = [
    (2, 1, 64, 64, [1, 0, 70, 13], None),
    (2, 2, 32, 32, [5, 17, 0], [9, 130, 3]),
    (3, 1, 16, 8, [29, 1, 0, 2], [0, 7, 5, 31]),
]
CUDA_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# Relative error bounds of (out, gradients) against float64: fp64 at fp64 accuracy (lse is fp64
# for fp64 inputs), fp32 the project's 1e-5 / 1e-4, fp16 / bf16 a few of their ulps (a wrong
# sequence boundary or keep decision gives errors of order 1).
CUDA_TOLS = {torch.float64: (1e-12, 1e-11), torch.float32: (1e-5, 1e-4), torch.float16: (5e-3, 1e-2),
        torch.bfloat16: (3e-2, 6e-2)}


def _cuda_inputs(H, Hkv, E, Ev, lq, lk, dtype):
    make = lambda *s: torch.randn(*s, device=BE.device, dtype=dtype)
    return make(sum(lq), H, E), make(sum(lk), Hkv, E), make(sum(lk), Hkv, Ev)


def _cuda_fwd_bwd(q, k, v, lq, lk, causal, scale, p=0.0, rng=None):
    args = (_cu(lq), _cu(lk), max(lq), max(lk), scale, causal, p, rng)
    out, lse = BE.ops.attention_varlen_fwd(q, k, v, *args)
    grad = torch.randn_like(out)
    grads = BE.ops.attention_varlen_bwd(grad, q, k, v, out, lse, *args)
    BE.sync()
    return out, lse, grad, grads


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=["fp16", "bf16", "fp32", "fp64"])
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: f"H{c[0]}kv{c[1]}E{c[2]}-{c[4]}-{c[5]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@cuda_kernels
def test_matches_float64_reference(case, dtype, causal):
    H, Hkv, E, Ev, lq, lk = case
    lk = lq if lk is None else lk
    scale = 1.0 / math.sqrt(E)
    q, k, v = _cuda_inputs(H, Hkv, E, Ev, lq, lk, dtype)
    out, lse, grad, grads = _cuda_fwd_bwd(q, k, v, lq, lk, causal, scale)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, lq, lk, causal, scale=scale)
    want = torch.autograd.grad(ref, (q64, k64, v64), grad.cpu().double())
    assert out.shape == (sum(lq), H, Ev) and out.dtype == dtype
    assert lse.shape == (H, sum(lq)) and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    fwd_tol, grad_tol = CUDA_TOLS[dtype]
    assert rel_err(out.cpu(), ref) < fwd_tol, f"out: {rel_err(out.cpu(), ref):.3e}"
    for name, a, b in zip(("dq", "dk", "dv"), grads, want):
        assert a.shape == b.shape and rel_err(a.cpu(), b) < grad_tol, f"{name}: {rel_err(a.cpu(), b):.3e}"


@cuda_kernels
def test_lse_matches_cpu_op():
    H, E, lq, lk = 2, 64, [3, 0, 41, 1], [8, 2, 0, 66]
    q, k, v = _cuda_inputs(H, H, E, E, lq, lk, torch.bfloat16)
    args = (_cu(lq), _cu(lk), max(lq), max(lk), 0.125, False, 0.0, None)
    _, lse = BE.ops.attention_varlen_fwd(q, k, v, *args)
    _, lse_c = CPU_OPS.attention_varlen_fwd(*(t.cpu().double() for t in (q, k, v)), *args)
    ninf = torch.isneginf(lse_c)
    assert torch.equal(torch.isneginf(lse.cpu()), ninf), "the rows without keys differ"
    assert (lse.cpu()[~ninf].double() - lse_c[~ninf]).abs().max() < 1e-3


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=["fp16", "bf16", "fp32", "fp64"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@cuda_kernels
def test_dropout_keeps_what_the_padded_op_keeps(dtype, causal):
    H, Hkv, E, lq, lk, p = 2, 1, 64, [9, 0, 40, 1], [20, 5, 33, 0], 0.3
    q, k, v = _cuda_inputs(H, Hkv, E, E, lq, lk, dtype)
    rng = torch.tensor([int(torch.randint(0, 2**62, ()).item()), 3], dtype=torch.int64)
    scale = 1.0 / math.sqrt(E)
    out, _, grad, grads = _cuda_fwd_bwd(q, k, v, lq, lk, causal, scale, p, rng)
    cpu = [t.cpu().double() for t in (q, k, v, grad)]
    args = (_cu(lq), _cu(lk), max(lq), max(lk), scale, causal, p, rng)
    out_c, lse_c = CPU_OPS.attention_varlen_fwd(*cpu[:3], *args)
    want = CPU_OPS.attention_varlen_bwd(cpu[3], *cpu[:3], out_c, lse_c, *args)
    fwd_tol, grad_tol = CUDA_TOLS[dtype]
    assert rel_err(out.cpu(), out_c) < fwd_tol, f"out: {rel_err(out.cpu(), out_c):.3e}"
    for name, a, b in zip(("dq", "dk", "dv"), grads, want):
        assert rel_err(a.cpu(), b) < grad_tol, f"{name}: {rel_err(a.cpu(), b):.3e}"


@cuda_kernels
def test_deterministic_dq_matches_atomic(monkeypatch):
    H, E, lq, lk = 2, 64, [33, 0, 70], [17, 4, 129]
    q, k, v = _cuda_inputs(H, H, E, E, lq, lk, torch.float16)
    torch.manual_seed(0)
    _, _, _, atomic = _cuda_fwd_bwd(q, k, v, lq, lk, True, 0.125)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(0)
        _, _, _, det = _cuda_fwd_bwd(q, k, v, lq, lk, True, 0.125)
    finally:
        torch.use_deterministic_algorithms(False)
    for name, a, b in zip(("dq", "dk", "dv"), atomic, det):
        assert rel_err(b.cpu(), a.cpu()) < 2e-3, f"{name}: {rel_err(b.cpu(), a.cpu()):.3e}"


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
@cuda_kernels
def test_bad_arguments_raise_naming_them_on_the_cuda_kernels(case):
    # The CUDA binding (device_ops.h) goes through the same checks as the CPU op.
    _, i, value, exc, pattern = case
    args = [a.to(BE.device) if torch.is_tensor(a) and a.is_floating_point() else a for a in _args()]
    out, lse = BE.ops.attention_varlen_fwd(*args)
    if torch.is_tensor(value) and value.is_floating_point():
        value = value.to(BE.device)
    args[i] = value
    with pytest.raises(exc, match=pattern):
        BE.ops.attention_varlen_fwd(*args)
    with pytest.raises(exc, match=pattern):
        BE.ops.attention_varlen_bwd(out, *args[:3], out, lse, *args[3:])
