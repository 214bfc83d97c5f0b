import math

import pytest
import torch
import torch.nn.functional as F

from gdseg.modeling.ms_deform_attn import (
    MSDeformAttn,
    ms_deform_attn_core,
    ms_deform_attn_gather,
    ms_deform_attn_grid_sample,
)

SHAPES = [(9, 7), (5, 4), (3, 2)]


def reference(value, shapes, locations, weights):
    """Straightforward Deformable DETR sampling: grid_sample per level, then weighted sum."""
    B, _, H, D = value.shape
    _, Lq, _, L, P, _ = locations.shape
    out = torch.zeros(B, Lq, H, D, dtype=value.dtype)
    for lvl, v in enumerate(value.split([h * w for h, w in shapes], dim=1)):
        h, w = shapes[lvl]
        img = v.permute(0, 2, 3, 1).reshape(B * H, D, h, w)
        grid = locations[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(B * H, Lq, P, 2) * 2 - 1
        sampled = F.grid_sample(
            img, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        sampled = sampled.view(B, H, D, Lq, P).permute(0, 3, 1, 4, 2)  # B, Lq, H, P, D
        out += (sampled * weights[:, :, :, lvl, :, None]).sum(3)
    return out.reshape(B, Lq, H * D)


def _inputs(shapes=SHAPES, B=2, Lq=11, H=3, D=4, P=2, spread=0.4, dtype=torch.float32):
    S = sum(h * w for h, w in shapes)
    value = torch.randn(B, S, H, D, dtype=dtype, requires_grad=True)
    # some points fall outside the maps: they must read zeros, as with the CUDA op
    locations = (
        torch.rand(B, Lq, H, len(shapes), P, 2) * (1 + 2 * spread) - spread
    ).requires_grad_()
    weights = torch.rand(B, Lq, H, len(shapes), P).softmax(-1).requires_grad_()
    return value, list(shapes), locations, weights


@pytest.mark.parametrize("impl", ["gather", "grid_sample"])
def test_forward_and_gradients_match_reference(impl):
    torch.manual_seed(0)
    value, shapes, loc, attn = _inputs()
    expected = reference(value, shapes, loc, attn)
    got = ms_deform_attn_core(value, shapes, loc, attn, impl=impl)
    assert got.shape == expected.shape == (2, 11, 12)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    grad = torch.randn_like(expected)
    g_exp = torch.autograd.grad((expected * grad).sum(), [value, loc, attn])
    g_got = torch.autograd.grad((got * grad).sum(), [value, loc, attn])
    for a, b in zip(g_got, g_exp):
        # location gradients scale with the map size; compare relative to their magnitude
        torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=1e-5)


def test_gather_handles_borders_exactly():
    """Points on pixel centres, edges and just outside: bilinear with zero padding."""
    torch.manual_seed(0)
    shapes = [(4, 5)]
    value = torch.randn(1, 20, 1, 3)
    xs = torch.tensor([-0.2, -1 / 10, 0.0, 1 / 10, 0.5, 0.9, 1.0, 1.1, 1.2])
    loc = torch.stack(torch.meshgrid(xs, xs, indexing="ij"), -1).reshape(1, -1, 1, 1, 1, 2)
    attn = torch.ones(1, loc.shape[1], 1, 1, 1)
    torch.testing.assert_close(
        ms_deform_attn_gather(value, shapes, loc, attn),
        reference(value, shapes, loc, attn),
        atol=1e-6,
        rtol=0,
    )


def test_gather_and_grid_sample_agree_at_realistic_size():
    torch.manual_seed(0)
    value, shapes, loc, attn = _inputs(
        shapes=[(24, 20), (12, 10), (6, 5)], B=1, Lq=64, H=8, D=8, P=4, spread=0.05
    )
    a = ms_deform_attn_gather(value, shapes, loc, attn)
    b = ms_deform_attn_grid_sample(value, shapes, loc, attn)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["gather", "grid_sample"])
def test_bf16_values(impl):
    torch.manual_seed(0)
    value, shapes, loc, attn = _inputs()
    out = ms_deform_attn_core(
        value.detach().bfloat16().requires_grad_(), shapes, loc, attn, impl=impl
    )
    assert out.dtype == torch.bfloat16
    expected = reference(value, shapes, loc, attn)
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.05)
    out.float().sum().backward()
    assert torch.isfinite(loc.grad).all()


def test_unknown_impl():
    value, shapes, loc, attn = _inputs()
    with pytest.raises(ValueError, match="impl"):
        ms_deform_attn_core(value, shapes, loc, attn, impl="cuda_op")


def test_module_init_and_shapes():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=3, n_heads=4, n_points=2)
    names = {n for n, _ in attn.named_parameters()}
    assert {
        "sampling_offsets.weight",
        "attention_weights.weight",
        "value_proj.weight",
        "output_proj.bias",
    } <= names
    assert attn.sampling_offsets.weight.abs().sum() == 0
    bias = attn.sampling_offsets.bias.view(4, 3, 2, 2)
    # head 1 of 4 points at 90 degrees; point k reaches k + 1 pixels
    torch.testing.assert_close(bias[1, 0, 1], torch.tensor([0.0, 2.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[0, 2, 0], torch.tensor([1.0, 0.0]), atol=1e-6, rtol=0)

    shapes = SHAPES
    S = sum(h * w for h, w in shapes)
    x = torch.randn(2, S, 16)
    ref = torch.rand(1, S, 3, 2)
    out = attn(x, ref, x, shapes)
    assert out.shape == (2, S, 16)
    out.sum().backward()
    assert all(p.grad is not None for p in attn.parameters())


def test_module_matches_reference_and_padding_mask():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=8, n_levels=3, n_heads=2, n_points=3)
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 0.5)
        attn.attention_weights.weight.normal_(0, 0.5)
    S = sum(h * w for h, w in SHAPES)
    q, x, ref = torch.randn(2, 5, 8), torch.randn(2, S, 8), torch.rand(2, 5, 3, 2)
    mask = torch.zeros(2, S, dtype=torch.bool)
    mask[1, :10] = True

    value = attn.value_proj(x).masked_fill(mask[..., None], 0).view(2, S, 2, 4)
    off = attn.sampling_offsets(q).view(2, 5, 2, 3, 3, 2)
    w = attn.attention_weights(q).view(2, 5, 2, 9).softmax(-1).view(2, 5, 2, 3, 3)
    norm = torch.tensor([[w_, h_] for h_, w_ in SHAPES], dtype=torch.float32)
    loc = ref[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
    expected = attn.output_proj(reference(value, SHAPES, loc, w))
    torch.testing.assert_close(
        attn(q, ref, x, SHAPES, padding_mask=mask), expected, atol=1e-5, rtol=1e-5
    )
    with pytest.raises(ValueError, match="spatial_shapes"):
        attn(q, ref, x[:, :-1], SHAPES)


def test_module_under_bf16_autocast():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=3, n_heads=4, n_points=2)
    S = sum(h * w for h, w in SHAPES)
    x = torch.randn(2, S, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x, torch.rand(1, S, 3, 2), x, SHAPES)
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters())


def test_constructor_checks():
    with pytest.raises(ValueError, match="impl"):
        MSDeformAttn(8, 1, 2, 1, impl="cuda")
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=10, n_heads=4)
    assert math.isclose(MSDeformAttn(8, 1, 2, 1).sampling_offsets.bias.abs().max().item(), 1.0)


def test_module_impls_agree():
    torch.manual_seed(0)
    a = MSDeformAttn(d_model=16, n_levels=3, n_heads=4, n_points=2, impl="gather")
    b = MSDeformAttn(d_model=16, n_levels=3, n_heads=4, n_points=2, impl="grid_sample")
    with torch.no_grad():
        a.sampling_offsets.weight.normal_(0, 0.5)
    b.load_state_dict(a.state_dict())
    S = sum(h * w for h, w in SHAPES)
    x, ref = torch.randn(2, S, 16), torch.rand(2, S, 3, 2)
    torch.testing.assert_close(a(x, ref, x, SHAPES), b(x, ref, x, SHAPES), atol=1e-5, rtol=1e-5)
