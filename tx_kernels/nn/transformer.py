"""Drop-in torch.nn Transformer layers built on tx_kernels' fused operators.

Same constructor arguments, defaults, attribute names, initialization (and random-number use, so
the same seed gives the same weights), forward signatures and state_dict keys as torch.nn.
Inside:
- self-attention / encoder-decoder attention: tx_kernels.nn.MultiheadAttention (fused kernel);
- post-LN (norm_first=False): norm(x + sublayer(x)) is one tx_kernels.functional.add_layer_norm;
- pre-LN (norm_first=True): the residual stream is carried by add_layer_norm's residual_out, so
  "x = x + a; h = norm(x)" is one pass;
- FFN: tx_kernels.functional.feed_forward (bias + activation + dropout fused) for ReLU/GELU
  activations; any other callable runs unfused as linear2(dropout(activation(linear1(x)))).

Padding-free encoders: TransformerEncoder and TransformerEncoderLayer given a boolean
src_key_padding_mask (and no src_mask / is_causal) on CPU inputs pack the real tokens once, run
every GEMM, add+LayerNorm, FFN and attention (attention_varlen) on them only, and return 0 at
padded positions, as torch's nested-tensor fast path does (torch's padded path leaves values
there that depend on nothing meaningful; outputs at real tokens are the same either way).

Differences from torch.nn: fully masked query rows give 0 (torch: 0 or NaN depending on the path);
no nested-tensor fast path (the padding-free path above takes its place, in training too); dropout
masks come from tx_kernels' generator (same distribution, different draws than torch for one seed).
"""
import copy
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import xavier_uniform_

from .. import _activations
from .. import functional as TF
from .._checks import check_dropout_p
from ..varlen import PackedBatch
from ._utils import detect_is_causal_mask
from .activation import MultiheadAttention
from .normalization import LayerNorm, add_norm, add_then_norm, apply_norm

__all__ = ["TransformerEncoderLayer", "TransformerDecoderLayer", "TransformerEncoder",
           "TransformerDecoder", "Transformer"]


def _feed_forward(layer, x):
    """linear2(dropout(activation(linear1(x)))): one fused tx_kernels call when possible."""
    act = _activations.of_callable(layer.activation)
    l1, l2 = layer.linear1, layer.linear2
    if act is not None and type(l1) is nn.Linear and type(l2) is nn.Linear:
        p = layer.dropout.p if layer.training else 0.0
        return TF.feed_forward(x, l1.weight, l1.bias, l2.weight, l2.bias, act, p)
    return l2(layer.dropout(layer.activation(l1(x))))


def _check_batch(x, name):
    if x.is_nested:
        raise NotImplementedError(f"tx_kernels: nested tensor `{name}` is not supported; pass a padded tensor "
                                  f"and a key padding mask")


class TransformerEncoderLayer(nn.Module):
    __constants__ = ["norm_first"]

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Union[str, Callable[[Tensor], Tensor]] = F.relu, layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True,
                 device=None, dtype=None) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        check_dropout_p(dropout, "dropout")
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                            batch_first=batch_first, **factory_kwargs)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory_kwargs)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory_kwargs)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        activation = _activations.torch_function(activation)
        # torch.nn keeps this attribute for its fast path; kept for code that reads it.
        name = _activations.of_callable(activation)
        self.activation_relu_or_gelu = {"relu": 1, "gelu": 2}.get(name, 0)
        self.activation = activation

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        _check_batch(src, "src")
        packing = _packing([self], src, src_mask, src_key_padding_mask, is_causal)
        if packing is not None:
            return _run_packed(src, packing, self.self_attn.batch_first, lambda x: self._forward(x, None, packing, False))
        return self._forward(src, src_mask, src_key_padding_mask, is_causal)

    def _forward(self, x, src_mask, src_key_padding_mask, is_causal):
        """The layer on (.., E) rows: padded with masks, or packed real tokens with their PackedBatch."""
        if self.norm_first:
            h = apply_norm(self.norm1, x)
            a = self.dropout1(self._sa(h, src_mask, src_key_padding_mask, is_causal))
            h, x = add_norm(self.norm2, a, x)
            return x + self.dropout2(_feed_forward(self, h))
        a = self.dropout1(self._sa(x, src_mask, src_key_padding_mask, is_causal))
        x = add_then_norm(self.norm1, a, x)
        f = self.dropout2(_feed_forward(self, x))
        return add_then_norm(self.norm2, f, x)

    def _sa(self, x, attn_mask, key_padding_mask, is_causal):
        if isinstance(key_padding_mask, PackedBatch):
            return _packed_self_attention(self.self_attn, x, key_padding_mask)
        return self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                              need_weights=False, is_causal=is_causal)[0]


def _packing(layers, src, src_mask, key_padding_mask, is_causal):
    """The PackedBatch of the real tokens when these encoder layers can run padding-free, else None."""
    if (src.dim() != 3 or src_mask is not None or is_causal or src.device.type != "cpu"
            or not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool):
        return None
    for layer in layers:
        if type(layer) is not TransformerEncoderLayer:
            return None
        mha = layer.self_attn
        if (not isinstance(mha, MultiheadAttention) or not mha._qkv_same_embed_dim or mha.bias_k is not None
                or mha.bias_v is not None or mha.add_zero_attn):
            return None
    if not bool(key_padding_mask.any()):
        return None  # no padding: nothing to save
    return PackedBatch(~key_padding_mask)  # torch's key padding mask is True at padding


def _run_packed(src, packing, batch_first, run):
    x = src if batch_first else src.transpose(0, 1)
    out = packing.pad(run(packing.pack(x)))
    return out if batch_first else out.transpose(0, 1)


def _packed_self_attention(mha, x, packing):
    """MultiheadAttention's self-attention on packed (T, E) real tokens."""
    T, E = x.shape
    H = mha.num_heads
    q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).view(T, 3, H, E // H).unbind(1)
    a = packing.attention(q, k, v, dropout_p=mha.dropout if mha.training else 0.0)
    return F.linear(a.reshape(T, E), mha.out_proj.weight, mha.out_proj.bias)


class TransformerDecoderLayer(nn.Module):
    __constants__ = ["norm_first"]

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Union[str, Callable[[Tensor], Tensor]] = F.relu, layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True,
                 device=None, dtype=None) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        check_dropout_p(dropout, "dropout")
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=batch_first,
                                            bias=bias, **factory_kwargs)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=batch_first,
                                                 bias=bias, **factory_kwargs)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory_kwargs)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory_kwargs)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs)
        self.norm3 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _activations.torch_function(activation)

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> Tensor:
        _check_batch(tgt, "tgt")
        _check_batch(memory, "memory")
        x = tgt
        if self.norm_first:
            h = apply_norm(self.norm1, x)
            a = self.dropout1(self._sa(h, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
            h, x = add_norm(self.norm2, a, x)
            a = self.dropout2(self._mha(h, memory, memory_mask, memory_key_padding_mask, memory_is_causal))
            h, x = add_norm(self.norm3, a, x)
            return x + self.dropout3(_feed_forward(self, h))
        a = self.dropout1(self._sa(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
        x = add_then_norm(self.norm1, a, x)
        a = self.dropout2(self._mha(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal))
        x = add_then_norm(self.norm2, a, x)
        f = self.dropout3(_feed_forward(self, x))
        return add_then_norm(self.norm3, f, x)

    def _sa(self, x, attn_mask, key_padding_mask, is_causal):
        return self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                              is_causal=is_causal, need_weights=False)[0]

    def _mha(self, x, mem, attn_mask, key_padding_mask, is_causal):
        return self.multihead_attn(x, mem, mem, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                   is_causal=is_causal, need_weights=False)[0]


def _get_clones(module, N):
    return nn.ModuleList([copy.deepcopy(module) for _ in range(N)])


def _seq_len(x, batch_first):
    if x.dim() == 2:
        return x.shape[0]
    return x.shape[1] if batch_first else x.shape[0]


class TransformerEncoder(nn.Module):
    """A stack of encoder layers (torch.nn.TransformerEncoder's interface).

    enable_nested_tensor and mask_check are accepted for compatibility and stored; they only
    steer torch's nested-tensor inference path, which tx_kernels does not use (see module doc).
    """
    __constants__ = ["norm"]

    def __init__(self, encoder_layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None,
                 enable_nested_tensor: bool = True, mask_check: bool = True) -> None:
        super().__init__()
        self.layers = _get_clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm
        self.enable_nested_tensor = enable_nested_tensor
        self.use_nested_tensor = False
        self.mask_check = mask_check

    def forward(self, src: Tensor, mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: Optional[bool] = None) -> Tensor:
        batch_first = getattr(getattr(self.layers[0], "self_attn", None), "batch_first", False)
        is_causal = detect_is_causal_mask(mask, is_causal, _seq_len(src, batch_first))
        packing = _packing(self.layers, src, mask, src_key_padding_mask, is_causal)
        if packing is not None:
            def run(x):
                for mod in self.layers:
                    x = mod._forward(x, None, packing, False)
                return self.norm(x) if self.norm is not None else x

            return _run_packed(src, packing, batch_first, run)
        output = src
        for mod in self.layers:
            output = mod(output, src_mask=mask, is_causal=is_causal, src_key_padding_mask=src_key_padding_mask)
        if self.norm is not None:
            output = self.norm(output)
        return output


class TransformerDecoder(nn.Module):
    __constants__ = ["norm"]

    def __init__(self, decoder_layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.layers = _get_clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: Optional[bool] = None,
                memory_is_causal: bool = False) -> Tensor:
        batch_first = getattr(getattr(self.layers[0], "self_attn", None), "batch_first", False)
        tgt_is_causal = detect_is_causal_mask(tgt_mask, tgt_is_causal, _seq_len(tgt, batch_first))
        output = tgt
        for mod in self.layers:
            output = mod(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                         tgt_key_padding_mask=tgt_key_padding_mask,
                         memory_key_padding_mask=memory_key_padding_mask,
                         tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)
        if self.norm is not None:
            output = self.norm(output)
        return output


class Transformer(nn.Module):
    """The encoder-decoder Transformer with torch.nn.Transformer's interface."""

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Union[str, Callable[[Tensor], Tensor]] = F.relu,
                 custom_encoder: Optional[Any] = None, custom_decoder: Optional[Any] = None,
                 layer_norm_eps: float = 1e-5, batch_first: bool = False, norm_first: bool = False,
                 bias: bool = True, device=None, dtype=None) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        if custom_encoder is not None:
            self.encoder = custom_encoder
        else:
            encoder_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                                    layer_norm_eps, batch_first, norm_first, bias,
                                                    **factory_kwargs)
            encoder_norm = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs)
            self.encoder = TransformerEncoder(encoder_layer, num_encoder_layers, encoder_norm)
        if custom_decoder is not None:
            self.decoder = custom_decoder
        else:
            decoder_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                                    layer_norm_eps, batch_first, norm_first, bias,
                                                    **factory_kwargs)
            decoder_norm = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs)
            self.decoder = TransformerDecoder(decoder_layer, num_decoder_layers, decoder_norm)
        self._reset_parameters()
        self.d_model = d_model
        self.nhead = nhead
        self.batch_first = batch_first

    def forward(self, src: Tensor, tgt: Tensor, src_mask: Optional[Tensor] = None,
                tgt_mask: Optional[Tensor] = None, memory_mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, src_is_causal: Optional[bool] = None,
                tgt_is_causal: Optional[bool] = None, memory_is_causal: bool = False) -> Tensor:
        is_batched = src.dim() == 3
        if is_batched and src.size(0 if self.batch_first else 1) != tgt.size(0 if self.batch_first else 1):
            raise RuntimeError("the batch number of src and tgt must be equal")
        if src.size(-1) != self.d_model or tgt.size(-1) != self.d_model:
            raise RuntimeError("the feature number of src and tgt must be equal to d_model")
        memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask,
                              is_causal=src_is_causal)
        return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask,
                            memory_key_padding_mask=memory_key_padding_mask,
                            tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)

    @staticmethod
    def generate_square_subsequent_mask(sz: int, device=None, dtype=None) -> Tensor:
        """Float mask with -inf above the diagonal (torch.nn's convention), as torch.nn.Transformer."""
        return nn.Transformer.generate_square_subsequent_mask(sz, device=device, dtype=dtype)

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                xavier_uniform_(p)
