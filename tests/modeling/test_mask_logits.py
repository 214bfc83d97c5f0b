"""The mask-logit product's row-sparse backward equals a plain bmm's gradients."""

from __future__ import annotations

import pytest
import torch

from gdseg.modeling.transformer_decoder import mask_logits


def _grads(fn, embed, features, grad_out):
    e = embed.clone().requires_grad_()
    f = features.clone().requires_grad_()
    out = fn(e, f)
    out.backward(grad_out)
    return out.detach(), e.grad, f.grad


@pytest.mark.parametrize("live_rows", [0, 1, 3, 12])  # 12 of 2 x 6 rows: dense fallback
def test_sparse_rows_backward_equals_bmm(live_rows):
    torch.manual_seed(0)
    embed, features = torch.randn(2, 6, 8), torch.randn(2, 8, 40)
    grad_out = torch.zeros(2, 6, 40)
    rows = torch.randperm(12)[:live_rows]
    grad_out.view(12, 40)[rows] = torch.randn(live_rows, 40)
    ours = _grads(mask_logits, embed, features, grad_out)
    ref = _grads(torch.bmm, embed, features, grad_out)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_only_one_input_requires_grad_and_no_grad():
    torch.manual_seed(0)
    embed, features = torch.randn(1, 4, 8, requires_grad=True), torch.randn(1, 8, 10)
    out = mask_logits(embed, features)
    out[:, :2].sum().backward()
    torch.testing.assert_close(embed.grad[0, :2], features[0].sum(1).expand(2, -1))
    assert embed.grad[0, 2:].abs().sum() == 0
    with torch.no_grad():
        assert not mask_logits(embed, features).requires_grad


def test_bf16_autocast():
    torch.manual_seed(0)
    embed = torch.randn(2, 4, 8, requires_grad=True)
    features = torch.randn(2, 8, 10, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mask_logits(embed.bfloat16(), features.bfloat16())
    assert out.dtype == torch.bfloat16
    out[:, 1].float().sum().backward()
    assert embed.grad.dtype == features.grad.dtype == torch.float32
    assert embed.grad[:, 1].abs().sum() > 0 and embed.grad[:, 0].abs().sum() == 0
