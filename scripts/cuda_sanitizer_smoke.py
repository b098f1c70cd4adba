"""Runs every CUDA tx_kernels op once per kernel path on small shapes, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python scripts/cuda_sanitizer_smoke.py
    compute-sanitizer --tool racecheck python scripts/cuda_sanitizer_smoke.py --ops attention

Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees an access one
element past a tensor's end instead of landing in the allocator's pool. Shapes are chosen to hit
each launch path: scalar and 16-byte, one warp per row and a block per row, the register path and
the fallbacks (LayerNorm rows past the register budget), dropout, strided rows. Exits non-zero if
an op raises or returns non-finite values.
"""
import argparse
import sys

import torch

import tx_kernels  # noqa: F401
from tx_kernels.ops import ops

DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def finite(name, *ts):
    for t in ts:
        if t.numel() and not torch.isfinite(t.float()).all():
            raise RuntimeError(f"{name}: non-finite output")


def layer_norm_cases(dev):
    # (rows, cols, dtype): scalar warp rows, vector warp rows, vector block rows, fp32 16-byte block
    # rows, scalar block rows, fallbacks (forward past 16384 values, backward past 8192).
    for rows, cols, dt in [(5, 7, "fp32"), (33, 768, "fp16"), (6, 1023, "bf16"), (4, 4096, "fp32"),
                           (3, 8191, "fp16"), (3, 12288, "bf16"), (2, 20000, "fp32")]:
        dtype = DT[dt]
        base = torch.randn(rows, cols + 8, device=dev).to(dtype)
        x = base[:, 8:]  # strided rows
        r = torch.randn(rows, cols, device=dev).to(dtype)
        w = torch.randn(cols, device=dev)
        b = torch.randn(cols, device=dev)
        out, res, mean, rstd = ops.add_layer_norm_fwd(x, r, w, b, 1, 1e-5)
        out2, mean2, rstd2 = ops.layer_norm_fwd(x, None, None, 1, 1e-5)
        g = torch.randn(rows, cols, device=dev).to(dtype)
        gi, gw, gb = ops.layer_norm_bwd(g, g, res, mean, rstd, w, b, 1)
        gi2, _, _ = ops.layer_norm_bwd(g, None, x, mean2, rstd2, None, None, 1)
        torch.cuda.synchronize()
        finite(f"layer_norm {rows}x{cols} {dt}", out, res, mean, rstd, out2, gi, gw, gb, gi2)
        print(f"layer_norm {rows}x{cols} {dt}: ok", flush=True)


def bias_act_cases(dev):
    rng = torch.tensor([1234, 5], dtype=torch.int64)
    for rows, cols, dt in [(9, 7, "fp32"), (17, 3072, "fp16"), (5, 1023, "bf16"), (130, 64, "fp32")]:
        dtype = DT[dt]
        x = torch.randn(rows, cols + 3, device=dev).to(dtype)[:, 3:]
        b = torch.randn(cols, device=dev)
        g = torch.randn(rows, cols, device=dev).to(dtype)
        for act in ("relu", "gelu", "gelu_tanh"):
            for p in (0.0, 0.25):
                y = ops.bias_act_fwd(x, b, act, p, rng if p > 0 else None)
                gi, gb = ops.bias_act_bwd(g, x, b, act, p, rng if p > 0 else None)
                gi2, _ = ops.bias_act_bwd(g, x, None, act, p, rng if p > 0 else None)
                torch.cuda.synchronize()
                finite(f"bias_act {rows}x{cols} {dt} {act} p={p}", y, gi, gb, gi2)
        print(f"bias_act {rows}x{cols} {dt}: ok", flush=True)


def attention_cases(dev):
    for (n, h, hkv, l, s, e, ev, dt, causal, mask) in [
        (1, 2, 2, 67, 129, 64, 64, "fp16", True, False),
        (2, 4, 2, 33, 33, 128, 128, "bf16", False, True),
        (1, 2, 1, 1, 257, 64, 64, "fp16", False, False),   # decode
        (1, 1, 1, 17, 19, 40, 24, "fp32", True, False),    # general path, Ev != E
    ]:
        dtype = DT[dt]
        q = torch.randn(n, h, l, e, device=dev).to(dtype)
        k = torch.randn(n, hkv, s, e, device=dev).to(dtype)
        v = torch.randn(n, hkv, s, ev, device=dev).to(dtype)
        m = torch.randn(1, 1, l, s, device=dev).to(dtype) if mask else None
        out, lse = ops.attention_fwd(q, k, v, m, e ** -0.5, causal, 0.0, None)
        torch.cuda.synchronize()
        finite(f"attention {n}x{h}x{l}x{s}x{e} {dt}", out)
        print(f"attention N={n} H={h}/{hkv} L={l} S={s} E={e}/{ev} {dt}: ok", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", default="layer_norm,bias_act,attention")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not tx_kernels.ops.has_cuda_kernels():
        print("cuda_sanitizer_smoke: no CUDA GPU or no CUDA kernels in this build; nothing to run")
        return 0
    cases = {"layer_norm": layer_norm_cases, "bias_act": bias_act_cases, "attention": attention_cases}
    failed = 0
    for name in args.ops.split(","):
        try:
            cases[name]("cuda")
        except Exception as e:  # report every op family, then fail
            print(f"{name}: FAILED: {type(e).__name__}: {e}", flush=True)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
