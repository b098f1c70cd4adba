"""fp64 CUDA attention (the general kernels of csrc/kernels/attention_{fwd,bwd}.cu) at fp64 accuracy.

params.h promises that fp64 inputs keep full precision: the scale, the dropout factor, lse and
every accumulation are double. A kernel that narrows any of them to float is off by ~1e-8
relative (float's rounding of 1/3 is 3e-8 away), a million times what fp64 arithmetic over these
sizes costs, so the bounds below are fp64 bounds (1e-12), not the 1e-5 of the other tests.
Runs on each backend of tests/cuda_backends.py (the emulator always, a GPU when present).
"""
import pytest
import torch

from tx_kernels import reference as R

from conftest import rel_err
from cuda_backends import BE, CPU_OPS

pytestmark = pytest.mark.usefixtures("cuda_backend")

TOL = 1e-12
SCALE = 1.0 / 3.0  # not a float: narrowing it shows


def _inputs(N, H, Hkv, L, S, E, Ev):
    make = lambda *s: torch.randn(*s, device=BE.device, dtype=torch.float64)
    return make(N, H, L, E), make(N, Hkv, S, E), make(N, Hkv, S, Ev)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "additive"])
def test_fp64_fwd_bwd_at_fp64_accuracy(causal, masked):
    N, H, Hkv, L, S, E, Ev = 1, 2, 1, 23, 37, 16, 12
    q, k, v = _inputs(N, H, Hkv, L, S, E, Ev)
    mask = torch.randn(1, H, L, S, device=BE.device, dtype=torch.float64) if masked else None
    out, lse = BE.ops.attention_fwd(q, k, v, mask, SCALE, causal, 0.0, None)
    grad = torch.randn_like(out)
    dq, dk, dv, dmask = BE.ops.attention_bwd(grad, q, k, v, out, lse, mask, SCALE, causal, 0.0, None, masked)
    BE.sync()
    assert out.dtype == lse.dtype == torch.float64

    q64, k64, v64 = (t.detach().cpu().requires_grad_() for t in (q, k, v))
    m64 = mask.detach().cpu().requires_grad_() if masked else None
    ref = R.attention(q64, k64, v64, m64, is_causal=causal, scale=SCALE)
    scores = torch.matmul(q64, k64.repeat_interleave(H // Hkv, 1).transpose(-2, -1)) * SCALE
    if masked:
        scores = scores + m64
    if causal:
        scores = scores.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
    ref_lse = torch.logsumexp(scores, -1)
    inputs = [q64, k64, v64] + ([m64] if masked else [])
    want = torch.autograd.grad(ref, inputs, grad.cpu())

    assert rel_err(out.cpu(), ref) < TOL, f"out: {rel_err(out.cpu(), ref):.3e}"
    assert rel_err(lse.cpu(), ref_lse) < TOL, f"lse: {rel_err(lse.cpu(), ref_lse):.3e}"
    got = [dq, dk, dv] + ([dmask] if masked else [])
    for name, a, b in zip(("dq", "dk", "dv", "dmask"), got, want):
        assert rel_err(a.cpu(), b) < TOL, f"{name}: relative error {rel_err(a.cpu(), b):.3e}"


def test_fp64_dropout_at_fp64_accuracy():
    # The dropout factor 1 / (1 - p) is double too; the CPU op (fp64 throughout, the same Philox
    # keep decisions) is the reference.
    N, H, Hkv, L, S, E, Ev, p = 1, 2, 2, 19, 29, 8, 8, 0.3
    q, k, v = _inputs(N, H, Hkv, L, S, E, Ev)
    rng = torch.tensor([int(torch.randint(0, 2**62, ()).item()), 5], dtype=torch.int64)
    out, lse = BE.ops.attention_fwd(q, k, v, None, SCALE, True, p, rng)
    grad = torch.randn_like(out)
    got = BE.ops.attention_bwd(grad, q, k, v, out, lse, None, SCALE, True, p, rng, False)[:3]
    BE.sync()
    cpu = [t.cpu() for t in (q, k, v, grad)]
    out_c, lse_c = CPU_OPS.attention_fwd(cpu[0], cpu[1], cpu[2], None, SCALE, True, p, rng)
    want = CPU_OPS.attention_bwd(cpu[3], cpu[0], cpu[1], cpu[2], out_c, lse_c, None, SCALE, True, p, rng,
                                 False)[:3]
    assert rel_err(out.cpu(), out_c) < TOL, f"out: {rel_err(out.cpu(), out_c):.3e}"
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert rel_err(a.cpu(), b) < TOL, f"{name}: relative error {rel_err(a.cpu(), b):.3e}"
