"""Double backward (a gradient of a gradient) is refused with a clear error at the second backward.

Before, the backward operators had no autograd kernel: torch's fallback only warned and the second
backward silently gave 0 (attention, add_layer_norm) or None (layer_norm, bias_gelu) where torch
gives nonzero values: a gradient penalty computed through tx_kernels was garbage.
"""
import pytest
import torch

import tx_kernels.functional as TF

torch.manual_seed(0)


def _attention(x):
    return TF.scaled_dot_product_attention(x, x * 0.5, x.flip(-2))


CASES = {
    "attention": (lambda x: _attention(x.reshape(1, 2, 16, 4)), (8, 16), "attention"),
    "layer_norm": (lambda x: TF.layer_norm(x, (16,)), (8, 16), "layer_norm"),
    "add_layer_norm": (lambda x: TF.add_layer_norm(x, 2 * x, (16,))[0], (8, 16), "layer_norm"),
    "add_layer_norm_post": (lambda x: TF.add_layer_norm(x, 2 * x, (16,), return_residual=False), (8, 16),
                            "layer_norm"),
    "bias_gelu": (lambda x: TF.bias_gelu(x, None), (8, 16), "bias_act"),
    "bias_relu": (lambda x: TF.bias_relu(x, torch.ones(16, dtype=x.dtype)), (8, 16), "bias_act"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_second_backward_raises(name):
    torch.manual_seed(0)
    fn, shape, op = CASES[name]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = fn(x)
    (g,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), x, create_graph=True)
    assert g.requires_grad, "the first-order gradient must stay connected to the graph"
    with pytest.raises(RuntimeError, match=f"double backward through {op}"):
        g.pow(2).sum().backward()


def test_first_order_grad_with_create_graph_still_correct():
    """create_graph=True alone (no second backward) is allowed and gives the usual gradient."""
    torch.manual_seed(1)
    x = torch.randn(8, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 16, dtype=torch.float64)
    (g,) = torch.autograd.grad((TF.layer_norm(x, (16,)) * w).sum(), x, create_graph=True)
    x2 = x.detach().requires_grad_()
    (ref,) = torch.autograd.grad((torch.nn.functional.layer_norm(x2, (16,)) * w).sum(), x2)
    torch.testing.assert_close(g.detach(), ref, rtol=1e-10, atol=1e-12)
