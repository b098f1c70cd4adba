"""Padding-free Hugging Face BERT after tx_kernels.patch (see patching.py for the rest).

Two pieces:
- packed_attention_forward: the "tx_kernels" attention function's answer to transformers'
  packed-sequence convention (the one its flash-attention integrations and
  DataCollatorWithFlattening use): hidden states of shape (1, T, ...) holding several sequences
  back to back, described by the cu_seq_lens_q/k and max_length_q/k keyword arguments, which
  reach every attention call through the models' **kwargs. Runs attention_varlen.
- TxBertModel: a BertModel whose forward, given a padding mask with padding (CPU inputs), packs
  the real tokens once after the embeddings and runs HF's own encoder on them in that convention,
  so every GEMM, add+LayerNorm, bias+GELU and attention sees real tokens only; the pooler and
  last_hidden_state get the padded layout back, with 0 at padded positions (HF's padded path puts
  values there that no contract defines: padded queries attending to the real keys). Task heads
  (BertFor*) call their .bert, which is patched the same way. Anything it cannot do exactly
  (decoder/cross-attention, caches, output_hidden_states/attentions, inputs on CUDA, another
  attn_implementation, and left padding under a pooler, which reads position 0) runs HF's padded
  forward unchanged.
"""
import torch

from .. import varlen
from ..varlen import PackedBatch

ATTN_IMPL = "tx_kernels"


def packed_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             is_causal=None, **kwargs):
    """(1, H, T, E) packed query/key/value -> ((1, T, H, Ev) output, None)."""
    if query.shape[0] != 1:
        raise ValueError(f"tx_kernels: packed sequences (cu_seq_lens_q given) must come as a batch of 1, "
                         f"got query of shape {tuple(query.shape)}")
    if attention_mask is not None:
        raise ValueError("tx_kernels: an attention mask cannot be combined with packed sequences "
                         "(cu_seq_lens_q); the offsets already separate the sequences")
    cu_q = kwargs["cu_seq_lens_q"]
    cu_k = kwargs.get("cu_seq_lens_k", cu_q)
    max_q = kwargs.get("max_length_q")
    max_k = kwargs.get("max_length_k", max_q)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    as_offsets = lambda cu: cu.to(device="cpu", dtype=torch.int32)  # noqa: E731  (HF may pass them on the device)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, E) views
    out = varlen.attention_varlen(q, k, v, as_offsets(cu_q), as_offsets(cu_k), int(max_q), int(max_k),
                                  dropout_p=dropout, softmax_scale=scaling, causal=bool(causal))
    return out.unsqueeze(0), None


_PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _runs_padding_free(model, input_ids, inputs_embeds, attention_mask, kwargs):
    c = model.config
    x = input_ids if input_ids is not None else inputs_embeds
    if attention_mask is None or x is None or attention_mask.dim() != 2 or x.device.type != "cpu":
        return False
    if getattr(c, "_attn_implementation", None) != ATTN_IMPL or c.is_decoder:
        return False
    if any(kwargs.get(k) is not None for k in ("encoder_hidden_states", "past_key_values") + _PACKED_KWARGS):
        return False
    if kwargs.get("use_cache"):
        return False
    for flag in ("output_hidden_states", "output_attentions"):
        if kwargs.get(flag, getattr(c, flag, False)):
            return False
    real = attention_mask.bool()
    if model.pooler is not None and not bool(real[:, 0].all()):
        return False  # the pooler reads position 0: padding there (left padding) has HF's value
    return not bool(real.all())


def _keep_output_capturing(cls, base):
    """transformers >= 5 records output_hidden_states/attentions through a registry keyed on the
    model's class name, so the subclass must be registered like its base or those outputs vanish."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY as registry
    except ImportError:  # older transformers: outputs are returned by the modules themselves
        return
    if str(base) in registry:
        dict.__setitem__(registry, str(cls), dict.__getitem__(registry, str(base)))


def make_tx_bert_model(base):
    """The padding-free subclass of transformers' BertModel `base` (built lazily)."""

    class TxBertModel(base):
        def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                    inputs_embeds=None, **kwargs):
            _keep_output_capturing(type(self), base)
            if not _runs_padding_free(self, input_ids, inputs_embeds, attention_mask, kwargs):
                return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                       token_type_ids=token_type_ids, position_ids=position_ids,
                                       inputs_embeds=inputs_embeds, **kwargs)
            packing = PackedBatch(attention_mask)
            padded = {}

            def pack_embeddings(module, args, output):
                return packing.pack(output).unsqueeze(0)

            def pad_for_pooler(module, args):
                padded["x"] = packing.pad(args[0][0])
                return (padded["x"],)

            hooks = [self.embeddings.register_forward_hook(pack_embeddings)]
            if self.pooler is not None:
                hooks.append(self.pooler.register_forward_pre_hook(pad_for_pooler))
            try:
                out = super().forward(input_ids=input_ids, attention_mask=None, token_type_ids=token_type_ids,
                                      position_ids=position_ids, inputs_embeds=inputs_embeds,
                                      cu_seq_lens_q=packing.cu_seqlens, cu_seq_lens_k=packing.cu_seqlens,
                                      max_length_q=packing.max_seqlen, max_length_k=packing.max_seqlen,
                                      **kwargs)
            finally:
                for h in hooks:
                    h.remove()
            seq = padded["x"] if "x" in padded else packing.pad(out[0][0])
            if isinstance(out, tuple):
                return (seq,) + tuple(out[1:])
            out.last_hidden_state = seq
            return out

    TxBertModel.__name__ = TxBertModel.__qualname__ = "TxBertModel"
    return TxBertModel
