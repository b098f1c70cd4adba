"""Whole layers and models: tx_kernels against torch.nn and Hugging Face.

Cases (the builders return dicts: op, provider, mode, dtype, shape, setup -> inputs, fn(inputs),
flops, baseline; generation rows carry `work` tokens and `unit` "tokens/s" instead of flops;
cases(ctx) turns them into benchmarks.common.Case):
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

Run with the suite: python -m benchmarks.run --only transformer [--quick] [--compile]
"""
import sys

import torch
from torch import nn

import tx_kernels.nn as tnn
from benchmarks.common import Case, lazy_inputs
from tx_kernels.models import GPT2LMHeadModel


def encoder_flops(N, L, d, ff, mode):
    fwd = 2.0 * N * L * (4 * d * d + 2 * d * ff) + 4.0 * N * L * L * d
    return fwd if mode == "fwd" else 3.0 * fwd


def _encoder_cases(device, quick):
    N, L, d, H, ff = (4, 64, 128, 4, 512) if quick else (8, 128, 256, 4, 1024)
    if device == "cuda":
        N, L, d, H, ff = (8, 512, 768, 12, 3072)
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


def cases(ctx):
    compile_hf = ctx.compile or ctx.device == "cuda"
    out = []
    for c in _encoder_cases(ctx.device, ctx.quick) + _gpt2_cases(ctx.device, ctx.quick, compile_hf):
        setup, fn = lazy_inputs(c["setup"], c["fn"])
        out.append(Case(c["op"], c["provider"], c["mode"], c["dtype"], c["shape"], fn,
                        flops=c.get("flops"), work=c.get("work"), work_unit=c.get("unit", ""),
                        baseline=c["baseline"], setup=setup))
    return out
