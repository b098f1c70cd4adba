"""Transformer models on tx_kernels: the original seq2seq Transformer, BERT and GPT-2."""
from .bert import BertConfig, BertModel
from .gpt2 import GPT2Config, GPT2LMHeadModel, GPT2Model, KVCache
from .transformer import Seq2SeqTransformer

__all__ = ["BertConfig", "BertModel", "GPT2Config", "GPT2LMHeadModel", "GPT2Model", "KVCache",
           "Seq2SeqTransformer"]
