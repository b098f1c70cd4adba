"""One small attention backward per CUDA kernel variant, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python scripts/attention_bwd_sanitizer_case.py
    compute-sanitizer --tool racecheck python scripts/attention_bwd_sanitizer_case.py
    (also --tool initcheck / synccheck)

Shapes are small (sanitizers slow kernels down 10-100x) but awkward: tails in every tile
dimension, GQA, causal with L != S. Each case also checks that the gradients are finite and close
to a float64 reference, so a run that silently computed garbage does not look clean.
Prints one line per case and exits non-zero if any failed (all cases run, so one GPU session
sees every failure at once).

    python scripts/attention_bwd_sanitizer_case.py --bench
times the backward (fast path, atomic and deterministic) against torch's SDPA backward on a few
large shapes instead (CUDA events, median of 20 after warm-up; no sanitizer).
"""
import math
import statistics
import sys

import torch

import tx_kernels  # noqa: F401
from tx_kernels import reference as R
from tx_kernels.ops import ops


def case(name, dtype, E, Ev, *, L=70, S=130, H=4, Hkv=2, causal=True, mask=None, p=0.0,
         deterministic=False, tol=None):
    dev = "cuda"
    N = 1
    q = torch.randn(N, H, L, E, device=dev, dtype=dtype)
    k = torch.randn(N, Hkv, S, E, device=dev, dtype=dtype)
    v = torch.randn(N, Hkv, S, Ev, device=dev, dtype=dtype)
    m = None
    if mask == "add":
        m = torch.randn(1, H, L, S, device=dev, dtype=dtype)
    elif mask == "bool":
        m = torch.rand(N, 1, 1, S, device=dev) > 0.3
        m[..., 0] = True
    rng = torch.tensor([987654321, 3], dtype=torch.int64) if p > 0 else None
    scale = 1 / math.sqrt(E)
    mask_grad = m is not None and m.is_floating_point()
    out, lse = ops.attention_fwd(q, k, v, m, scale, causal, p, rng)
    grad = torch.randn_like(out)
    torch.use_deterministic_algorithms(deterministic)
    try:
        dq, dk, dv, dmask = ops.attention_bwd(grad, q, k, v, out, lse, m, scale, causal, p, rng, mask_grad)
        torch.cuda.synchronize()
    finally:
        torch.use_deterministic_algorithms(False)
    got = [dq, dk, dv] + ([dmask] if mask_grad else [])
    for t in got:
        if not torch.isfinite(t).all():
            print(f"FAIL {name}: non-finite gradient")
            FAILED.append(name)
            return
    if p == 0.0:
        q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
        m64 = m.double().requires_grad_() if mask_grad else m
        ref = R.attention(q64, k64, v64, m64, is_causal=causal, scale=scale)
        want = torch.autograd.grad(ref, [q64, k64, v64] + ([m64] if mask_grad else []), grad.double())
        tol = tol or (1e-4 if dtype in (torch.float32, torch.float64) else 1e-2)
        errs = []
        for gname, a, b in zip(("dq", "dk", "dv", "dmask"), got, want):
            err = ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()
            errs.append(f"{gname} {err:.1e}")
            if err > tol:
                print(f"FAIL {name}: {gname} relative error {err:.3e}")
                FAILED.append(name)
                return
        print(f"ok   {name:34s} " + "  ".join(errs))
        return
    print(f"ok   {name:34s} (dropout: finite only)")


FAILED = []


def main():
    f16, bf16 = torch.float16, torch.bfloat16
    # Fast path: dK/dV kernel + atomic dQ + conversion, every head-dim instantiation.
    for E in (32, 64, 96, 128):
        case(f"fast fp16 E={E}", f16, E, E)
    case("fast bf16 E=64 non-causal", bf16, 64, 64, causal=False)
    case("fast fp16 E=40 (padded)", f16, 40, 40)
    # Features: additive mask (+ dmask), bool mask, dropout.
    case("fast fp16 add mask + dmask", f16, 64, 64, mask="add")
    case("fast bf16 bool mask", bf16, 128, 128, mask="bool")
    case("fast fp16 dropout + mask", f16, 64, 64, mask="add", p=0.2)
    # Deterministic dQ pass, with and without features.
    case("deterministic fp16 E=64", f16, 64, 64, deterministic=True)
    case("deterministic bf16 E=128 mask", bf16, 128, 128, mask="add", deterministic=True)
    case("deterministic fp16 E=32 dropout", f16, 32, 32, p=0.2, deterministic=True)
    case("deterministic fp16 E=96", f16, 96, 96, causal=False, deterministic=True)
    # General path.
    case("general fp32", torch.float32, 64, 64, mask="add")
    case("general fp32 dropout", torch.float32, 32, 32, p=0.2)
    case("general fp16 Ev != E", f16, 64, 32, mask="bool")
    case("general bf16 E=256", bf16, 256, 256, L=33, S=40)
    case("general fp16 E=20", f16, 20, 20)
    try:
        case("general fp64", torch.float64, 16, 24, mask="add")
    except RuntimeError as e:
        print(f"skip general fp64: {e}")
    if FAILED:
        print(f"{len(FAILED)} FAILED: {FAILED}")
        sys.exit(1)
    print("all cases ok")


def _median_ms(fn, reps=20):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    print(f"{'shape (N,H,L,E) causal':32s} {'ours ms':>8s} {'TFLOP/s':>8s} {'determ ms':>9s} {'torch ms':>8s} {'TFLOP/s':>8s}")
    for N, H, L, E, causal in [(4, 16, 2048, 64, False), (4, 16, 2048, 64, True), (2, 16, 4096, 128, False),
                               (2, 16, 4096, 128, True), (8, 16, 1024, 32, False), (4, 16, 2048, 96, True)]:
        q, k, v = (torch.randn(N, H, L, E, device="cuda", dtype=torch.float16) for _ in range(3))
        scale = 1 / math.sqrt(E)
        out, lse = ops.attention_fwd(q, k, v, None, scale, causal, 0.0, None)
        grad = torch.randn_like(out)
        args = (grad, q, k, v, out, lse, None, scale, causal, 0.0, None, False)
        ours = _median_ms(lambda: ops.attention_bwd(*args))
        torch.use_deterministic_algorithms(True)
        try:
            det = _median_ms(lambda: ops.attention_bwd(*args))
        finally:
            torch.use_deterministic_algorithms(False)
        qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            ot = F_sdpa(qt, kt, vt, is_causal=causal, scale=scale)
        theirs = _median_ms(lambda: torch.autograd.grad(ot, (qt, kt, vt), grad, retain_graph=True))
        # the backward does 2.5x the forward's 4 N H L S E flops (5 products instead of 2); causal half
        flops = 2.5 * 4 * N * H * L * L * E * (0.5 if causal else 1.0)
        print(f"{str((N, H, L, E)) + (' causal' if causal else ''):32s} {ours:8.3f} {flops / ours / 1e9:8.1f} "
              f"{det:9.3f} {theirs:8.3f} {flops / theirs / 1e9:8.1f}")


def F_sdpa(*args, **kwargs):
    return torch.nn.functional.scaled_dot_product_attention(*args, **kwargs)


if __name__ == "__main__":
    if "--bench" in sys.argv:
        bench()
    else:
        main()
