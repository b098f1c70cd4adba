"""tx_kernels.nn vs torch.nn: state_dict compatibility, forward and gradient parity, masks, dropout.

Weights go through state_dict (strict) from a torch.nn module, so any key, shape or layout
mismatch fails. Every comparison runs in train mode with dropout 0 (gradients of the inputs and
of every parameter) unless the test is about eval or dropout. torch's fast paths are disabled
while computing the reference so it runs the textbook composite.
"""
import pytest
import torch
from torch import nn

import tx_kernels.nn as tnn
from conftest import rel_err

DTYPE = torch.float64
FWD_TOL = 1e-9
# The attention kernel keeps its logsumexp in fp32 (also for fp64 inputs), so fp64 gradients
# carry ~1e-8 relative error; forward outputs stay at fp64 accuracy.
GRAD_TOL = 1e-6


@pytest.fixture(autouse=True)
def _no_torch_fastpath():
    old = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(old)


def _pair(cls_torch, cls_tx, *args, **kwargs):
    ref = cls_torch(*args, **kwargs).to(DTYPE)
    ours = cls_tx(*args, **kwargs).to(DTYPE)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _assert_same_grads(ref, ours, ref_inputs, our_inputs, ref_out, our_out, valid=None):
    """Backpropagate the same random cotangent; compare input and parameter gradients."""
    assert rel_err(our_out, ref_out) < FWD_TOL, f"forward rel err {rel_err(our_out, ref_out):.2e}"
    g = torch.randn_like(ref_out)
    if valid is not None:
        g = g * valid
    torch.autograd.backward(ref_out, g)
    torch.autograd.backward(our_out, g)
    for i, (a, b) in enumerate(zip(ref_inputs, our_inputs)):
        if a.grad is not None or b.grad is not None:
            assert rel_err(b.grad, a.grad) < GRAD_TOL, f"input {i} grad rel err {rel_err(b.grad, a.grad):.2e}"
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        q = ref_params[name]
        assert (p.grad is None) == (q.grad is None), f"{name}: gradient presence differs"
        if p.grad is not None:
            assert rel_err(p.grad, q.grad) < GRAD_TOL, f"{name} grad rel err {rel_err(p.grad, q.grad):.2e}"


def _leaf(*shape):
    x = torch.randn(*shape, dtype=DTYPE)
    return x.clone().requires_grad_(), x.clone().requires_grad_()


MASK_KINDS = ["none", "bool_attn", "float_attn", "bool_kpm", "float_kpm", "bool_both", "float_both",
              "mixed_both", "causal_hint", "attn_3d"]


def _masks(kind, N, H, L, S):
    """torch.nn-convention masks (bool True = blocked), never blocking a whole row."""
    attn = kpm = None
    is_causal = False
    blocked = torch.rand(L, S) < 0.3
    blocked[:, 0] = False
    pad = torch.zeros(N, S, dtype=torch.bool)
    for n in range(N):
        pad[n, S - 1 - n % max(S - 1, 1):] = True if S > 1 else False
    pad[:, 0] = False

    def as_float(m):
        return torch.zeros(m.shape, dtype=DTYPE).masked_fill(m, float("-inf"))

    if kind in ("bool_attn", "bool_both"):
        attn = blocked
    if kind in ("float_attn", "float_both", "mixed_both"):
        attn = as_float(blocked) + 0.1 * torch.randn(L, S, dtype=DTYPE)
    if kind in ("bool_kpm", "bool_both", "mixed_both"):
        kpm = pad
    if kind in ("float_kpm", "float_both"):
        kpm = as_float(pad)
    if kind == "causal_hint":
        attn = torch.ones(L, S, dtype=torch.bool).triu(1)
        kpm = pad
        is_causal = True
    if kind == "attn_3d":
        b3 = torch.rand(N * H, L, S) < 0.3
        b3[..., 0] = False
        attn = b3
    return attn, kpm, is_causal


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_encoder_layer_parity(batch_first, norm_first, mask_kind):
    N, L, E, H = 3, 7, 24, 4
    ref, ours = _pair(nn.TransformerEncoderLayer, tnn.TransformerEncoderLayer, E, H, 40, dropout=0.0,
                      batch_first=batch_first, norm_first=norm_first)
    ref.train(), ours.train()
    a, b = _leaf(*((N, L, E) if batch_first else (L, N, E)))
    attn, kpm, is_causal = _masks(mask_kind, N, H, L, L)
    out_ref = ref(a, src_mask=attn, src_key_padding_mask=kpm, is_causal=is_causal)
    out = ours(b, src_mask=attn, src_key_padding_mask=kpm, is_causal=is_causal)
    if mask_kind == "bool_kpm":  # the padding-free path: 0 at padded positions (see nn/transformer.py)
        padded = (kpm if batch_first else kpm.t())[..., None]
        assert (out.masked_select(padded) == 0).all()
        out_ref = out_ref.masked_fill(padded, 0.0)
    _assert_same_grads(ref, ours, [a], [b], out_ref, out)


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_module_tanh", "tanh_callable"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_activations(activation, norm_first):
    act = {"relu": "relu", "gelu": "gelu", "gelu_module_tanh": nn.GELU(approximate="tanh"),
           "tanh_callable": torch.tanh}[activation]
    ref, ours = _pair(nn.TransformerEncoderLayer, tnn.TransformerEncoderLayer, 16, 2, 33, dropout=0.0,
                      activation=act, batch_first=True, norm_first=norm_first)
    a, b = _leaf(2, 5, 16)
    _assert_same_grads(ref, ours, [a], [b], ref(a), ours(b))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "bool_both", "float_both", "causal_hint"])
def test_decoder_layer_parity(batch_first, norm_first, mask_kind):
    N, L, S, E, H = 2, 5, 9, 16, 2
    ref, ours = _pair(nn.TransformerDecoderLayer, tnn.TransformerDecoderLayer, E, H, 20, dropout=0.0,
                      activation="gelu", batch_first=batch_first, norm_first=norm_first)
    shape = (lambda n, l: (n, l, E)) if batch_first else (lambda n, l: (l, n, E))
    a, b = _leaf(*shape(N, L))
    ma, mb = _leaf(*shape(N, S))
    tgt_mask, tgt_kpm, causal = _masks(mask_kind, N, H, L, L)
    mem_mask, mem_kpm, _ = _masks("none" if mask_kind == "causal_hint" else mask_kind, N, H, L, S)
    kw = dict(tgt_mask=tgt_mask, memory_mask=mem_mask, tgt_key_padding_mask=tgt_kpm,
              memory_key_padding_mask=mem_kpm, tgt_is_causal=causal)
    _assert_same_grads(ref, ours, [a, ma], [b, mb], ref(a, ma, **kw), ours(b, mb, **kw))


@pytest.mark.parametrize("norm_first", [False, True])
def test_full_transformer_parity(norm_first):
    torch.manual_seed(torch.initial_seed())
    ref, ours = _pair(nn.Transformer, tnn.Transformer, 16, 2, 2, 2, 24, dropout=0.0, batch_first=True,
                      norm_first=norm_first)
    src, src2 = _leaf(3, 6, 16)
    tgt, tgt2 = _leaf(3, 5, 16)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(5, dtype=DTYPE)
    kpm = torch.tensor([[False] * 6, [False] * 4 + [True] * 2, [False] * 5 + [True]])
    kw = dict(tgt_mask=tgt_mask, src_key_padding_mask=kpm, memory_key_padding_mask=kpm)
    _assert_same_grads(ref, ours, [src, tgt], [src2, tgt2], ref(src, tgt, **kw), ours(src2, tgt2, **kw))


def test_encoder_stack_detects_causal_mask_and_uses_final_norm():
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    ref = nn.TransformerEncoder(layer, 3, norm=nn.LayerNorm(16), enable_nested_tensor=False).to(DTYPE)
    tlayer = tnn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    ours = tnn.TransformerEncoder(tlayer, 3, norm=tnn.LayerNorm(16)).to(DTYPE)
    ours.load_state_dict(ref.state_dict(), strict=True)
    a, b = _leaf(2, 6, 16)
    mask = nn.Transformer.generate_square_subsequent_mask(6, dtype=DTYPE)
    _assert_same_grads(ref, ours, [a], [b], ref(a, mask=mask), ours(b, mask=mask))


def test_same_seed_same_weights_and_keys():
    for make in (lambda m: m.Transformer(32, 4, 2, 1, 48, batch_first=True, bias=False),
                 lambda m: m.MultiheadAttention(32, 4, kdim=8, vdim=12, add_bias_kv=True),
                 lambda m: m.TransformerDecoderLayer(32, 4, 64, norm_first=True)):
        torch.manual_seed(123)
        ref = make(nn)
        torch.manual_seed(123)
        ours = make(tnn)
        sd_ref, sd = ref.state_dict(), ours.state_dict()
        assert list(sd_ref) == list(sd)
        for k in sd:
            assert torch.equal(sd_ref[k], sd[k]), k
        # and back: a tx_kernels state_dict loads strictly into torch.nn
        ref.load_state_dict(sd, strict=True)


@pytest.mark.parametrize("variant", ["packed_self", "cross_kv_same", "kdim_vdim", "bias_kv_zero_attn",
                                     "no_bias", "unbatched"])
@pytest.mark.parametrize("average", [True, False])
def test_mha_need_weights(variant, average):
    E, H, N, L, S = 16, 4, 2, 5, 7
    kwargs = {"kdim_vdim": dict(kdim=6, vdim=10), "bias_kv_zero_attn": dict(add_bias_kv=True, add_zero_attn=True),
              "no_bias": dict(bias=False)}.get(variant, {})
    ref, ours = _pair(nn.MultiheadAttention, tnn.MultiheadAttention, E, H, **kwargs)
    kd, vd = kwargs.get("kdim", E), kwargs.get("vdim", E)
    if variant == "unbatched":
        q, q2 = _leaf(L, E)
        k, k2 = _leaf(S, E)
        v, v2 = k, k2
        kpm = torch.zeros(S, dtype=torch.bool)
        kpm[-2:] = True
    else:
        q, q2 = _leaf(L, N, E)
        k, k2 = _leaf(S, N, kd)
        v, v2 = (k, k2) if variant == "cross_kv_same" else _leaf(S, N, vd)
        kpm = torch.zeros(N, S, dtype=torch.bool)
        kpm[1, -3:] = True
    if variant == "packed_self":
        k, k2, v, v2, kpm = q, q2, q, q2, None
    attn = torch.rand(q.shape[0], k.shape[0]) < 0.2
    attn[:, 0] = False
    for need_weights in (True, False):
        o_ref, w_ref = ref(q, k, v, key_padding_mask=kpm, attn_mask=attn, need_weights=need_weights,
                           average_attn_weights=average)
        o, w = ours(q2, k2, v2, key_padding_mask=kpm, attn_mask=attn, need_weights=need_weights,
                    average_attn_weights=average)
        assert rel_err(o, o_ref) < FWD_TOL
        if need_weights:
            assert w.shape == w_ref.shape and rel_err(w, w_ref) < FWD_TOL
        else:
            assert w is None and w_ref is None
    _assert_same_grads(ref, ours, [q, k, v], [q2, k2, v2], o_ref, o)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_is_causal_hint(need_weights, batch_first):
    """is_causal=True with its causal attn_mask as torch takes it, and (tx_kernels only) without one."""
    E, H, N, L = 16, 4, 2, 6
    ref, ours = _pair(nn.MultiheadAttention, tnn.MultiheadAttention, E, H, batch_first=batch_first)
    x, x2 = _leaf(*((N, L, E) if batch_first else (L, N, E)))
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=DTYPE)
    o_ref, w_ref = ref(x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights)
    o, w = ours(x2, x2, x2, attn_mask=causal, is_causal=True, need_weights=need_weights)
    if need_weights:
        assert w.shape == w_ref.shape and rel_err(w, w_ref) < FWD_TOL
    o_alone, _ = ours(x2, x2, x2, is_causal=True, need_weights=need_weights)
    assert rel_err(o_alone, o_ref) < FWD_TOL
    _assert_same_grads(ref, ours, [x], [x2], o_ref, o)


def test_fully_masked_rows_give_zero_not_nan():
    """A query whose keys are all padding gives 0 on every path (torch: NaN with need_weights=True)."""
    E, H = 8, 2
    ref, ours = _pair(nn.MultiheadAttention, tnn.MultiheadAttention, E, H, batch_first=True, bias=False)
    x = torch.randn(2, 4, E, dtype=DTYPE, requires_grad=True)
    kpm = torch.tensor([[False, False, True, True], [True, True, True, True]])
    for need_weights in (False, True):
        out, w = ours(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
        ref_out, _ = ref(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
        if need_weights:
            # torch 2.13's need_weights path gives NaN here (its SDPA path gives 0, like us).
            assert torch.isnan(ref_out[1]).all()
        assert torch.equal(out[1], torch.zeros_like(out[1]))  # no bias: projection of 0 is 0
        assert rel_err(out[0], ref_out[0]) < FWD_TOL
        out.sum().backward()
        assert torch.isfinite(x.grad).all()
        x.grad = None


def test_train_mode_dropout_is_applied_and_eval_is_deterministic():
    torch.manual_seed(0)
    layer = tnn.TransformerEncoderLayer(32, 4, 64, dropout=0.3, batch_first=True)
    x = torch.randn(4, 16, 32)
    layer.train()
    y1, y2 = layer(x), layer(x)
    assert not torch.equal(y1, y2)
    layer.eval()
    ref = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.3, batch_first=True).eval()
    ref.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))
        assert rel_err(layer(x), ref(x)) < 1e-5


def test_mha_attention_dropout_statistics():
    """With p=0.5 the kernel's dropout keeps about half the probabilities, scaled by 2."""
    torch.manual_seed(0)
    mha = tnn.MultiheadAttention(8, 1, dropout=0.5, batch_first=True, bias=False)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([torch.zeros(8, 8), torch.zeros(8, 8), torch.eye(8)]))
        mha.out_proj.weight.copy_(torch.eye(8))
    # Zero q/k -> uniform probabilities 1/S; v = one-hot rows -> out[j] = kept_j * 2 / S
    S = 64
    x = torch.zeros(1, S, 8)
    x[0, :, 0] = 1.0
    mha.train()
    out, _ = mha(x, x, x, need_weights=False)
    kept_fraction = out[0, :, 0].mean().item()  # E[out] = 1 with inverted dropout
    assert 0.85 < kept_fraction < 1.15
    assert out.std().item() > 0  # some dropped


def test_eval_inference_vs_torch_fast_path():
    torch.backends.mha.set_fastpath_enabled(True)
    ref = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()
    ours = tnn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, 32)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 6:] = True
    with torch.no_grad():
        a, b = ref(x, src_key_padding_mask=kpm), ours(x, src_key_padding_mask=kpm)
    # Real tokens agree; padded positions are 0 on tx_kernels' padding-free path (nn/transformer.py).
    assert rel_err(b[~kpm], a[~kpm]) < 1e-5 and (b[kpm] == 0).all()


def test_layer_norm_and_positional_encoding():
    ref, ours = _pair(nn.LayerNorm, tnn.LayerNorm, (3, 5), eps=1e-3)
    assert isinstance(ours, nn.LayerNorm)
    a, b = _leaf(4, 3, 5)
    _assert_same_grads(ref, ours, [a], [b], ref(a), ours(b))
    for d in (6, 7):
        pe = tnn.PositionalEncoding(d, dropout=0.0, max_len=50, dtype=DTYPE)
        x = torch.zeros(11, 2, d, dtype=DTYPE)
        y = pe(x)
        import math
        for pos in (0, 3, 10):
            for i in range(d):
                angle = pos / (10000 ** ((i - i % 2) / d))
                expect = math.sin(angle) if i % 2 == 0 else math.cos(angle)
                assert abs(y[pos, 1, i].item() - expect) < 1e-12
        pe_bf = tnn.PositionalEncoding(d, dropout=0.0, max_len=50, batch_first=True, dtype=DTYPE)
        assert torch.equal(pe_bf(x.transpose(0, 1)), y.transpose(0, 1))
    with pytest.raises(ValueError, match="max_len"):
        tnn.PositionalEncoding(8, max_len=4)(torch.zeros(5, 1, 8))


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(RuntimeError, match="activation"):
        tnn.TransformerEncoderLayer(8, 2, activation="swish")
    with pytest.raises(ValueError, match="dropout"):
        tnn.TransformerEncoderLayer(8, 2, dropout=1.5)
    mha = tnn.MultiheadAttention(8, 2)
    x = torch.randn(3, 2, 8)
    with pytest.raises(RuntimeError, match="attn_mask"):
        mha(x, x, x, attn_mask=torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="key_padding_mask"):
        mha(x, x, x, key_padding_mask=torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask"):
        mha(x, x, x, attn_mask=torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="query"):
        mha(torch.randn(3, 2, 6), x, x)
