"""Activation checkpointing over tx_kernels blocks gives the gradients of the plain run, bit for bit,
with dropout on: torch.utils.checkpoint (reentrant and not), checkpoint_sequential, and Hugging
Face's activation_checkpointing_enable on a patched GPT-2.

The recompute in the backward must draw the same attention, FFN and residual dropout masks as the
first forward did; torch.utils.checkpoint restores the random state for that, so it works only as
long as tx_kernels draws its dropout seeds from torch's generator.
"""
import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

import tx_kernels
import tx_kernels.nn as tnn
from conftest import checkpoint_forward, count_attention_calls
from tx_kernels.models import GPT2Config, GPT2LMHeadModel

REENTRANT = pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])


def _run(fn, params, seed):
    """loss and {name: gradient} of fn() (a scalar) for params {name: tensor}, under one seed."""
    for p in params.values():
        p.grad = None
    torch.manual_seed(seed)
    loss = fn()
    loss.backward()  # not autograd.grad: reentrant checkpointing supports only .backward()
    return loss.detach(), {n: p.grad for n, p in params.items()}


def _assert_identical(plain, ckpt):
    assert torch.equal(plain[0], ckpt[0]), f"loss {plain[0].item()} vs {ckpt[0].item()}"
    assert plain[1].keys() == ckpt[1].keys()
    for name, a in plain[1].items():
        b = ckpt[1][name]
        assert torch.equal(a, b), f"{name}: max diff {(a - b).abs().max().item():.3e}"


def _check(model_plain, model_ckpt, loss_fn, monkeypatch, recomputed, params_of=None):
    """Same loss and bitwise-same gradients with and without checkpointing, and proof that dropout
    was on and that the checkpointed run recomputed `recomputed` attention calls."""
    params_of = params_of or (lambda m: dict(m.named_parameters()))
    calls = count_attention_calls(monkeypatch)
    plain = _run(lambda: loss_fn(model_plain), params_of(model_plain), seed=7)
    n_plain = len(calls)
    ckpt = _run(lambda: loss_fn(model_ckpt), params_of(model_ckpt), seed=7)
    assert n_plain > 0 and all(p > 0 for p in calls), "attention dropout was not on"
    assert len(calls) - n_plain == n_plain + recomputed, "the checkpointed run did not recompute the attention"
    # The masks matter: another seed gives another loss.
    other = _run(lambda: loss_fn(model_plain), params_of(model_plain), seed=8)
    assert not torch.equal(other[0], plain[0]), "dropout had no effect"
    _assert_identical(plain, ckpt)


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=61, n_positions=32, n_embd=32, n_layer=3, n_head=4,
                                      resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2)).train()


@REENTRANT
def test_checkpoint_gpt2_blocks(use_reentrant, monkeypatch):
    plain = _gpt2()
    ckpt = copy.deepcopy(plain)
    for block in ckpt.transformer.h:
        checkpoint_forward(block, use_reentrant)
    ids = torch.randint(0, 61, (2, 11))
    _check(plain, ckpt, lambda m: m(ids, labels=ids)[0], monkeypatch, recomputed=3)


@REENTRANT
def test_checkpoint_sequential_encoder_layers(use_reentrant, monkeypatch):
    torch.manual_seed(0)
    # gelu: the FFN is one fused GEMM + bias/GELU/dropout kernel; norm_first: fused add+LayerNorm.
    layers = nn.Sequential(*(tnn.TransformerEncoderLayer(32, 4, 64, dropout=0.2, activation="gelu",
                                                         batch_first=True, norm_first=nf)
                             for nf in (True, False, True, False)))
    x = torch.randn(3, 9, 32, requires_grad=True)
    w = torch.randn(3, 9, 32)

    class Seq(nn.Module):
        def __init__(self, layers, segments):
            super().__init__()
            self.layers, self.segments = layers, segments

        def forward(self):
            if self.segments:
                out = checkpoint_sequential(self.layers, self.segments, x, use_reentrant=use_reentrant)
            else:
                out = self.layers(x)
            return (out * w).sum()

    # checkpoint_sequential runs its last segment without checkpointing: 2 of the 4 layers recompute.
    _check(Seq(layers, 0), Seq(layers, 2), lambda m: m(), monkeypatch, recomputed=2,
           params_of=lambda m: {"x": x, **dict(m.named_parameters())})


@REENTRANT
def test_hf_gradient_checkpointing_on_patched_gpt2(use_reentrant, monkeypatch):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2, bos_token_id=0,
                                  eos_token_id=None)
    plain = tx_kernels.patch(transformers.GPT2LMHeadModel(cfg)).train()
    ckpt = copy.deepcopy(plain)
    ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert ckpt.is_activation_checkpointing
    ids = torch.randint(0, 61, (2, 11))
    _check(plain, ckpt, lambda m: m(input_ids=ids, labels=ids).loss, monkeypatch, recomputed=2)
