"""LayerNorm on the tx_kernels kernel."""
from torch import Tensor, nn

from .. import functional as TF


class LayerNorm(nn.LayerNorm):
    """Drop-in torch.nn.LayerNorm (a subclass: same constructor, parameters and state_dict keys)."""

    def forward(self, input: Tensor) -> Tensor:
        return TF.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


def add_norm(norm: nn.Module, x: Tensor, residual: Tensor):
    """(norm(x + residual), x + residual), fused when `norm` is a (torch or tx_kernels) LayerNorm."""
    if isinstance(norm, nn.LayerNorm):
        return TF.add_layer_norm(x, residual, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    s = x + residual
    return norm(s), s


def add_then_norm(norm: nn.Module, x: Tensor, residual: Tensor) -> Tensor:
    """norm(x + residual) alone (post-LN): fused without writing the sum when `norm` is a LayerNorm."""
    if isinstance(norm, nn.LayerNorm):
        return TF.add_layer_norm(x, residual, norm.normalized_shape, norm.weight, norm.bias, norm.eps,
                                 return_residual=False)
    return norm(x + residual)


def apply_norm(norm: nn.Module, x: Tensor) -> Tensor:
    if isinstance(norm, nn.LayerNorm):
        return TF.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return norm(x)
