"""GPT-2 on tx_kernels, loadable from Hugging Face GPT2LMHeadModel / GPT2Model weights.

Pre-LN blocks whose residual stream is carried by add_layer_norm's residual_out: the "x = x + a;
h = ln(x)" pairs (including the final ln_f) are single fused passes. Attention is causal through
the fused kernel; the MLP is feed_forward with the tanh GELU ("gelu_new").

Parameter names follow Hugging Face's (transformer.h.0.attn.c_attn.weight, ...), but weights use
nn.Linear's (out, in) layout: GPT-2's Conv1D stores them transposed, so `from_hf` transposes
c_attn, c_proj and c_fc.

KV cache (generate): keys/values live in preallocated (N, H, max_len, Dh) buffers; a step with
new tokens attends its queries to the cached prefix plus itself. is_causal is top-left aligned
(query i sees keys 0..i), which is only right when there is no cached prefix, so:
- prefill (no cache yet): is_causal=True;
- one new token: no mask (it may see every cached key);
- several new tokens after a prefix: an explicit bool mask (L, T), query i sees keys 0..T-L+i;
- padded prompts (attention_mask): a bool mask combining causality and the key padding.
"""
import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as TF
from .._activations import hf_kernel_name
from ..nn.normalization import LayerNorm, add_norm, add_then_norm, apply_norm


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"tx_kernels: `n_embd` ({self.n_embd}) must be divisible by `n_head` ({self.n_head})")
        hf_kernel_name(self.activation_function, "activation_function")

    @classmethod
    def from_hf(cls, hf_config) -> "GPT2Config":
        """From a transformers GPT2Config; refuses options this implementation does not have."""
        if getattr(hf_config, "add_cross_attention", False):
            raise ValueError("tx_kernels: GPT-2 with `add_cross_attention=True` is not supported")
        kw = {f.name: getattr(hf_config, f.name) for f in fields(cls) if hasattr(hf_config, f.name)}
        return cls(**kw)


class KVCache:
    """Preallocated per-layer key/value buffers of shape (N, H, max_len, Dh).

    dtype/device None (as generate() uses it): each layer's buffers are allocated at its first
    append, in the keys' dtype and device. The parameters do not tell that dtype: under autocast,
    or FSDP2 with bf16 compute over fp32 sharded parameters, the keys are bf16 while the weights
    the caller sees are fp32.
    """

    def __init__(self, n_layer, batch, n_head, max_len, head_dim, dtype=None, device=None):
        self.shape = (batch, n_head, max_len, head_dim)
        if dtype is None:
            self.keys, self.values = [None] * n_layer, [None] * n_layer
        else:
            self.keys = [torch.empty(self.shape, dtype=dtype, device=device) for _ in range(n_layer)]
            self.values = [torch.empty(self.shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.length = 0  # tokens already stored (same for every layer)
        self.max_len = max_len

    def append(self, layer, k, v):
        t, n = self.length, k.shape[2]
        if t + n > self.max_len:
            raise RuntimeError(f"tx_kernels: KV cache full ({t} + {n} > {self.max_len} tokens)")
        if self.keys[layer] is None:
            self.keys[layer] = k.new_empty(self.shape)
            self.values[layer] = v.new_empty(self.shape[:3] + v.shape[3:])
        self.keys[layer][:, :, t:t + n].copy_(k)
        self.values[layer][:, :, t:t + n].copy_(v)
        return self.keys[layer][:, :, :t + n], self.values[layer][:, :, :t + n]


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        E = config.n_embd
        self.n_head, self.head_dim, self.layer_idx = config.n_head, E // config.n_head, layer_idx
        self.c_attn = nn.Linear(E, 3 * E)
        self.c_proj = nn.Linear(E, E)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.scale = 1.0 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= float(layer_idx + 1)

    def forward(self, h, cache: Optional[KVCache] = None, attn_mask=None, is_causal=True):
        N, L, E = h.shape
        qkv = self.c_attn(h).view(N, L, 3, self.n_head, self.head_dim)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (N, H, L, Dh) strided views
        if cache is not None:
            k, v = cache.append(self.layer_idx, k, v)
        out = TF.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                              dropout_p=self.attn_pdrop if self.training else 0.0,
                                              is_causal=is_causal, scale=self.scale)
        out = out.transpose(1, 2).reshape(N, L, E)
        return self.resid_dropout(self.c_proj(out))


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, inner)
        self.c_proj = nn.Linear(inner, config.n_embd)
        self.act = hf_kernel_name(config.activation_function, "activation_function")
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, h):
        # HF applies its dropout after c_proj (not between the GEMMs), so the fused dropout is 0.
        y = TF.feed_forward(h, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias, self.act)
        return self.dropout(y)


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x, residual, cache=None, attn_mask=None, is_causal=True):
        """x: the previous block's MLP output (or the embeddings, with residual=None).

        Returns (mlp_out, residual) with the residual stream not yet updated by mlp_out: the next
        block (or ln_f) adds it inside its fused add_layer_norm.
        """
        if residual is None:
            residual = x
            h = apply_norm(self.ln_1, x)
        else:
            h, residual = add_norm(self.ln_1, x, residual)
        a = self.attn(h, cache, attn_mask, is_causal)
        h, residual = add_norm(self.ln_2, a, residual)
        return self.mlp(h), residual


class GPT2Model(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.n_layer))
        self.ln_f = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        # GPT-2's initialization (normal(0, 0.02), zero biases); HF additionally rescales c_proj,
        # which matters little at the sizes trained here.
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, input_ids: Tensor, past_key_values: Optional[KVCache] = None,
                attention_mask: Optional[Tensor] = None, position_ids: Optional[Tensor] = None) -> Tensor:
        """Last hidden state (N, L, E).

        attention_mask: optional (N, T) 0/1 over all T = cached + new tokens (1 = real token).
        past_key_values: a KVCache, appended to in place (its length is advanced here).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"tx_kernels: `input_ids` must be (batch, seq_len), got {tuple(input_ids.shape)}")
        N, L = input_ids.shape
        past = past_key_values.length if past_key_values is not None else 0
        T = past + L
        if T > self.config.n_positions and position_ids is None:
            raise ValueError(f"tx_kernels: sequence of {T} tokens exceeds n_positions={self.config.n_positions}")
        if attention_mask is not None and tuple(attention_mask.shape) != (N, T):
            raise ValueError(f"tx_kernels: `attention_mask` must have shape {(N, T)} (cached + new tokens), "
                             f"got {tuple(attention_mask.shape)}")
        if position_ids is None:
            # As Hugging Face's forward: positions 0.. regardless of padding (generate() passes
            # padding-aware positions itself).
            position_ids = torch.arange(past, T, device=input_ids.device).unsqueeze(0)
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))

        attn_mask, is_causal = None, False
        if attention_mask is not None:
            allowed = torch.ones(L, T, dtype=torch.bool, device=x.device).tril(past)
            attn_mask = allowed[None, None] & attention_mask.bool()[:, None, None, :]
        elif past == 0:
            is_causal = True
        elif L > 1:
            attn_mask = torch.ones(L, T, dtype=torch.bool, device=x.device).tril(past)
        residual = None
        for block in self.h:
            x, residual = block(x, residual, past_key_values, attn_mask, is_causal)
        out = add_then_norm(self.ln_f, x, residual)
        if past_key_values is not None:
            past_key_values.length = T
        return out


class GPT2LMHeadModel(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=0.02)

    def forward(self, input_ids, labels=None, past_key_values=None, attention_mask=None, position_ids=None):
        """Logits (N, L, V); with labels, (loss, logits) where loss is HF's shifted cross-entropy
        (labels equal to -100 are ignored)."""
        h = self.transformer(input_ids, past_key_values, attention_mask, position_ids)
        logits = self.lm_head(h)
        if labels is None:
            return logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               labels[:, 1:].reshape(-1), ignore_index=-100)
        return loss, logits

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: Optional[int] = None, attention_mask: Optional[Tensor] = None,
                 eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Greedy (default) or sampled continuation with a KV cache; returns prompt + new tokens.

        attention_mask (N, L) marks real prompt tokens (use left padding for batches of unequal
        prompts, as with Hugging Face). After eos_token_id a sequence continues with pad_token_id
        (default: eos) and generation stops once every sequence has finished.
        """
        if max_new_tokens < 0:
            raise ValueError(f"tx_kernels: `max_new_tokens` must be >= 0, got {max_new_tokens}")
        if do_sample and not temperature > 0:
            raise ValueError(f"tx_kernels: `temperature` must be > 0 when sampling, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"tx_kernels: `top_k` must be >= 1, got {top_k}")
        was_training = self.training
        self.eval()
        N, L = input_ids.shape
        cfg = self.config
        cache = KVCache(cfg.n_layer, N, cfg.n_head, L + max_new_tokens, cfg.n_embd // cfg.n_head)
        tokens, step_ids = input_ids, input_ids
        mask = attention_mask
        finished = torch.zeros(N, dtype=torch.bool, device=input_ids.device)
        pad = pad_token_id if pad_token_id is not None else eos_token_id
        try:
            for _ in range(max_new_tokens):
                pos = None
                if mask is not None:
                    # As Hugging Face's generate: positions count real tokens, so left padding does
                    # not shift them.
                    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, cache.length:]
                logits = self(step_ids, past_key_values=cache, attention_mask=mask,
                              position_ids=pos)[:, -1].float()
                if do_sample:
                    logits = logits / temperature
                    if top_k is not None and top_k < logits.shape[-1]:
                        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
                else:
                    nxt = logits.argmax(-1)
                if eos_token_id is not None:
                    nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
                    finished |= nxt == eos_token_id
                tokens = torch.cat([tokens, nxt[:, None]], dim=1)
                step_ids = nxt[:, None]
                if mask is not None:
                    mask = torch.cat([mask, mask.new_ones(N, 1)], dim=1)
                if eos_token_id is not None and bool(finished.all()):
                    break
        finally:
            self.train(was_training)
        return tokens

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model_or_state_dict, config=None) -> "GPT2LMHeadModel":
        """Build from a transformers GPT2LMHeadModel/GPT2Model instance, or its state_dict plus a config
        (a transformers GPT2Config or a tx_kernels GPT2Config). Weights are copied."""
        if isinstance(hf_model_or_state_dict, nn.Module):
            config = config if config is not None else hf_model_or_state_dict.config
            state = hf_model_or_state_dict.state_dict()
        else:
            state = dict(hf_model_or_state_dict)
            if config is None:
                raise ValueError("tx_kernels: pass `config` when loading GPT-2 from a state_dict")
        if not isinstance(config, GPT2Config):
            config = GPT2Config.from_hf(config)
        model = cls(config)
        model.load_state_dict(convert_hf_gpt2_state_dict(state, config), strict=True)
        return model


_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def convert_hf_gpt2_state_dict(state, config: GPT2Config):
    """HF GPT-2 keys/layout -> this module's (Conv1D weights transposed, buffers dropped)."""
    out = {}
    for k, v in state.items():
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue  # causal-mask buffers of older transformers versions
        if not k.startswith("transformer.") and not k.startswith("lm_head."):
            k = "transformer." + k  # a bare GPT2Model state_dict
        if k.endswith(_CONV1D):
            v = v.t()
        out[k] = v.contiguous()
    if "lm_head.weight" not in out or config.tie_word_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out
