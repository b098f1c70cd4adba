"""One small forward of every CUDA attention kernel variant, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python scripts/attention_sanitizer_case.py
    compute-sanitizer --tool racecheck python scripts/attention_sanitizer_case.py
    compute-sanitizer --tool synccheck python scripts/attention_sanitizer_case.py

By default it goes through torch.ops.tx_kernels.attention_fwd (the CUDA build of the extension).
With --standalone it compiles csrc/kernels/attention_fwd.cu plus a tiny extern "C" shim with nvcc
into build/txk_attention_fwd_standalone.so and calls the launcher through ctypes, so the kernels
can be checked even without a working binding; --check then also compares every case with a
float64 reference (max abs error, lse error) and exits non-zero on a failure. --bench times bf16
shapes through the standalone library against torch's flash SDPA backend (median of 30, events).

    python scripts/attention_sanitizer_case.py --standalone --check   # ~1-2 min incl. nvcc
    python scripts/attention_sanitizer_case.py --bench

Sizes are small and awkward (17 x 129: tails in both tile dimensions) so the sanitizers finish in
seconds. Variants: fast kernel fp16/bf16 x head dims 32, 64, 80 (padded to 96), 96, 128, 256,
plain and causal; the mask + dropout instantiation; split-KV decode + combine (standalone mode
passes a workspace; through the op it depends on the binding); the general kernel in fp32, fp64,
bf16 with Ev != E.
"""
import argparse
import ctypes
import math
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHIM = r"""
#include <cstdint>
#include "launchers.h"
using namespace tx_kernels;
static AttentionParams make(int dtype, const void* q, const void* k, const void* v, void* out, float* lse,
                            const int64_t* dims, const int64_t* strides, int mask_kind, int mask_dtype,
                            const void* mask, const int64_t* mask_strides, float scale, int causal,
                            float dropout_p, uint64_t seed, uint64_t offset, int num_sms, int64_t max_smem) {
  AttentionParams p;
  p.dtype = static_cast<DType>(dtype);
  p.q = q; p.k = k; p.v = v; p.out = out; p.lse = lse;
  p.batch = dims[0]; p.heads = dims[1]; p.kv_heads = dims[2]; p.q_len = dims[3]; p.kv_len = dims[4];
  p.head_dim = dims[5]; p.v_head_dim = dims[6];
  for (int d = 0; d < 3; ++d) {
    p.q_stride[d] = strides[d]; p.k_stride[d] = strides[3 + d];
    p.v_stride[d] = strides[6 + d]; p.out_stride[d] = strides[9 + d];
  }
  p.mask_kind = static_cast<MaskKind>(mask_kind);
  p.mask_dtype = static_cast<DType>(mask_dtype);
  p.mask = mask;
  for (int d = 0; d < 4; ++d) p.mask_stride[d] = mask_strides[d];
  p.scale = scale; p.is_causal = causal != 0; p.dropout_p = dropout_p;
  p.rng.seed = seed; p.rng.offset = offset;
  p.num_sms = num_sms; p.max_smem_per_block = max_smem;
  return p;
}
#define ARGS int dtype, const void* q, const void* k, const void* v, void* out, float* lse, \
  const int64_t* dims, const int64_t* strides, int mask_kind, int mask_dtype, const void* mask, \
  const int64_t* mask_strides, float scale, int causal, float dropout_p, uint64_t seed, uint64_t offset, \
  int num_sms, int64_t max_smem
#define PASS dtype, q, k, v, out, lse, dims, strides, mask_kind, mask_dtype, mask, mask_strides, scale, \
  causal, dropout_p, seed, offset, num_sms, max_smem
extern "C" uint64_t txk_ws_bytes(ARGS) { return attention_fwd_workspace_bytes(make(PASS)); }
extern "C" int txk_fwd_async(ARGS, void* ws, uint64_t ws_bytes) {
  return static_cast<int>(attention_fwd_cuda(make(PASS), ws, ws_bytes, 0));
}
extern "C" int txk_fwd(ARGS, void* ws, uint64_t ws_bytes) {
  cudaError_t e = attention_fwd_cuda(make(PASS), ws, ws_bytes, 0);
  if (e != cudaSuccess) return static_cast<int>(e);
  return static_cast<int>(cudaDeviceSynchronize());
}
"""

_DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3, torch.bool: 4}


def build_standalone():
    out_dir = os.path.join(ROOT, "build")
    os.makedirs(out_dir, exist_ok=True)
    shim = os.path.join(out_dir, "txk_attention_fwd_shim.cu")
    with open(shim, "w") as f:
        f.write(SHIM)
    so = os.path.join(out_dir, "txk_attention_fwd_standalone.so")
    src = os.path.join(ROOT, "csrc", "kernels", "attention_fwd.cu")
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    cmd = ["nvcc", "-std=c++17", "-O3", "--use_fast_math", "-lineinfo", "-shared", "-Xcompiler", "-fPIC",
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "-I", os.path.join(ROOT, "csrc", "kernels"),
           src, shim, "-o", so]
    if not os.path.exists(so) or os.path.getmtime(so) < os.path.getmtime(src):
        print(" ".join(cmd), flush=True)
        subprocess.check_call(cmd)
    lib = ctypes.CDLL(so)
    return lib


class Standalone:
    def __init__(self):
        self.lib = build_standalone()
        props = torch.cuda.get_device_properties(0)
        self.num_sms = props.multi_processor_count
        # The opt-in per-block limit (what the binding must pass), e.g. 227 KB on H100. Older
        # torch lacks the property: use the documented per-arch value rather than 48 KB, which
        # would silently route most head dims to the general kernel.
        known = {(9, 0): 232448, (8, 0): 166912, (8, 6): 101376, (8, 9): 101376}
        self.max_smem = (getattr(props, "shared_memory_per_block_optin", 0)
                         or known.get(torch.cuda.get_device_capability(0), 48 * 1024))
        print(f"num_sms={self.num_sms} max_smem_per_block={self.max_smem}", flush=True)

    def __call__(self, q, k, v, mask, scale, causal, dropout_p, rng, timing_reps=0):
        N, H, L, E = q.shape
        Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
        out = torch.full((N, H, L, Ev), float("nan"), dtype=q.dtype, device=q.device)
        lse = torch.full((N, H, L), float("nan"), dtype=torch.float32, device=q.device)
        i64 = ctypes.c_int64
        dims = (i64 * 7)(N, H, Hkv, L, S, E, Ev)
        strides = (i64 * 12)(*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3])
        if mask is not None:
            mask = mask.expand(N, H, L, S)
            mkind, mdt, mptr, mstr = (1 if mask.dtype == torch.bool else 2), _DT[mask.dtype], mask.data_ptr(), mask.stride()
        else:
            mkind, mdt, mptr, mstr = 0, 4, 0, (0, 0, 0, 0)
        mstrides = (i64 * 4)(*mstr)
        seed, offset = (0, 0) if rng is None else (int(rng[0]) % 2**64, int(rng[1]) % 2**64)
        args = [ctypes.c_int(_DT[q.dtype]), ctypes.c_void_p(q.data_ptr()), ctypes.c_void_p(k.data_ptr()),
                ctypes.c_void_p(v.data_ptr()), ctypes.c_void_p(out.data_ptr()), ctypes.c_void_p(lse.data_ptr()),
                dims, strides, ctypes.c_int(mkind), ctypes.c_int(mdt), ctypes.c_void_p(mptr), mstrides,
                ctypes.c_float(scale), ctypes.c_int(int(causal)), ctypes.c_float(dropout_p),
                ctypes.c_uint64(seed), ctypes.c_uint64(offset), ctypes.c_int(self.num_sms),
                ctypes.c_int64(self.max_smem)]
        self.lib.txk_ws_bytes.restype = ctypes.c_uint64
        nbytes = self.lib.txk_ws_bytes(*args)
        ws = torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=q.device)
        torch.cuda.synchronize()
        err = self.lib.txk_fwd(*args, ctypes.c_void_p(ws.data_ptr()), ctypes.c_uint64(nbytes))
        if err != 0:
            raise RuntimeError(f"attention_fwd_cuda returned cudaError {err}")
        if timing_reps:
            # Median of timing_reps launches on the default stream, timed with events.
            times = []
            for _ in range(timing_reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(torch.cuda.default_stream())
                self.lib.txk_fwd_async(*args, ctypes.c_void_p(ws.data_ptr()), ctypes.c_uint64(nbytes))
                end.record(torch.cuda.default_stream())
                end.synchronize()
                times.append(start.elapsed_time(end))
            return out, lse, sorted(times)[len(times) // 2]
        return out, lse, int(nbytes)


def through_op(q, k, v, mask, scale, causal, dropout_p, rng):
    import tx_kernels  # noqa: F401
    out, lse = torch.ops.tx_kernels.attention_fwd(q, k, v, mask, scale, causal, dropout_p, rng)
    torch.cuda.synchronize()
    return out, lse, -1


def cases():
    bf, fp = torch.bfloat16, torch.float16
    for dtype in (fp, bf):
        for E in (32, 64, 80, 96, 128, 256):
            yield dict(name=f"fast {dtype} E={E}", dtype=dtype, N=1, H=2, Hkv=2, L=17, S=129, E=E, Ev=E)
    yield dict(name="fast causal L>S", dtype=bf, N=1, H=2, Hkv=1, L=150, S=129, E=64, Ev=64, causal=True)
    yield dict(name="fast causal L<S", dtype=fp, N=1, H=2, Hkv=2, L=129, S=300, E=128, Ev=128, causal=True)
    yield dict(name="mask+dropout", dtype=bf, N=2, H=2, Hkv=1, L=17, S=129, E=64, Ev=64,
               mask="bool", dropout_p=0.2)
    yield dict(name="additive fp32 mask", dtype=fp, N=1, H=2, Hkv=2, L=33, S=70, E=128, Ev=128,
               mask="add", causal=True)
    yield dict(name="split decode", dtype=bf, N=1, H=2, Hkv=1, L=3, S=1500, E=128, Ev=128)
    yield dict(name="split decode E=256 mask", dtype=fp, N=1, H=2, Hkv=2, L=5, S=1000, E=256, Ev=256,
               mask="bool")
    yield dict(name="general fp32", dtype=torch.float32, N=1, H=2, Hkv=1, L=17, S=129, E=64, Ev=64,
               causal=True, mask="add")
    yield dict(name="general fp64", dtype=torch.float64, N=1, H=2, Hkv=2, L=17, S=40, E=33, Ev=20)
    yield dict(name="general bf16 Ev!=E", dtype=bf, N=1, H=2, Hkv=2, L=17, S=129, E=64, Ev=32,
               dropout_p=0.1)


def reference(q, k, v, mask, scale, causal):
    """float64 (out, lse) from the definitions (no dropout)."""
    H, L, S = q.shape[1], q.shape[2], k.shape[2]
    q, k, v = q.double(), k.double(), v.double()
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    s = q @ k.transpose(-2, -1) * scale
    allowed = torch.ones(L, S, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            s = s + mask.double()
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return p @ v, lse


def bench():
    """bf16 forward TFLOP/s of the standalone launcher vs torch's flash SDPA backend."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    run = Standalone()
    print(f"{'shape':<36} {'causal':<6} {'ours ms':>8} {'TF/s':>7} {'flash ms':>8} {'TF/s':>7}")
    for (N, H, L, S, E) in [(4, 16, 4096, 4096, 128), (8, 16, 2048, 2048, 128), (8, 16, 2048, 2048, 64),
                            (2, 16, 8192, 8192, 128), (4, 8, 4096, 4096, 256), (16, 32, 1, 8192, 128)]:
        for causal in (False, True):
            q = torch.randn(N, H, L, E, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(N, H, S, E, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(N, H, S, E, device="cuda", dtype=torch.bfloat16)
            flops = 4 * N * H * L * S * E * (0.5 if causal and L == S else 1.0)
            _, _, ms = run(q, k, v, None, 1 / math.sqrt(E), causal, 0.0, None, timing_reps=30)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                for _ in range(3):
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                times = []
                for _ in range(30):
                    s0, s1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s0.record()
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                    s1.record()
                    s1.synchronize()
                    times.append(s0.elapsed_time(s1))
            fms = sorted(times)[len(times) // 2]
            print(f"{str((N, H, L, S, E)):<36} {str(causal):<6} {ms:8.3f} {flops / ms / 1e9:7.1f} "
                  f"{fms:8.3f} {flops / fms / 1e9:7.1f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--standalone", action="store_true", help="call the launcher through ctypes")
    ap.add_argument("--check", action="store_true", help="compare with a float64 reference")
    ap.add_argument("--bench", action="store_true", help="time bf16 shapes vs flash SDPA (standalone)")
    args = ap.parse_args()
    if args.bench:
        bench()
        return
    run = Standalone() if args.standalone else through_op
    torch.manual_seed(0)
    failed = 0
    for c in cases():
        N, H, Hkv, L, S, E, Ev, dt = c["N"], c["H"], c["Hkv"], c["L"], c["S"], c["E"], c["Ev"], c["dtype"]
        q = torch.randn(N, H, L, E, device="cuda", dtype=dt)
        k = torch.randn(N, Hkv, S, E, device="cuda", dtype=dt)
        v = torch.randn(N, Hkv, S, Ev, device="cuda", dtype=dt)
        mask = None
        if c.get("mask") == "bool":
            mask = torch.rand(N, 1, L, S, device="cuda") > 0.3
        elif c.get("mask") == "add":
            mask = torch.randn(L, S, device="cuda")
        p = c.get("dropout_p", 0.0)
        rng = torch.tensor([12345, 678], dtype=torch.int64) if p > 0 else None
        scale = 1.0 / math.sqrt(E)
        out, lse, ws = run(q, k, v, mask, scale, c.get("causal", False), p, rng)
        line = f"{c['name']:<32} ws={ws:>8}  finite={bool(torch.isfinite(out).all())}"
        if args.check and p == 0.0:
            ref, ref_lse = reference(q, k, v, mask, scale, c.get("causal", False))
            err = (out.double() - ref).abs().max().item()
            fin = torch.isfinite(ref_lse)
            lerr = (lse.double()[fin] - ref_lse[fin]).abs().max().item() if fin.any() else 0.0
            lse_ok = torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
            tol = 1e-5 if dt in (torch.float32, torch.float64) else (2e-2 if dt == torch.bfloat16 else 4e-3)
            ok = err < tol * max(1.0, ref.abs().max().item()) and lerr < 1e-3 and lse_ok
            failed += not ok
            line += f"  max_err={err:.2e} lse_err={lerr:.2e} {'ok' if ok else 'FAIL'}"
        elif not torch.isfinite(out).all():
            failed += 1
        print(line, flush=True)
    print("FAILED" if failed else "all variants ran", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
