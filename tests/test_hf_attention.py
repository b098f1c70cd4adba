"""attn_implementation="tx_kernels" for any Hugging Face model on the AttentionInterface, available
from `import tx_kernels` alone: GPT-2, BERT, and Llama / Qwen2 (grouped-query attention, rotary
embeddings) from small random configs, loaded with from_pretrained or switched with
set_attn_implementation, against the same weights under attn_implementation="sdpa": logits at
real tokens, gradients, and greedy generation token for token.
"""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tx_kernels
from conftest import count_attention_calls, grad_err, rel_err

transformers = pytest.importorskip("transformers", reason="transformers is not installed (requirements-dev.txt)")

FWD_TOL, GRAD_TOL = 2e-5, 2e-4
VOCAB = 101
# initializer_range 0.2, not HF's 0.02: random models at 0.02 give near-uniform logits, whose
# argmax (greedy generation) could flip on rounding differences alone.
COMMON = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=None, initializer_range=0.2)
DECODER = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
               num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0, **COMMON)
ARCHS = {
    "gpt2": (transformers.GPT2LMHeadModel,
             lambda: transformers.GPT2Config(n_positions=64, n_embd=48, n_layer=2, n_head=4, resid_pdrop=0.0,
                                             embd_pdrop=0.0, attn_pdrop=0.0, **COMMON)),
    "bert": (transformers.BertForMaskedLM,
             lambda: transformers.BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=80, max_position_embeddings=40, hidden_dropout_prob=0.0,
                                             attention_probs_dropout_prob=0.0, **COMMON)),
    "llama": (transformers.LlamaForCausalLM, lambda: transformers.LlamaConfig(**DECODER)),
    "qwen2": (transformers.Qwen2ForCausalLM, lambda: transformers.Qwen2Config(**DECODER)),
}
DECODERS = ["gpt2", "llama", "qwen2"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each architecture's random weights, saved once."""
    out = {}
    for i, (arch, (cls, config)) in enumerate(ARCHS.items()):
        torch.manual_seed(i)
        path = tmp_path_factory.mktemp(arch)
        cls(config()).save_pretrained(path)
        out[arch] = path
    return out


def _pair(saved, arch):
    cls = ARCHS[arch][0]
    ref = cls.from_pretrained(saved[arch], attn_implementation="sdpa")
    ours = cls.from_pretrained(saved[arch], attn_implementation="tx_kernels")
    assert ref.config._attn_implementation == "sdpa"
    assert ours.config._attn_implementation == "tx_kernels"
    return ref, ours


def _padded_batch(left):
    ids = torch.randint(2, VOCAB, (3, 11))
    mask = torch.ones_like(ids)
    if left:
        mask[1, :4] = 0
    else:
        mask[1, 7:] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_and_gradients_match_sdpa(saved, arch, monkeypatch):
    ref, ours = _pair(saved, arch)
    ref.train(), ours.train()
    ids, mask = _padded_batch(left=arch in DECODERS)
    calls = count_attention_calls(monkeypatch)
    a, b = ref(input_ids=ids, attention_mask=mask), ours(input_ids=ids, attention_mask=mask)
    assert len(calls) == ours.config.num_hidden_layers, "tx_kernels attention did not run"
    real = mask.bool()
    assert rel_err(b.logits[real], a.logits[real]) < FWD_TOL
    w = torch.randn_like(a.logits)
    (a.logits[real] * w[real]).sum().backward()
    (b.logits[real] * w[real]).sum().backward()
    ref_params = dict(ref.named_parameters())
    floor = 1e-3 * max(p.grad.norm().item() for p in ref.parameters() if p.grad is not None)
    for name, p in ours.named_parameters():
        g_ref = ref_params[name].grad
        assert (p.grad is None) == (g_ref is None), name
        if g_ref is not None:
            err = grad_err(p.grad, g_ref, floor)
            assert err < GRAD_TOL, f"{name}: {err:.2e}"


@pytest.mark.parametrize("arch", DECODERS)
def test_greedy_generation_matches_sdpa(saved, arch, monkeypatch):
    ref, ours = _pair(saved, arch)
    ref.eval(), ours.eval()
    ids, mask = _padded_batch(left=True)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    calls = count_attention_calls(monkeypatch)
    got = ours.generate(ids, **kw)
    assert len(calls) == 8 * ours.config.num_hidden_layers  # prefill + 7 cached steps, every layer
    assert torch.equal(got, ref.generate(ids, **kw))


def test_set_attn_implementation_switches_a_loaded_model(saved, monkeypatch):
    ref, _ = _pair(saved, "llama")
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation("tx_kernels")
    assert ours.config._attn_implementation == "tx_kernels"
    ids, mask = _padded_batch(left=True)
    calls = count_attention_calls(monkeypatch)
    with torch.no_grad():
        a, b = ref(input_ids=ids, attention_mask=mask), ours(input_ids=ids, attention_mask=mask)
    assert calls
    assert rel_err(b.logits[mask.bool()], a.logits[mask.bool()]) < FWD_TOL


@pytest.mark.parametrize("transformers_first", [False, True], ids=["tx_kernels_first", "transformers_first"])
def test_import_alone_registers_attn_implementation(saved, transformers_first):
    """A fresh interpreter: no patch() call, either import order."""
    imports = ["import transformers.modeling_utils", "import tx_kernels"]
    script = textwrap.dedent(f"""
        {imports[1 - transformers_first]}
        {imports[transformers_first]}
        import sys, torch, transformers
        assert tx_kernels.__file__.startswith(sys.argv[2]), tx_kernels.__file__
        model = transformers.LlamaForCausalLM.from_pretrained(sys.argv[1], attn_implementation="tx_kernels")
        assert model.config._attn_implementation == "tx_kernels", model.config._attn_implementation
        model(torch.tensor([[3, 4, 5]]))
        print("ok")
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(tx_kernels.__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script, str(saved["llama"]), root], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.parametrize("arg", ["s_aux", "softcap", "position_bias"])
def test_unsupported_attention_arguments_are_refused(arg):
    """Attention sinks (gpt-oss), logit softcapping (Gemma 2), T5's position bias: an error, never
    attention computed without them."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    q = k = v = torch.randn(1, 2, 3, 4)
    with pytest.raises(NotImplementedError, match=arg):
        ALL_ATTENTION_FUNCTIONS["tx_kernels"](torch.nn.Module(), q, k, v, None, **{arg: torch.zeros(2)})
