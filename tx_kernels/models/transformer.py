"""The original encoder-decoder Transformer (Vaswani et al., 2017) for sequence-to-sequence tasks.

Token embeddings scaled by sqrt(d_model), sinusoidal positions, post-LN layers with ReLU
(tx_kernels.nn.Transformer), and a generator (output projection to target-vocabulary logits).
Inputs are batch-first (N, L) token ids.
"""
import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..nn import PositionalEncoding, Transformer


class Seq2SeqTransformer(nn.Module):
    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, d_model: int = 512, nhead: int = 8,
                 num_encoder_layers: int = 6, num_decoder_layers: int = 6, dim_feedforward: int = 2048,
                 dropout: float = 0.1, max_len: int = 5000, pad_idx: Optional[int] = None):
        super().__init__()
        self.d_model, self.pad_idx = d_model, pad_idx
        self.src_tok_emb = nn.Embedding(src_vocab_size, d_model, padding_idx=pad_idx)
        self.tgt_tok_emb = nn.Embedding(tgt_vocab_size, d_model, padding_idx=pad_idx)
        self.positional_encoding = PositionalEncoding(d_model, dropout, max_len, batch_first=True)
        self.transformer = Transformer(d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward,
                                       dropout, activation="relu", batch_first=True, norm_first=False)
        self.generator = nn.Linear(d_model, tgt_vocab_size)

    def _padding(self, ids, given):
        if given is not None or self.pad_idx is None:
            return given
        return ids == self.pad_idx  # torch.nn convention: True = padding

    def encode(self, src: Tensor, src_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        x = self.positional_encoding(self.src_tok_emb(src) * math.sqrt(self.d_model))
        return self.transformer.encoder(x, src_key_padding_mask=self._padding(src, src_key_padding_mask))

    def decode(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Optional[Tensor] = None,
               tgt_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        y = self.positional_encoding(self.tgt_tok_emb(tgt) * math.sqrt(self.d_model))
        # Causal self-attention through the kernel's flag: no (L, L) mask is built.
        return self.transformer.decoder(y, memory, tgt_is_causal=True,
                                        tgt_key_padding_mask=self._padding(tgt, tgt_key_padding_mask),
                                        memory_key_padding_mask=memory_key_padding_mask)

    def forward(self, src: Tensor, tgt: Tensor, src_key_padding_mask: Optional[Tensor] = None,
                tgt_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """Logits (N, T, tgt_vocab) for teacher-forced decoding of `tgt` (usually BOS + target[:-1])."""
        src_pad = self._padding(src, src_key_padding_mask)
        memory = self.encode(src, src_pad)
        return self.generator(self.decode(tgt, memory, src_pad, tgt_key_padding_mask))

    @torch.no_grad()
    def greedy_decode(self, src: Tensor, max_len: int, bos_idx: int, eos_idx: Optional[int] = None,
                      src_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """Greedy decoding; returns (N, <= max_len + 1) ids starting with BOS. Sequences that
        produced EOS keep emitting EOS until all are done."""
        was_training = self.training
        self.eval()
        try:
            src_pad = self._padding(src, src_key_padding_mask)
            memory = self.encode(src, src_pad)
            ys = torch.full((src.shape[0], 1), bos_idx, dtype=torch.long, device=src.device)
            done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
            for _ in range(max_len):
                logits = self.generator(self.decode(ys, memory, src_pad)[:, -1])
                nxt = logits.argmax(-1)
                if eos_idx is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos_idx), nxt)
                    done |= nxt == eos_idx
                ys = torch.cat([ys, nxt[:, None]], dim=1)
                if eos_idx is not None and bool(done.all()):
                    break
            return ys
        finally:
            self.train(was_training)
