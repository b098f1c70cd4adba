"""tx_kernels: fused C++/CUDA kernels for Transformer layers, as PyTorch operators.

    import tx_kernels.functional as TF
    out = TF.scaled_dot_product_attention(q, k, v, is_causal=True)
    y, residual = TF.add_layer_norm(x, residual, (d,), weight, bias)

Operators live under torch.ops.tx_kernels (CPU and, in CUDA builds, CUDA kernels); tx_kernels.ops
registers their fake kernels and autograd formulas, so they work under torch.compile and backward.
"""
from . import ops  # noqa: F401  (loads the extension and registers fake kernels and autograd)
from . import functional  # noqa: F401
from . import nn  # noqa: F401
from .integrations import patch  # noqa: F401
from .integrations.patching import register_hf_attention_on_import as _register_hf_attention_on_import

# attn_implementation="tx_kernels" for Hugging Face models, as "flash_attention_2" is, without a
# patch() call; transformers itself is not imported here.
_register_hf_attention_on_import()

__version__ = "0.1.0"

__all__ = ["functional", "nn", "ops", "patch", "__version__"]
