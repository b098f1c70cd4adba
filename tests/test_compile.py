"""torch.compile(fullgraph=True) with the default (inductor) backend over a block using every op.

Per-op compile tests use the cheaper aot_eager backend; this one checks that the real compiler
stack traces the whole functional API, forward and backward, with no graph break.
"""
import torch

import tx_kernels.functional as TF


def _block(x, residual, ln_w, ln_b, w1, b1, w2, b2, mask):
    h, residual = TF.add_layer_norm(x, residual, (x.shape[-1],), ln_w, ln_b)
    N, L, D = h.shape
    q = k = v = h.view(N, L, 2, D // 2).transpose(1, 2)  # a (N, L, H, E) view, no copy
    a = TF.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    a = a.transpose(1, 2).reshape(N, L, D)
    y = TF.feed_forward(TF.layer_norm(a, (D,), ln_w, ln_b), w1, b1, w2, b2, activation="gelu_tanh")
    return (y + TF.bias_gelu(a, b2) + TF.bias_relu(a, b2) + residual).square().mean()


def test_inductor_fullgraph_forward_and_backward():
    torch.manual_seed(0)
    D, F_ = 16, 32
    params = [torch.ones(D) + 0.1 * torch.randn(D), 0.1 * torch.randn(D), torch.randn(F_, D) / 4,
              torch.randn(F_) / 4, torch.randn(D, F_) / 4, torch.randn(D) / 4]
    params = [p.requires_grad_() for p in params]
    x, r = torch.randn(2, 7, D, requires_grad=True), torch.randn(2, 7, D)
    mask = torch.randn(7, 7)
    compiled = torch.compile(_block, fullgraph=True)
    loss = compiled(x, r, *params, mask)
    grads = torch.autograd.grad(loss, [x, *params])
    loss_ref = _block(x, r, *params, mask)
    grads_ref = torch.autograd.grad(loss_ref, [x, *params])
    torch.testing.assert_close(loss, loss_ref)
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-5)
