"""tx_kernels.patch(model): run an existing torch.nn / Hugging Face model on tx_kernels, in place.

What is patched, and how (every replacement keeps the module object and its Parameter objects:
the module's class is swapped for a tx_kernels subclass or look-alike, so optimizers, tied
weights, hooks and state_dicts are untouched):

torch.nn (any model): Transformer, TransformerEncoder/Decoder(+Layer), MultiheadAttention and the
LayerNorms inside them become their tx_kernels.nn counterparts (same attributes; encoders stop
using torch's nested-tensor path).

Any Hugging Face model whose attention goes through transformers' AttentionInterface (Llama,
Qwen2, Mistral, ... as well as GPT-2 and BERT): `import tx_kernels` registers
attn_implementation="tx_kernels" (as soon as transformers' modeling code is loaded), so
`from_pretrained(..., attn_implementation="tx_kernels")` and
`model.set_attn_implementation("tx_kernels")` run softmax(QK^T)V on the fused kernel (GQA
included). patch() goes further for two families:

Hugging Face GPT-2 (GPT2Model, GPT2LMHeadModel and the other GPT2PreTrainedModel heads) and
BERT (BertModel and its task heads):
- attention: a "tx_kernels" function is registered in transformers' AttentionInterface (with
  sdpa's mask builder in AttentionMaskInterface) and selected with set_attn_implementation. HF
  keeps doing the projections, the cache updates (DynamicCache/StaticCache/EncoderDecoderCache)
  and the mask building; only softmax(QK^T)V moves to the fused kernel. This is the public,
  versioned extension point of transformers >= 4.48 (masks: >= 4.53), so it survives the
  frequent rewrites of the modeling files; replacing GPT2Attention/BertSelfAttention forwards
  would have to reimplement HF's cache handling for each version.
- every nn.LayerNorm -> tx_kernels.nn.LayerNorm;
- GPT2MLP -> feed_forward (Conv1D weights read transposed, as views: no copies);
- BertSelfOutput / BertOutput -> dense, dropout, then add_layer_norm (residual add + LN fused);
  BertIntermediate -> GEMM + fused bias/GELU;
- BertModel (alone or as the .bert of a task head) -> padding-free: given a padding mask with
  padding, the real tokens are packed once after the embeddings and HF's encoder runs on them in
  transformers' packed-sequence convention (cu_seq_lens_q/k kwargs, which the "tx_kernels"
  attention function answers with attention_varlen); 0 at padded positions of last_hidden_state
  (padding_free.py says why and when it falls back to the padded forward).
A model that is not itself a Hugging Face model (e.g. a sentence-transformers SentenceTransformer)
has the Hugging Face models inside it patched.
GPT-2's residual adds stay in HF's GPT2Block.forward (fusing them means replacing the block's
forward, whose signature changes between transformers releases).

Supported: transformers 4.53 - 5.x (tested: 5.23.0). On older versions, or for modules whose
forward signature is not the one expected, the module is left alone and reported. Other
architectures are left alone (their torch.nn Transformer modules, if any, are still patched).
The report is returned by patch(model, return_report=True), stored as model.tx_kernels_patch_report,
and everything left alone is also announced with a warning.

Numerical differences: fully masked query rows (e.g. left-padding positions) give 0 instead of
HF's values, and padding-free BERT gives 0 at every padded position; outputs at real tokens are
unaffected.
"""
import importlib.abc
import importlib.util
import inspect
import sys
import warnings
from dataclasses import dataclass, field
from typing import List, NamedTuple, Tuple

import torch.nn.functional as F
from torch import nn

from .. import _activations
from .. import functional as TF
from .. import nn as tnn
from ..nn.normalization import add_then_norm
from .padding_free import ATTN_IMPL, make_tx_bert_model, packed_attention_forward


@dataclass
class PatchReport:
    patched: List[str] = field(default_factory=list)
    left_alone: List[Tuple[str, str]] = field(default_factory=list)

    def __str__(self):
        lines = [f"tx_kernels.patch: {len(self.patched)} modules patched"]
        lines += [f"  left alone: {name or '<model>'}: {why}" for name, why in self.left_alone]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# torch.nn
# ------------------------------------------------------------------------------------------------
_TORCH_NN = {
    nn.Transformer: tnn.Transformer,
    nn.TransformerEncoder: tnn.TransformerEncoder,
    nn.TransformerDecoder: tnn.TransformerDecoder,
    nn.TransformerEncoderLayer: tnn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer: tnn.TransformerDecoderLayer,
    nn.MultiheadAttention: tnn.MultiheadAttention,
}


def _swap(module, cls):
    module.__class__ = cls
    if isinstance(module, tnn.TransformerEncoder):
        module.use_nested_tensor = False


def _patch_torch_nn(model, report):
    for name, m in model.named_modules():
        cls = _TORCH_NN.get(type(m))
        if cls is not None:
            _swap(m, cls)
            report.patched.append(f"{name or '<model>'} ({type(m).__name__})")
            for sub_name, sub in m.named_modules(prefix=name):
                if type(sub) is nn.LayerNorm:
                    _swap(sub, tnn.LayerNorm)
                    report.patched.append(f"{sub_name} (LayerNorm)")


# ------------------------------------------------------------------------------------------------
# Hugging Face
# ------------------------------------------------------------------------------------------------
def _tx_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                          is_causal=None, **kwargs):
    """transformers attention-interface function: (N, H, L, E) inputs -> ((N, L, H, E) output, None)."""
    if kwargs.get("output_attentions", False):
        warnings.warn("tx_kernels attention does not return attention weights (output_attentions=True); "
                      "set_attn_implementation('eager') for them", stacklevel=2)
    if kwargs.get("cache") is not None:
        raise NotImplementedError("tx_kernels: transformers' paged attention cache is not supported")
    # Refused rather than ignored: now that every AttentionInterface model can select this
    # function, one passing attention sinks (gpt-oss), a T5 position bias or a logit softcap
    # (Gemma 2) would otherwise get silently wrong attention.
    for arg in ("position_bias", "softcap", "s_aux"):
        if kwargs.get(arg) is not None:
            raise NotImplementedError(f"tx_kernels: the `{arg}` attention argument is not supported; "
                                      f"use attn_implementation='eager' for this model")
    if kwargs.get("cu_seq_lens_q") is not None:  # packed sequences (padding-free BERT, HF collators)
        return packed_attention_forward(module, query, key, value, attention_mask, dropout, scaling,
                                        is_causal, **kwargs)
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As transformers' sdpa integration: the flag only when no mask was built and L > 1.
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and kv_len > q_len:
        # Prefill into an empty static cache: the keys past q_len are unused slots.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    enable_gqa = query.shape[1] != key.shape[1]
    out = TF.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                          is_causal=is_causal, scale=scaling, enable_gqa=enable_gqa)
    return out.transpose(1, 2).contiguous(), None


def _register_hf_attention():
    """Register the attention (and mask) function; returns an error string or None."""
    try:
        from transformers import AttentionInterface
    except ImportError:
        return "this transformers version has no AttentionInterface (needs >= 4.48)"
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return "this transformers version has no AttentionMaskInterface (needs >= 4.53)"
    AttentionInterface.register(ATTN_IMPL, _tx_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)  # bool masks, True = attend (as our kernel)
    return None


_HF_ATTENTION_MODULE = "transformers.modeling_utils"  # defines AttentionInterface


class _RegisterWhenTransformersLoads(importlib.abc.MetaPathFinder):
    """Registers the attention function right after transformers.modeling_utils has run, so that
    `import tx_kernels` makes attn_implementation="tx_kernels" available without importing
    transformers itself (that would add about 2 s to every import, with or without HF)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _HF_ATTENTION_MODULE:
            return None
        sys.meta_path.remove(self)  # one shot, and the lookup below must not find this finder again
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                _register_hf_attention_quietly()

            # On the loader instance (one per file), so the module keeps its real loader for
            # tracebacks, inspect and resources.
            spec.loader.exec_module = exec_then_register
        return spec


def _register_hf_attention_quietly():
    # A transformers too old for the interfaces is not an error here: only users who ask for
    # tx_kernels attention need them, and patch() reports it to those.
    try:
        _register_hf_attention()
    except Exception as e:  # noqa: BLE001  (must never break importing transformers)
        warnings.warn(f"tx_kernels: could not register attn_implementation='{ATTN_IMPL}': "
                      f"{type(e).__name__}: {e}", stacklevel=2)


def register_hf_attention_on_import():
    """Make attn_implementation="tx_kernels" known to transformers: now if transformers' modeling
    code is loaded, else as soon as it is. Called by `import tx_kernels`."""
    if _HF_ATTENTION_MODULE in sys.modules:
        _register_hf_attention_quietly()
    elif importlib.util.find_spec("transformers") is not None:
        if not any(isinstance(f, _RegisterWhenTransformersLoads) for f in sys.meta_path):
            sys.meta_path.insert(0, _RegisterWhenTransformersLoads())


def _params(fn):
    return [p for p in inspect.signature(fn).parameters if p != "self"]


class _HFEntry(NamedTuple):
    cls: type  # the tx_kernels subclass the HF module's class is swapped for
    forward_args: List[str]  # the HF forward's parameters it was written against
    attrs: Tuple[str, ...]  # the submodules it reads
    fused_activation: bool  # runs the config's activation in bias_act (read into m._tx_act)


def _make_hf_classes():
    """HF module class -> _HFEntry of its tx_kernels subclass (built lazily: transformers is
    optional; built once, see _hf_classes)."""
    from transformers.models.bert import modeling_bert as mb
    from transformers.models.gpt2 import modeling_gpt2 as mg

    class TxGPT2MLP(mg.GPT2MLP):
        def forward(self, hidden_states):
            # Conv1D keeps weights as (in, out); .t() gives F.linear's (out, in) as a view.
            y = TF.feed_forward(hidden_states, self.c_fc.weight.t(), self.c_fc.bias, self.c_proj.weight.t(),
                                self.c_proj.bias, self._tx_act)
            return self.dropout(y)

    class TxBertIntermediate(mb.BertIntermediate):
        def forward(self, hidden_states):
            return TF.bias_act(F.linear(hidden_states, self.dense.weight), self.dense.bias, self._tx_act)

    def _add_ln_forward(self, hidden_states, input_tensor):
        return add_then_norm(self.LayerNorm, self.dropout(self.dense(hidden_states)), input_tensor)

    class TxBertSelfOutput(mb.BertSelfOutput):
        forward = _add_ln_forward

    class TxBertOutput(mb.BertOutput):
        forward = _add_ln_forward

    TxBertModel = make_tx_bert_model(mb.BertModel)
    # Pickling finds a class by module and qualified name: these must be module attributes (see
    # __getattr__ below), not the locals of this function.
    for cls in (TxBertModel, TxGPT2MLP, TxBertIntermediate, TxBertSelfOutput, TxBertOutput):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
    bert_model_args = ["input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds",
                       "encoder_hidden_states", "encoder_attention_mask", "past_key_values", "use_cache",
                       "kwargs"]
    add_ln = (["hidden_states", "input_tensor"], ("dense", "LayerNorm", "dropout"))
    return {
        mb.BertModel: _HFEntry(TxBertModel, bert_model_args, ("embeddings", "encoder", "pooler"), False),
        mg.GPT2MLP: _HFEntry(TxGPT2MLP, ["hidden_states"], ("c_fc", "c_proj", "dropout"), True),
        mb.BertIntermediate: _HFEntry(TxBertIntermediate, ["hidden_states"], ("dense",), True),
        mb.BertSelfOutput: _HFEntry(TxBertSelfOutput, *add_ln, False),
        mb.BertOutput: _HFEntry(TxBertOutput, *add_ln, False),
    }


# Built on first use and kept: a patched module's class must be the same object in every model
# (isinstance checks, pickling by qualified name, and no new class per patch() call).
_HF_CLASSES = None
# What __getattr__ answers without importing transformers for every unknown attribute.
_HF_CLASS_NAMES = ("TxBertModel", "TxGPT2MLP", "TxBertIntermediate", "TxBertSelfOutput", "TxBertOutput")


def _hf_classes():
    global _HF_CLASSES
    if _HF_CLASSES is None:
        _HF_CLASSES = _make_hf_classes()
        assert sorted(e.cls.__name__ for e in _HF_CLASSES.values()) == sorted(_HF_CLASS_NAMES)
    return _HF_CLASSES


def __getattr__(name):
    # Unpickling a patched model (possibly in a fresh process) looks its classes up here. The
    # model's config still selects the "tx_kernels" attention, so it is registered again too.
    if name in _HF_CLASS_NAMES:
        _register_hf_attention()
        return next(e.cls for e in _hf_classes().values() if e.cls.__name__ == name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _hf_family(model):
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None, None
    if not isinstance(model, PreTrainedModel):
        return None, None
    try:
        from transformers.models.bert.modeling_bert import BertPreTrainedModel
        from transformers.models.gpt2.modeling_gpt2 import GPT2PreTrainedModel
    except ImportError:
        return "unsupported", None
    if isinstance(model, GPT2PreTrainedModel):
        return "gpt2", getattr(model.config, "activation_function", None)
    if isinstance(model, BertPreTrainedModel):
        return "bert", getattr(model.config, "hidden_act", None)
    return "unsupported", None


def _patch_hf(model, family, act_name, report):
    import transformers

    err = _register_hf_attention()
    if err is None:
        try:
            model.set_attn_implementation(ATTN_IMPL)
            if model.config._attn_implementation != ATTN_IMPL:
                err = f"set_attn_implementation kept {model.config._attn_implementation!r}"
        except Exception as e:  # noqa: BLE001  (any refusal is reported, not fatal)
            err = f"set_attn_implementation('{ATTN_IMPL}') failed: {e}"
    if err is None:
        report.patched.append(f"attention ({family}: attn_implementation='{ATTN_IMPL}')")
    else:
        report.left_alone.append(("attention", f"{err} (transformers {transformers.__version__})"))

    tx_act = _activations.HF.get(act_name) if isinstance(act_name, str) else None
    classes = _hf_classes()
    for name, m in model.named_modules():
        if type(m) is nn.LayerNorm:
            _swap(m, tnn.LayerNorm)
            report.patched.append(f"{name} (LayerNorm)")
            continue
        entry = classes.get(type(m))
        if entry is None:
            continue
        if _params(type(m).forward) != entry.forward_args or not all(hasattr(m, a) for a in entry.attrs):
            report.left_alone.append((name, f"{type(m).__name__} has an unexpected forward/attributes in "
                                            f"transformers {transformers.__version__}"))
            continue
        if entry.fused_activation:
            if tx_act is None:
                report.left_alone.append((name, f"activation {act_name!r} has no fused kernel"))
                continue
            m._tx_act = tx_act
        _swap(m, entry.cls)
        report.patched.append(f"{name} ({type(m).__mro__[1].__name__})")


def _patch_hf_inside(model, report):
    """Patches the outermost Hugging Face models inside a wrapper (e.g. sentence-transformers)."""
    inside = []
    for name, m in model.named_modules():
        if name and not any(name.startswith(outer + ".") for outer in inside):
            family, act = _hf_family(m)
            if family is None:
                continue
            inside.append(name)
            if family in ("gpt2", "bert"):
                report.patched.append(f"{name} ({type(m).__name__}, inside {type(model).__name__}):")
                _patch_hf(m, family, act, report)
            else:
                report.left_alone.append((name, f"{type(m).__name__}: only Hugging Face GPT-2 and BERT "
                                                f"models are patched"))


def patch(model: nn.Module, return_report: bool = False, warn: bool = True):
    """Make `model` run on tx_kernels, in place (see the module docstring). Returns the model, or
    (model, PatchReport) with return_report=True. Parameters are shared, never copied."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"tx_kernels.patch: `model` must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    family, act = _hf_family(model)
    if family in ("gpt2", "bert"):
        _patch_hf(model, family, act, report)
    elif family == "unsupported":
        report.left_alone.append(("", f"{type(model).__name__}: only Hugging Face GPT-2 and BERT models are "
                                      f"patched (torch.nn Transformer modules inside are still patched); "
                                      f"its attention can run on tx_kernels with "
                                      f"model.set_attn_implementation('{ATTN_IMPL}')"))
    else:
        _patch_hf_inside(model, report)
    _patch_torch_nn(model, report)
    if not report.patched and not report.left_alone:
        report.left_alone.append(("", f"{type(model).__name__}: nothing tx_kernels can patch was found"))
    model.tx_kernels_patch_report = report
    if warn and report.left_alone:
        warnings.warn(str(report), stacklevel=2)
    return (model, report) if return_report else model
