"""Drop-in replacements for torch.nn Transformer modules, running on tx_kernels' fused operators.

Each module has the constructor arguments, defaults, forward signature and state_dict keys of its
torch.nn namesake, so ``load_state_dict(strict=True)`` works in both directions. See
tx_kernels/nn/transformer.py for the (documented) differences: fully masked query rows give 0
instead of NaN, no nested-tensor inference path, and a different dropout generator.
"""
from .activation import MultiheadAttention
from .normalization import LayerNorm
from .positional import PositionalEncoding
from .transformer import (Transformer, TransformerDecoder, TransformerDecoderLayer, TransformerEncoder,
                          TransformerEncoderLayer)

__all__ = ["LayerNorm", "MultiheadAttention", "PositionalEncoding", "Transformer", "TransformerDecoder",
           "TransformerDecoderLayer", "TransformerEncoder", "TransformerEncoderLayer"]
