"""CUDA variable-length attention (the packed-batch paths of csrc/kernels/attention_{fwd,bwd}.cu).

Every case runs the CUDA binding code and kernels on each backend of tests/cuda_backends.py (the
emulator always, a GPU when present), with poisoned outputs, against float64 references: each
sequence attended alone by the textbook formula (test_attention_varlen.reference), or, with
dropout, the CPU op in float64 on the same rng, which keeps what the padded op keeps on the batch
padded to the maximum lengths (params.h). Shapes stay small: the emulator runs every thread.
"""
import math

import pytest
import torch

from conftest import rel_err
from cuda_backends import BE, CPU_OPS
from test_attention_varlen import BAD, _args, _cu, reference

pytestmark = pytest.mark.usefixtures("cuda_backend")

# (H, Hkv, E, Ev, q lengths, k lengths or None for self-attention): lengths 0 and 1, primes, one
# past a tile, L != S per sequence, GQA, Ev != E (general path) and E = 64 (tensor-core path).
CASES = [
    (2, 1, 64, 64, [1, 0, 70, 13], None),
    (2, 2, 32, 32, [5, 17, 0], [9, 130, 3]),
    (3, 1, 16, 8, [29, 1, 0, 2], [0, 7, 5, 31]),
]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# Relative error bounds of (out, gradients) against float64: fp64 at fp64 accuracy (lse is fp64
# for fp64 inputs), fp32 the project's 1e-5 / 1e-4, fp16 / bf16 a few of their ulps (a wrong
# sequence boundary or keep decision gives errors of order 1).
TOLS = {torch.float64: (1e-12, 1e-11), torch.float32: (1e-5, 1e-4), torch.float16: (5e-3, 1e-2),
        torch.bfloat16: (3e-2, 6e-2)}


def _inputs(H, Hkv, E, Ev, lq, lk, dtype):
    make = lambda *s: torch.randn(*s, device=BE.device, dtype=dtype)
    return make(sum(lq), H, E), make(sum(lk), Hkv, E), make(sum(lk), Hkv, Ev)


def _fwd_bwd(q, k, v, lq, lk, causal, scale, p=0.0, rng=None):
    args = (_cu(lq), _cu(lk), max(lq), max(lk), scale, causal, p, rng)
    out, lse = BE.ops.attention_varlen_fwd(q, k, v, *args)
    grad = torch.randn_like(out)
    grads = BE.ops.attention_varlen_bwd(grad, q, k, v, out, lse, *args)
    BE.sync()
    return out, lse, grad, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16", "fp32", "fp64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"H{c[0]}kv{c[1]}E{c[2]}-{c[4]}-{c[5]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_float64_reference(case, dtype, causal):
    H, Hkv, E, Ev, lq, lk = case
    lk = lq if lk is None else lk
    scale = 1.0 / math.sqrt(E)
    q, k, v = _inputs(H, Hkv, E, Ev, lq, lk, dtype)
    out, lse, grad, grads = _fwd_bwd(q, k, v, lq, lk, causal, scale)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, lq, lk, causal, scale=scale)
    want = torch.autograd.grad(ref, (q64, k64, v64), grad.cpu().double())
    assert out.shape == (sum(lq), H, Ev) and out.dtype == dtype
    assert lse.shape == (H, sum(lq)) and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    fwd_tol, grad_tol = TOLS[dtype]
    assert rel_err(out.cpu(), ref) < fwd_tol, f"out: {rel_err(out.cpu(), ref):.3e}"
    for name, a, b in zip(("dq", "dk", "dv"), grads, want):
        assert a.shape == b.shape and rel_err(a.cpu(), b) < grad_tol, f"{name}: {rel_err(a.cpu(), b):.3e}"


def test_lse_matches_cpu_op():
    H, E, lq, lk = 2, 64, [3, 0, 41, 1], [8, 2, 0, 66]
    q, k, v = _inputs(H, H, E, E, lq, lk, torch.bfloat16)
    args = (_cu(lq), _cu(lk), max(lq), max(lk), 0.125, False, 0.0, None)
    _, lse = BE.ops.attention_varlen_fwd(q, k, v, *args)
    _, lse_c = CPU_OPS.attention_varlen_fwd(*(t.cpu().double() for t in (q, k, v)), *args)
    ninf = torch.isneginf(lse_c)
    assert torch.equal(torch.isneginf(lse.cpu()), ninf), "the rows without keys differ"
    assert (lse.cpu()[~ninf].double() - lse_c[~ninf]).abs().max() < 1e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16", "fp32", "fp64"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout_keeps_what_the_padded_op_keeps(dtype, causal):
    H, Hkv, E, lq, lk, p = 2, 1, 64, [9, 0, 40, 1], [20, 5, 33, 0], 0.3
    q, k, v = _inputs(H, Hkv, E, E, lq, lk, dtype)
    rng = torch.tensor([int(torch.randint(0, 2**62, ()).item()), 3], dtype=torch.int64)
    scale = 1.0 / math.sqrt(E)
    out, _, grad, grads = _fwd_bwd(q, k, v, lq, lk, causal, scale, p, rng)
    cpu = [t.cpu().double() for t in (q, k, v, grad)]
    args = (_cu(lq), _cu(lk), max(lq), max(lk), scale, causal, p, rng)
    out_c, lse_c = CPU_OPS.attention_varlen_fwd(*cpu[:3], *args)
    want = CPU_OPS.attention_varlen_bwd(cpu[3], *cpu[:3], out_c, lse_c, *args)
    fwd_tol, grad_tol = TOLS[dtype]
    assert rel_err(out.cpu(), out_c) < fwd_tol, f"out: {rel_err(out.cpu(), out_c):.3e}"
    for name, a, b in zip(("dq", "dk", "dv"), grads, want):
        assert rel_err(a.cpu(), b) < grad_tol, f"{name}: {rel_err(a.cpu(), b):.3e}"


def test_deterministic_dq_matches_atomic(monkeypatch):
    H, E, lq, lk = 2, 64, [33, 0, 70], [17, 4, 129]
    q, k, v = _inputs(H, H, E, E, lq, lk, torch.float16)
    torch.manual_seed(0)
    _, _, _, atomic = _fwd_bwd(q, k, v, lq, lk, True, 0.125)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(0)
        _, _, _, det = _fwd_bwd(q, k, v, lq, lk, True, 0.125)
    finally:
        torch.use_deterministic_algorithms(False)
    for name, a, b in zip(("dq", "dk", "dv"), atomic, det):
        assert rel_err(b.cpu(), a.cpu()) < 2e-3, f"{name}: {rel_err(b.cpu(), a.cpu()):.3e}"


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_arguments_raise_naming_them(case):
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
