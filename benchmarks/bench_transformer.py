"""Whole layers and models: tx_kernels against torch.nn and Hugging Face.

Cases (same dict interface as bench_attention.cases: op, provider, mode, dtype, shape, setup, fn,
flops, baseline; generation rows carry `work` tokens and `unit` "tokens/s" instead of flops):
- encoder_layer fwd_bwd (train mode, dropout 0): tx_kernels.nn.TransformerEncoderLayer vs
  torch.nn.TransformerEncoderLayer (provider torch_nn);
- encoder_layer fwd (eval + no_grad): the same, where torch runs its native fused fast path
  (torch._transformer_encoder_layer_fwd) - the strongest CPU baseline torch has;
- gpt2_train_step fwd_bwd: tx_kernels.models.GPT2LMHeadModel vs transformers' GPT2LMHeadModel
  (sdpa attention) on the same weights, loss + backward;
- gpt2_generate fwd: greedy generation with a KV cache, ours vs HF generate();
- torch_compile rows of the HF model: only on CUDA or with --compile (slow to compile on CPU).
FLOPs: encoder layer forward = 2*N*L*(4*d^2 + 2*d*ff) (projections, FFN) + 4*N*L*L*d (QK^T, PV);
backward 2x forward. GPT-2 step = 6 * (non-embedding parameters) * tokens + attention 12*n_layer*L*d
per token (Kaplan et al.), plus 6*d*V*tokens for the LM head.

Standalone: python benchmarks/bench_transformer.py [--quick] [--compile] [--out FILE.csv]
(the default CPU run takes well under a minute on 2 idle cores).
"""
import argparse
import csv
import datetime
import os
import subprocess
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tx_kernels.nn as tnn  # noqa: E402
from tx_kernels.models import GPT2LMHeadModel  # noqa: E402

COLUMNS = ["op", "provider", "mode", "dtype", "shape", "median_ms", "p20_ms", "p80_ms", "throughput", "unit",
           "device", "torch", "commit", "date"]


def encoder_flops(N, L, d, ff, mode):
    fwd = 2.0 * N * L * (4 * d * d + 2 * d * ff) + 4.0 * N * L * L * d
    return fwd if mode == "fwd" else 3.0 * fwd


def _encoder_cases(device, quick):
    N, L, d, H, ff = (4, 64, 128, 4, 512) if quick else (8, 128, 256, 4, 1024)
    if device == "cuda":
        N, L, d, H, ff = (8, 512, 768, 12, 3072)
    dtype = torch.float32
    shape = f"N={N} L={L} d={d} H={H} ff={ff} post-LN relu"
    out = []
    for provider, cls in (("tx_kernels", tnn.TransformerEncoderLayer), ("torch_nn", nn.TransformerEncoderLayer)):
        for mode in ("fwd_bwd", "fwd"):
            def setup(cls=cls, mode=mode):
                torch.manual_seed(0)
                layer = cls(d, H, ff, dropout=0.0, batch_first=True).to(device)
                layer.train(mode == "fwd_bwd")
                x = torch.randn(N, L, d, device=device, requires_grad=(mode == "fwd_bwd"))
                kpm = torch.zeros(N, L, dtype=torch.bool, device=device)
                kpm[N // 2:, 3 * L // 4:] = True  # some padding: torch's fast path uses nested tensors
                return layer, x, kpm

            if mode == "fwd":
                def fn(inputs):
                    layer, x, kpm = inputs
                    with torch.no_grad():
                        return layer(x, src_key_padding_mask=kpm)
            else:
                def fn(inputs):
                    layer, x, kpm = inputs
                    layer(x, src_key_padding_mask=kpm).sum().backward()
                    layer.zero_grad(set_to_none=True)
                    x.grad = None
            out.append(dict(op="encoder_layer", provider=provider, mode=mode, dtype="float32", shape=shape,
                            setup=setup, fn=fn, flops=encoder_flops(N, L, d, ff, mode), baseline="torch_nn"))
    return out


def _gpt2_sizes(device, quick):
    if device == "cuda":
        return dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024), 8, 512, 64
    if quick:
        return dict(n_embd=128, n_layer=2, n_head=4, vocab_size=1000, n_positions=256), 4, 64, 16
    return dict(n_embd=256, n_layer=4, n_head=4, vocab_size=4000, n_positions=256), 4, 128, 32


def gpt2_step_flops(cfg, N, L):
    d, nl, V = cfg["n_embd"], cfg["n_layer"], cfg["vocab_size"]
    params = 12 * nl * d * d
    return N * L * (6.0 * params + 6.0 * d * V + 12.0 * nl * L * d)


def _gpt2_cases(device, quick, compile_hf):
    try:
        import transformers
    except ImportError:
        print("bench_transformer: transformers not installed; skipping the GPT-2 rows", file=sys.stderr)
        return []
    cfg, N, L, new_tokens = _gpt2_sizes(device, quick)
    shape = f"N={N} L={L} d={cfg['n_embd']} layers={cfg['n_layer']} V={cfg['vocab_size']}"
    gen_shape = f"N=1 prompt=16 new={new_tokens} d={cfg['n_embd']} layers={cfg['n_layer']}"

    def models():
        torch.manual_seed(0)
        hf_cfg = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                         eos_token_id=None, pad_token_id=0, **cfg)
        hf_cfg._attn_implementation = "sdpa"
        hf = transformers.GPT2LMHeadModel(hf_cfg).to(device)
        return hf, GPT2LMHeadModel.from_hf(hf).to(device)

    providers = [("tx_kernels", 1), ("hf_sdpa", 0)]
    if compile_hf:
        providers.append(("torch_compile", 0))
    out = []
    for provider, which in providers:
        def setup_train(which=which, provider=provider):
            pair = models()
            model = pair[which].train()
            if provider == "torch_compile":
                model = torch.compile(model)
            ids = torch.randint(0, cfg["vocab_size"], (N, L), device=device)
            return model, ids

        if which == 1:
            def train_fn(inputs):
                model, ids = inputs
                model(ids, labels=ids)[0].backward()
                model.zero_grad(set_to_none=True)
        else:
            def train_fn(inputs):
                model, ids = inputs
                model(input_ids=ids, labels=ids).loss.backward()
                model.zero_grad(set_to_none=True)
        out.append(dict(op="gpt2_train_step", provider=provider, mode="fwd_bwd", dtype="float32", shape=shape,
                        setup=setup_train, fn=train_fn, flops=gpt2_step_flops(cfg, N, L), baseline="hf_sdpa"))
        if provider == "torch_compile":
            continue

        def setup_gen(which=which):
            model = models()[which].eval()
            return model, torch.randint(0, cfg["vocab_size"], (1, 16), device=device)

        if which == 1:
            def gen_fn(inputs):
                model, ids = inputs
                return model.generate(ids, new_tokens)
        else:
            def gen_fn(inputs):
                model, ids = inputs
                return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False)
        out.append(dict(op="gpt2_generate", provider=provider, mode="fwd", dtype="float32", shape=gen_shape,
                        setup=setup_gen, fn=gen_fn, flops=None, work=new_tokens, unit="tokens/s",
                        baseline="hf_sdpa"))
    return out


def cases(device="cpu", quick=False, compile_hf=None):
    if compile_hf is None:
        compile_hf = device == "cuda"
    return _encoder_cases(device, quick) + _gpt2_cases(device, quick, compile_hf)


# ------------------------------------------------------------------------------------------------
# Standalone runner (the suite's benchmarks/run.py drives cases() itself).
# ------------------------------------------------------------------------------------------------
def _time(case, device, reps, warmup):
    inputs = case["setup"]()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        case["fn"](inputs)
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        case["fn"](inputs)
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return q(0.5), q(0.2), q(0.8)


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return ""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also torch.compile the HF model (slow on CPU)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="CSV file to append rows to")
    args = ap.parse_args()
    device = args.device
    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    rows = []
    for case in cases(device, args.quick, args.compile or None):
        med, p20, p80 = _time(case, device, args.reps, warmup=2)
        if case.get("flops"):
            thr, unit = case["flops"] / (med * 1e-3) / 1e12, "TFLOP/s"
        else:
            thr, unit = case["work"] / (med * 1e-3), case["unit"]
        rows.append(dict(op=case["op"], provider=case["provider"], mode=case["mode"], dtype=case["dtype"],
                         shape=case["shape"], median_ms=f"{med:.3f}", p20_ms=f"{p20:.3f}", p80_ms=f"{p80:.3f}",
                         throughput=f"{thr:.4g}", unit=unit, device=dev_name, torch=torch.__version__,
                         commit=_commit(), date=datetime.date.today().isoformat()))
        r = rows[-1]
        print(f"{r['op']:16s} {r['provider']:12s} {r['mode']:8s} {r['median_ms']:>10s} ms  "
              f"{r['throughput']:>8s} {unit:8s} {r['shape']}", flush=True)
    if args.out:
        new = not os.path.exists(args.out)
        with open(args.out, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
