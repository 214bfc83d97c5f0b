import math

import pytest
import torch

from gdseg.modeling.backbones import ShapeSpec
from gdseg.modeling.pixel_decoder import (
    MSDeformAttnPixelDecoder,
    MSDeformAttnTransformerEncoderOnly,
)
from gdseg.modeling.position_encoding import PositionEmbeddingSine

INPUT_SHAPE = {
    "res2": ShapeSpec(channels=16, stride=4),
    "res3": ShapeSpec(channels=24, stride=8),
    "res4": ShapeSpec(channels=40, stride=16),
    "res5": ShapeSpec(channels=48, stride=32),
}


def _features(B=2, H=64, W=96):
    return {
        k: torch.randn(B, s.channels, H // s.stride, W // s.stride) for k, s in INPUT_SHAPE.items()
    }


def _decoder(**kwargs):
    args = dict(
        conv_dim=32,
        mask_dim=32,
        transformer_nheads=4,
        transformer_dim_feedforward=64,
        transformer_enc_layers=2,
    )
    args.update(kwargs)
    return MSDeformAttnPixelDecoder(INPUT_SHAPE, **args)


def test_outputs_and_published_names():
    torch.manual_seed(0)
    dec = _decoder(mask_dim=16)
    mask_features, multi_scale = dec(_features())
    assert mask_features.shape == (2, 16, 16, 24)
    assert [tuple(f.shape) for f in multi_scale] == [(2, 32, 2, 3), (2, 32, 4, 6), (2, 32, 8, 12)]
    names = set(dec.state_dict())
    expected = {
        "input_proj.0.0.weight",
        "input_proj.2.1.bias",
        "transformer.level_embed",
        "transformer.encoder.layers.1.self_attn.sampling_offsets.weight",
        "transformer.encoder.layers.0.norm1.weight",
        "transformer.encoder.layers.0.linear1.weight",
        "transformer.encoder.layers.0.linear2.bias",
        "transformer.encoder.layers.0.norm2.bias",
        "mask_features.weight",
        "mask_features.bias",
        "adapter_1.weight",
        "adapter_1.norm.weight",
        "layer_1.weight",
        "layer_1.norm.bias",
    }
    assert expected <= names
    assert "adapter_1.bias" not in names and "layer_1.bias" not in names  # GN convs have no bias
    # input_proj goes from low to high resolution: res5 first
    assert dec.state_dict()["input_proj.0.0.weight"].shape == (32, 48, 1, 1)
    assert dec.state_dict()["adapter_1.weight"].shape == (32, 16, 1, 1)


@pytest.mark.parametrize("amp", [False, True])
def test_gradients_reach_every_parameter_and_bf16_autocast(amp):
    torch.manual_seed(0)
    dec = _decoder(amp=amp)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mask_features, multi_scale = dec(_features())
    # published behaviour: the pixel decoder stays in fp32 inside autocast
    assert mask_features.dtype == (torch.bfloat16 if amp else torch.float32)
    assert all(torch.isfinite(t).all() for t in [mask_features, *multi_scale])
    (mask_features.float().sum() + sum(f.float().sum() for f in multi_scale)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in dec.parameters())


def test_top_down_path_uses_encoder_output():
    """The stride-4 map is layer_1(adapter_1(res2) + upsampled stride-8 encoder output)."""
    torch.manual_seed(0)
    dec = _decoder().eval()
    feats = _features()
    with torch.no_grad():
        mask_features, multi_scale = dec(feats)
        up = torch.nn.functional.interpolate(
            multi_scale[2], size=(16, 24), mode="bilinear", align_corners=False
        )
        expected = dec.mask_features(dec.layer_1(dec.adapter_1(feats["res2"]) + up))
    torch.testing.assert_close(mask_features, expected)


def test_reference_points_are_pixel_centres():
    ref = MSDeformAttnTransformerEncoderOnly.reference_points([(2, 4), (1, 2)], torch.device("cpu"))
    assert ref.shape == (1, 10, 1, 2)
    torch.testing.assert_close(
        ref[0, :4, 0], torch.tensor([[0.125, 0.25], [0.375, 0.25], [0.625, 0.25], [0.875, 0.25]])
    )
    torch.testing.assert_close(ref[0, 8:, 0], torch.tensor([[0.25, 0.5], [0.75, 0.5]]))


def test_position_embedding_matches_detr_formula():
    pe = PositionEmbeddingSine(8, normalize=True)
    x = torch.zeros(3, 5, 4, 6)
    out = pe(x)
    assert out.shape == (1, 16, 4, 6) and out.dtype == torch.float32
    # DETR: cumulative sums of a "not padded" mask, normalized, scaled by 2 pi
    not_mask = torch.ones(1, 4, 6)
    y = not_mask.cumsum(1)
    xx = not_mask.cumsum(2)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    xx = xx / (xx[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = 10000 ** (2 * (torch.arange(8.0) // 2) / 8)
    px, py = xx[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    expected = torch.cat((py, px), dim=3).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
