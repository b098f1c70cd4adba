"""BERT (post-LN, GELU) on tx_kernels, loadable from Hugging Face BertModel weights.

Each residual "LayerNorm(x + dropout(sublayer))" is one add_layer_norm; the embeddings' sum of
word + token-type + position embeddings feeds an add_layer_norm too. Q, K and V are one GEMM
(from_hf concatenates HF's query/key/value weights); the MLP is feed_forward.

attention_mask is HF's (N, S) 0/1 key mask. Difference from HF: a sequence whose mask is all 0
gives 0 attention outputs (HF's additive finfo.min mask spreads attention uniformly instead).

Padding-free (the default for CPU inputs with padding): the real tokens are packed once after the
embeddings, every GEMM, add+LayerNorm, bias+GELU and attention (attention_varlen) runs on them
only, and last_hidden_state is padded back with 0 at padded positions. HF's padded path computes
values there that depend on nothing the model promises (padded queries attending to the real
keys); no consumer may read them, so real-token outputs and mean pooling are the same either way.
The pooler reads position 0: when that is padding (left padding) the padded path runs instead.
"""
from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as TF
from .._activations import hf_kernel_name
from ..nn.normalization import LayerNorm, add_then_norm
from ..varlen import PackedBatch
from ._common import padding_mask_to_sdpa


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"tx_kernels: `hidden_size` ({self.hidden_size}) must be divisible by "
                             f"`num_attention_heads` ({self.num_attention_heads})")
        hf_kernel_name(self.hidden_act, "hidden_act")

    @classmethod
    def from_hf(cls, hf_config) -> "BertConfig":
        if getattr(hf_config, "is_decoder", False) or getattr(hf_config, "add_cross_attention", False):
            raise ValueError("tx_kernels: BERT as a decoder (`is_decoder`/`add_cross_attention`) is not supported")
        pet = getattr(hf_config, "position_embedding_type", "absolute")
        if pet not in (None, "absolute"):
            raise ValueError(f"tx_kernels: `position_embedding_type`={pet!r} is not supported (only 'absolute')")
        kw = {f.name: getattr(hf_config, f.name) for f in fields(cls) if getattr(hf_config, f.name, None) is not None}
        return cls(**kw)


@dataclass
class BertOutput:
    last_hidden_state: Tensor
    pooler_output: Optional[Tensor] = None

    def __getitem__(self, i):
        return (self.last_hidden_state, self.pooler_output)[i]


class BertEmbeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids=None, position_ids=None):
        N, S = input_ids.shape
        if S > self.position_embeddings.num_embeddings:
            raise ValueError(f"tx_kernels: sequence length {S} exceeds max_position_embeddings "
                             f"{self.position_embeddings.num_embeddings}")
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device).unsqueeze(0)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        pos = self.position_embeddings(position_ids).expand_as(x)
        return self.dropout(add_then_norm(self.LayerNorm, x, pos))


class _AddNorm(nn.Module):
    """dense -> dropout -> LayerNorm(. + residual): HF's BertSelfOutput / BertOutput."""

    def __init__(self, d_in, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, c.hidden_size)
        self.LayerNorm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)


class BertAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.num_heads, self.head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size)
        self.attn_pdrop = c.attention_probs_dropout_prob
        self.output = _AddNorm(c.hidden_size, c)

    def forward(self, x, mask):
        """x (N, S, E) with a bool key mask (or None), or packed real tokens (T, E) with their
        PackedBatch."""
        p = self.attn_pdrop if self.training else 0.0
        if isinstance(mask, PackedBatch):
            q, k, v = self.qkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
            a = mask.attention(q, k, v, dropout_p=p).reshape(x.shape)
        else:
            N, S, E = x.shape
            qkv = self.qkv(x).view(N, S, 3, self.num_heads, self.head_dim)
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
            a = TF.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
            a = a.transpose(1, 2).reshape(N, S, E)
        a = self.output.dropout(self.output.dense(a))
        return add_then_norm(self.output.LayerNorm, a, x)


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.output = _AddNorm(c.intermediate_size, c)
        self.act = hf_kernel_name(c.hidden_act, "hidden_act")

    def forward(self, x, mask):
        x = self.attention(x, mask)
        d1, d2 = self.intermediate.dense, self.output.dense
        f = self.output.dropout(TF.feed_forward(x, d1.weight, d1.bias, d2.weight, d2.bias, self.act))
        return add_then_norm(self.output.LayerNorm, f, x)


class BertModel(nn.Module):
    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.pooler = None
        if add_pooling_layer:
            self.pooler = nn.Module()
            self.pooler.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                padding_free: Optional[bool] = None) -> BertOutput:
        """padding_free: None (default) runs padding-free when attention_mask has padding, the
        inputs are on the CPU (attention_varlen's CUDA path has run on the emulator only, not yet
        on a GPU) and, with a pooler, no row starts with padding; True insists, False runs the
        padded path. See the module docstring for what padded positions hold."""
        if input_ids.dim() != 2:
            raise ValueError(f"tx_kernels: `input_ids` must be (batch, seq_len), got {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"tx_kernels: `attention_mask` shape {tuple(attention_mask.shape)} must equal "
                             f"`input_ids` shape {tuple(input_ids.shape)}")
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        if padding_free is None:
            real = attention_mask.bool() if attention_mask is not None else None
            padding_free = (real is not None and input_ids.device.type == "cpu" and not bool(real.all())
                            # the pooler reads position 0, whose padded value only the padded path has
                            and (self.pooler is None or bool(real[:, 0].all())))
        if padding_free:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            mask = PackedBatch(attention_mask)
            x = mask.pack(x)
        else:
            mask = padding_mask_to_sdpa(attention_mask)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        if padding_free:
            x = mask.pad(x)
        pooled = None
        if self.pooler is not None:
            pooled = torch.tanh(self.pooler.dense(x[:, 0]))
        return BertOutput(x, pooled)

    @classmethod
    def from_hf(cls, hf_model_or_state_dict, config=None) -> "BertModel":
        """From a transformers BertModel (or task head: its `bert` submodule is used), or a state_dict
        plus a config. Weights are copied (Q, K, V concatenated)."""
        if isinstance(hf_model_or_state_dict, nn.Module):
            m = hf_model_or_state_dict
            config = config if config is not None else m.config
            state = m.state_dict()
        else:
            state = dict(hf_model_or_state_dict)
            if config is None:
                raise ValueError("tx_kernels: pass `config` when loading BERT from a state_dict")
        if not isinstance(config, BertConfig):
            config = BertConfig.from_hf(config)
        if any(k.startswith("bert.") for k in state):
            state = {k[5:]: v for k, v in state.items() if k.startswith("bert.")}
        has_pooler = "pooler.dense.weight" in state
        model = cls(config, add_pooling_layer=has_pooler)
        model.load_state_dict(convert_hf_bert_state_dict(state, config), strict=True)
        return model


def convert_hf_bert_state_dict(state, config: BertConfig):
    out = {}
    for k, v in state.items():
        if k.startswith("embeddings.") and k.endswith(("position_ids", "token_type_ids")):
            continue  # HF buffers
        if ".attention.self." in k:
            continue  # handled below
        k = k.replace(".attention.output.", ".attention.output.")
        out[k] = v
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}.attention.self."
        for kind in ("weight", "bias"):
            out[f"encoder.layer.{i}.attention.qkv.{kind}"] = torch.cat(
                [state[p + f"{n}.{kind}"] for n in ("query", "key", "value")], dim=0)
    return out
