"""Fused attention against stock PyTorch: F.scaled_dot_product_attention (default backend, and the
flash backend forced on CUDA) and the naive composite softmax(q k^T * scale + mask) v.

Throughput is TFLOP/s of the matrix products actually required: 2 * (E + Ev) multiply-adds per
allowed (query, key) pair forward (QK^T and PV), 2.5x that backward (five products of the same
size instead of two), so fwd_bwd is 3.5x. Causal counts only the pairs on or below the diagonal.
Memory rows report the peak resident-set growth of forward+backward in a fresh process (CPU), or
the peak CUDA allocation, beyond the inputs.
"""
import json
import math
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

import tx_kernels.functional as TF
from benchmarks.common import Case, Row, device_name, dtype_name, git_commit, lazy_inputs, now_iso


def allowed_pairs(L, S, causal):
    if not causal:
        return L * S
    # Query i sees keys 0..min(i, S - 1).
    full = max(0, min(L, S))
    return full * (full + 1) // 2 + max(0, L - S) * S


def attention_flops(N, H, L, S, E, Ev, causal, mode):
    fwd = 2.0 * N * H * allowed_pairs(L, S, causal) * (E + Ev)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd_bwd": 3.5 * fwd}[mode]


def naive_attention(q, k, v, attn_mask=None, is_causal=False):
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if is_causal:
        L, S = q.shape[-2], k.shape[-2]
        scores = scores.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if attn_mask is not None:
        scores = scores + attn_mask if attn_mask.is_floating_point() else scores.masked_fill(~attn_mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _sdpa_flash(q, k, v, attn_mask=None, is_causal=False):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


PROVIDERS = {
    "tx_kernels": TF.scaled_dot_product_attention,
    "torch_sdpa": F.scaled_dot_product_attention,
    "torch_sdpa_flash": _sdpa_flash,
    "torch_eager": naive_attention,
}


def _configs(device, quick):
    """(name, N, H, L, S, E, dtype, causal, mask_kind, providers)"""
    if device == "cpu":
        f32 = torch.float32
        everyone = ["tx_kernels", "torch_sdpa", "torch_eager"]
        fused = everyone[:2]  # the naive composite only where it tells something new: it is slow
        cfgs = [
            ("causal", 4, 8, 1024, 1024, 64, f32, True, None, everyone),
            ("full", 4, 8, 1024, 1024, 64, f32, False, None, fused),
            ("additive_mask", 4, 8, 1024, 1024, 64, f32, False, "additive", everyone),
            ("key_padding", 4, 8, 1024, 1024, 64, f32, False, "padding", fused),
            ("causal_bf16", 4, 8, 1024, 1024, 64, torch.bfloat16, True, None, fused),
            ("decode", 8, 8, 1, 4096, 64, f32, False, None, everyone),
        ]
        if quick:
            cfgs = [(n, N, H, L // 4 or 1, S // 4, E, dt, c, m, p) for (n, N, H, L, S, E, dt, c, m, p) in cfgs[:2]]
        return cfgs
    bf16 = torch.bfloat16
    everyone = ["tx_kernels", "torch_sdpa", "torch_sdpa_flash", "torch_eager"]
    cfgs = []
    seqs = [512, 2048, 8192] if quick else [512, 1024, 2048, 4096, 8192, 16384]
    for E in (64, 128):
        H = 2048 // E
        for L in seqs:
            N = max(1, 16384 // L)
            for causal in (False, True):
                prov = everyone if L <= 8192 else everyone[:3]
                cfgs.append((f"{'causal' if causal else 'full'}_d{E}", N, H, L, L, E, bf16, causal, None, prov))
    for L in (2048, 4096):
        cfgs.append(("additive_mask_d128", 16384 // L, 16, L, L, 128, bf16, False, "additive",
                     ["tx_kernels", "torch_sdpa", "torch_eager"]))
    cfgs.append(("decode_d128", 8, 16, 1, 8192, 128, bf16, False, None, ["tx_kernels", "torch_sdpa", "torch_sdpa_flash"]))
    return cfgs


def _mask(kind, N, H, L, S, dtype, device):
    if kind is None:
        return None
    if kind == "additive":
        return torch.randn(N, 1, L, S, dtype=dtype, device=device)
    if kind == "padding":
        lengths = torch.randint(S // 2, S + 1, (N,), device=device)
        return (torch.arange(S, device=device)[None, :] < lengths[:, None]).view(N, 1, 1, S)
    raise ValueError(kind)


def cases(ctx):
    out = []
    for name, N, H, L, S, E, dtype, causal, mask_kind, providers in _configs(ctx.device, ctx.quick):
        def make_inputs(N=N, H=H, L=L, S=S, E=E, dtype=dtype, mask_kind=mask_kind):
            dev = ctx.device
            q = torch.randn(N, H, L, E, device=dev, dtype=dtype, requires_grad=True)
            k = torch.randn(N, H, S, E, device=dev, dtype=dtype, requires_grad=True)
            v = torch.randn(N, H, S, E, device=dev, dtype=dtype, requires_grad=True)
            return q, k, v, _mask(mask_kind, N, H, L, S, dtype, dev), torch.randn_like(q)

        shape = f"{name} N={N} H={H} L={L} S={S} E={E}"
        for provider in providers:
            for mode in ("fwd", "fwd_bwd"):
                if mode == "fwd_bwd" and L == 1:
                    continue  # decode is inference-only
                setup, fn = lazy_inputs(make_inputs, _runner(PROVIDERS[provider], mode, causal))
                out.append(Case("attention", provider, mode, dtype_name(dtype), shape, fn,
                                flops=attention_flops(N, H, L, S, E, E, causal, mode),
                                baseline="torch_sdpa", setup=setup))
    return out


def _runner(fn, mode, causal):
    """The timed work on the inputs (q, k, v, mask, grad)."""
    if mode == "fwd":
        def run(inputs):
            q, k, v, mask, _ = inputs
            with torch.no_grad():
                return fn(q, k, v, attn_mask=mask, is_causal=causal)
    else:
        def run(inputs):
            q, k, v, mask, grad = inputs
            out = fn(q, k, v, attn_mask=mask, is_causal=causal)
            out.backward(grad)
            q.grad = k.grad = v.grad = None
    return run


# ----------------------------------------------------------------------------------------------
# Extra memory of forward+backward, each provider in a fresh process (CPU peak RSS).
# ----------------------------------------------------------------------------------------------
_MEMORY_CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[3])
from benchmarks.bench_attention import PROVIDERS
provider, S = sys.argv[1], int(sys.argv[2])
N, H, E = 4, 8, 64
def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
q, k, v = (torch.randn(N, H, S, E, requires_grad=True) for _ in range(3))
grad = torch.randn(N, H, S, E)
fn = PROVIDERS[provider]
fn(q[:, :, :64], k[:, :, :64], v[:, :, :64], is_causal=True).sum().backward()  # load code paths
q.grad = k.grad = v.grad = None
base = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS watermark
fn(q, k, v, is_causal=True).backward(grad)
print(json.dumps({"extra_bytes": status("VmHWM:") - base}))
"""


def memory_rows(S=4096, providers=("tx_kernels", "torch_sdpa")):
    """(provider, extra bytes) for causal forward+backward at N=4, H=8, E=64, fp32, on the CPU."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    for provider in providers:
        proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, provider, str(S), root],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"memory benchmark for {provider} failed: {proc.stderr[-2000:]}")
        rows.append((provider, json.loads(proc.stdout.strip().splitlines()[-1])["extra_bytes"]))
    return rows


def extra_rows(ctx):
    """Peak extra memory of causal forward+backward at S=4096 (CPU only; skipped with --quick)."""
    if ctx.device != "cpu" or ctx.quick:
        return []
    meta = dict(device=device_name("cpu"), torch=torch.__version__, commit=git_commit(), date=now_iso())
    nan = float("nan")
    return [Row("attention", provider, "fwd_bwd_memory", "float32", "causal N=4 H=8 L=S=4096 E=64",
                nan, nan, nan, round(extra / 2**20, 1), "MiB", baseline="torch_sdpa", **meta)
            for provider, extra in memory_rows(S=4096)]
