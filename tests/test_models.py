"""tx_kernels.models vs Hugging Face (random small configs, no downloads) and a seq2seq toy task."""
import pytest
import torch
from torch import nn

from conftest import grad_err, rel_err
from tx_kernels.models import BertModel, GPT2LMHeadModel, Seq2SeqTransformer

transformers = pytest.importorskip("transformers", reason="transformers is not installed (requirements-dev.txt)")

FWD_TOL, GRAD_TOL = 2e-5, 2e-4  # fp32 models: relative (norm-wise) error


def _hf_gpt2(**kw):
    cfg = dict(vocab_size=101, n_positions=64, n_embd=48, n_layer=2, n_head=4, resid_pdrop=0.0,
               embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    cfg.update(kw)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg))


def _hf_grads_as_ours(hf_model):
    """HF parameter gradients under our names/layout (Conv1D weights transposed)."""
    out = {}
    for name, p in hf_model.named_parameters():
        g = p.grad
        if name.endswith((".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")):
            g = g.t()
        out[name] = g
    return out


@pytest.mark.parametrize("activation", ["gelu_new", "gelu", "relu"])
def test_gpt2_forward_and_gradients_match_hf(activation):
    hf = _hf_gpt2(activation_function=activation).train()
    ours = GPT2LMHeadModel.from_hf(hf).train()
    assert ours.lm_head.weight is ours.transformer.wte.weight  # tied like HF
    ids = torch.randint(0, 101, (3, 17))
    out_hf = hf(ids, labels=ids)
    loss, logits = ours(ids, labels=ids)
    assert rel_err(logits, out_hf.logits) < FWD_TOL
    assert abs(loss.item() - out_hf.loss.item()) < 1e-5 * max(1.0, abs(out_hf.loss.item()))
    out_hf.loss.backward()
    loss.backward()
    ref = _hf_grads_as_ours(hf)
    floor = 1e-3 * max(g.norm().item() for g in ref.values())
    for name, p in ours.named_parameters():
        assert grad_err(p.grad, ref[name], floor) < GRAD_TOL, f"{name}: {grad_err(p.grad, ref[name], floor):.2e}"


def test_gpt2_padding_mask_matches_hf_at_real_tokens():
    hf = _hf_gpt2().eval()
    ours = GPT2LMHeadModel.from_hf(hf.state_dict(), config=hf.config).eval()
    ids = torch.randint(0, 101, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, 9:] = 0  # right padding
    with torch.no_grad():
        a = hf(ids, attention_mask=mask).logits
        b = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert rel_err(b[real], a[real]) < FWD_TOL


def test_gpt2_cached_steps_match_full_forward():
    """Prefill, then several tokens at once (explicit mask path), then one token (no mask)."""
    hf = _hf_gpt2(n_layer=3)
    ours = GPT2LMHeadModel.from_hf(hf).eval()
    from tx_kernels.models import KVCache
    ids = torch.randint(0, 101, (2, 13))
    c = ours.config
    cache = KVCache(c.n_layer, 2, c.n_head, 13, c.n_embd // c.n_head, torch.float32, "cpu")
    with torch.no_grad():
        full = ours(ids)
        parts = [ours(ids[:, :5], past_key_values=cache), ours(ids[:, 5:12], past_key_values=cache),
                 ours(ids[:, 12:], past_key_values=cache)]
    assert rel_err(torch.cat(parts, dim=1), full) < FWD_TOL


@pytest.mark.parametrize("padded", [False, True])
def test_gpt2_greedy_generation_matches_hf_token_for_token(padded):
    hf = _hf_gpt2(n_layer=3).eval()
    ours = GPT2LMHeadModel.from_hf(hf)
    ids = torch.randint(1, 101, (3, 7))
    mask = None
    if padded:
        mask = torch.ones(3, 7, dtype=torch.long)
        mask[0, :3] = 0
        mask[2, :1] = 0
        ids = ids.masked_fill(mask == 0, 0)
    expected = hf.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                           max_new_tokens=12, do_sample=False)
    got = ours.generate(ids, 12, attention_mask=mask)
    assert torch.equal(got, expected)


def test_gpt2_sampling():
    ours = GPT2LMHeadModel.from_hf(_hf_gpt2())
    ids = torch.randint(0, 101, (2, 5))
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    a = ours.generate(ids, 10, do_sample=True, temperature=0.8, top_k=5, generator=g())
    b = ours.generate(ids, 10, do_sample=True, temperature=0.8, top_k=5, generator=g())
    assert torch.equal(a, b) and a.shape == (2, 15)
    # top_k=1 sampling is greedy decoding
    assert torch.equal(ours.generate(ids, 10, do_sample=True, top_k=1, generator=g()), ours.generate(ids, 10))
    # every sampled token is within the top-5 of its step's distribution
    with torch.no_grad():
        logits = ours(a[:, :-1])[:, 4:]
    top5 = logits.topk(5, dim=-1).indices
    assert (top5 == a[:, 5:, None]).any(-1).all()
    with pytest.raises(ValueError, match="temperature"):
        ours.generate(ids, 2, do_sample=True, temperature=0.0)


def _hf_bert(**kw):
    cfg = dict(vocab_size=99, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
               max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg.update(kw)
    return transformers.BertModel(transformers.BertConfig(**cfg))


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_bert_matches_hf(hidden_act):
    hf = _hf_bert(hidden_act=hidden_act).train()
    ours = BertModel.from_hf(hf).train()
    ids = torch.randint(0, 99, (3, 11))
    tt = torch.randint(0, 2, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 2:] = 0
    a = hf(ids, attention_mask=mask, token_type_ids=tt)
    b = ours(ids, attention_mask=mask, token_type_ids=tt)
    real = mask.bool()
    assert rel_err(b.last_hidden_state[real], a.last_hidden_state[real]) < FWD_TOL
    assert rel_err(b.pooler_output, a.pooler_output) < FWD_TOL
    g = torch.randn_like(a.last_hidden_state) * real[..., None]
    (a.last_hidden_state * g).sum().add(a.pooler_output.sum()).backward()
    (b.last_hidden_state * g).sum().add(b.pooler_output.sum()).backward()
    hf_grads = dict(hf.named_parameters())
    floor = 1e-3 * max(p.grad.norm().item() for p in hf.parameters())
    for name, p in ours.named_parameters():
        if ".attention.qkv." in name:
            i, kind = name.split(".")[2], name.rsplit(".", 1)[1]
            ref = torch.cat([hf_grads[f"encoder.layer.{i}.attention.self.{n}.{kind}"].grad
                             for n in ("query", "key", "value")])
        else:
            ref = hf_grads[name].grad
        assert grad_err(p.grad, ref, floor) < GRAD_TOL, f"{name}: {grad_err(p.grad, ref, floor):.2e}"


def test_bert_loads_task_head_state_dict():
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=40, max_position_embeddings=20)
    head = transformers.BertForSequenceClassification(cfg).eval()
    ours = BertModel.from_hf(head.state_dict(), config=cfg).eval()
    ids = torch.randint(0, 99, (2, 9))
    with torch.no_grad():
        assert rel_err(ours(ids).pooler_output, head.bert(ids).pooler_output) < FWD_TOL
    with pytest.raises(ValueError, match="config"):
        BertModel.from_hf(head.state_dict())


def test_seq2seq_transformer_learns_copy_task():
    torch.manual_seed(0)
    V, PAD, BOS = 12, 0, 1
    model = Seq2SeqTransformer(V, V, d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                               dim_feedforward=64, dropout=0.0, pad_idx=PAD)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for step in range(60):
        src = torch.randint(2, V, (32, 6))
        tgt_in = torch.cat([torch.full((32, 1), BOS), src[:, :-1]], dim=1)
        logits = model(src, tgt_in)
        loss = nn.functional.cross_entropy(logits.reshape(-1, V), src.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # chance level is ln(10) = 2.30; a few dozen steps get well below it
    assert last < 0.75 * first and last < 2.0, f"loss {first:.3f} -> {last:.3f}"
    out = model.greedy_decode(src[:4], max_len=6, bos_idx=BOS)
    assert out.shape == (4, 7) and (out[:, 0] == BOS).all()
    # its Transformer is state_dict-compatible with torch.nn.Transformer
    ref = nn.Transformer(32, 4, 2, 2, 64, 0.0, batch_first=True)
    ref.load_state_dict(model.transformer.state_dict(), strict=True)
