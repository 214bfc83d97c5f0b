"""Every backbone builds offline, gives stride 4/8/16/32 features and trains end to end."""

from __future__ import annotations

import pytest
import torch

from gdseg.config import get_cfg
from gdseg.modeling.backbones import (
    ShapeSpec,
    SwinTransformer,
    ViTAdapter,
    build_backbone,
    build_resnet,
)
from gdseg.modeling.backbones.resnet import FrozenBatchNorm2d

STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def _cfg(name: str, *overrides):
    cfg = get_cfg()
    # No stochastic depth: a dropped residual branch would get no gradient by design.
    cfg.merge_from_list(
        ["MODEL.BACKBONE.NAME", name, "MODEL.SWIN.DROP_PATH_RATE", 0.0]
        + ["MODEL.VIT.DROP_PATH_RATE", 0.0, *overrides]
    )
    return cfg


def _check_forward_backward(model: torch.nn.Module, h: int = 64, w: int = 96) -> None:
    """Features at strides 4..32 with the advertised channels; every parameter gets a gradient."""
    torch.manual_seed(0)
    model.train()
    out = model(torch.randn(2, 3, h, w))
    shapes = model.output_shape()
    assert set(out) == set(STRIDES) == set(shapes)
    for name, feat in out.items():
        assert shapes[name] == ShapeSpec(channels=shapes[name].channels, stride=STRIDES[name])
        assert feat.shape == (2, shapes[name].channels, h // STRIDES[name], w // STRIDES[name])
        assert torch.isfinite(feat).all()
    sum(f.square().mean() for f in out.values()).backward()
    no_grad = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert not no_grad, f"parameters without gradient: {no_grad[:10]}"


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2", "swin_tiny"])
def test_backbone_trains(name):
    _check_forward_backward(build_backbone(_cfg(name)))


@pytest.mark.parametrize(
    "timm_name, patch",
    [("vit_base_patch16_224", 16), ("deit_base_patch16_384", 16), ("vit_base_patch14_dinov2", 14)],
)
def test_vit_family_trains(timm_name, patch):
    # The real definitions with 2 blocks instead of 12: same code path, seconds on a CPU.
    torch.manual_seed(0)
    model = ViTAdapter(timm_name, depth=2)
    assert model.patch_size == patch
    _check_forward_backward(model)
    assert model.output_shape()["res5"].channels == 1024


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "resnet34",
        "resnet101",
        "swin_small",
        "swin_base",
        "swin_base_384",
        "swin_large",
        "swin_large_384",
        "vit_base",
        "deit_base",
        "dinov2_base",
        "vit_large",
        "dinov2_large",
    ],
)
def test_large_backbone_trains(name):
    _check_forward_backward(build_backbone(_cfg(name)), h=64, w=64)


def test_presets_match_published_shapes():
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        swin = build_backbone(_cfg("swin_base_384"))
        r101 = build_backbone(_cfg("resnet101"))
    assert [blk.window_size for blk in swin.layers] == [12] * 4
    assert swin.layers[2].blocks[0].attn.relative_position_bias_table.shape == (23 * 23, 16)
    assert {k: v.channels for k, v in swin.output_shape().items()} == {
        "res2": 128,
        "res3": 256,
        "res4": 512,
        "res5": 1024,
    }
    assert r101.output_shape()["res5"].channels == 2048
    assert len(r101.layer3) == 23 and r101.layer2[0].conv2.stride == (2, 2)
    # The detectron2 names are aliases reading the detectron2 keys.
    with torch.device("meta"):
        r = build_backbone(_cfg("build_resnet_backbone", "MODEL.RESNETS.DEPTH", 18))
        d2swin = build_backbone(_cfg("D2SwinTransformer", "MODEL.SWIN.EMBED_DIM", 64))
    assert r.output_shape()["res5"].channels == 512
    assert d2swin.output_shape()["res2"].channels == 64


def test_unknown_name_lists_valid_and_close_names():
    with pytest.raises(KeyError) as err:
        build_backbone(_cfg("resnet5O"))
    msg = str(err.value)
    assert "resnet50" in msg and "Did you mean" in msg and "swin_tiny" in msg


def test_preset_conflicting_with_keys_is_an_error():
    with pytest.raises(ValueError, match="WINDOW_SIZE"):
        build_backbone(_cfg("swin_base", "MODEL.SWIN.WINDOW_SIZE", 12))
    with pytest.raises(ValueError, match="DEPTH"):
        build_backbone(_cfg("resnet50", "MODEL.RESNETS.DEPTH", 101))


def test_resnet_norms_and_freeze_at():
    torch.manual_seed(0)
    frozen = build_resnet(18)
    assert isinstance(frozen.bn1, FrozenBatchNorm2d)
    assert "bn1.num_batches_tracked" not in frozen.state_dict()
    sync = build_backbone(_cfg("resnet18", "MODEL.RESNETS.NORM", "SyncBN"))
    assert isinstance(sync.bn1, torch.nn.SyncBatchNorm)  # runs as plain BN without DDP
    _check_forward_backward(build_resnet(18, norm="BN"))

    model = build_resnet(18, norm="BN", freeze_at=2)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    assert isinstance(model.layer1[0].bn1, FrozenBatchNorm2d)
    assert isinstance(model.layer2[0].bn1, torch.nn.BatchNorm2d)
    with pytest.raises(ValueError, match="norm"):
        build_resnet(18, norm="GN")


def test_mobilenet_freeze_at():
    torch.manual_seed(0)
    cfg = _cfg("mobilenet_v2", "MODEL.RESNETS.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", 2)
    model = build_backbone(cfg)
    # Stem (features.0) and res2 (features.1-3) frozen, res3 onwards trainable.
    trainable = {int(n.split(".")[1]) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(range(4, 18))
    norms = [
        (i, type(m))
        for i, f in enumerate(model.features)
        for m in f.modules()
        if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d))
    ]
    assert all((t is FrozenBatchNorm2d) == (i < 4) for i, t in norms)
    _check_forward_backward(model)
    # Same state-dict names as the unfrozen FrozenBN model, so pretrained files load the same.
    names = set(build_backbone(_cfg("mobilenet_v2")).state_dict())
    assert names == {n for n in model.state_dict() if not n.endswith("num_batches_tracked")}


def test_resnet_stride_in_1x1():
    model = build_resnet(50, stride_in_1x1=True)
    assert model.layer2[0].conv1.stride == (2, 2) and model.layer2[0].conv2.stride == (1, 1)
    out = model(torch.randn(1, 3, 64, 64))
    assert out["res5"].shape == (1, 2048, 2, 2)


def test_swin_any_input_size():
    """Sizes that are not multiples of the patch, the window or 32 still work (padding)."""
    torch.manual_seed(0)
    model = SwinTransformer(32, (2, 2, 2, 2), (1, 2, 2, 4), window_size=7, drop_path_rate=0.0)
    model.eval()
    out = model(torch.randn(1, 3, 70, 45))
    assert [tuple(f.shape[-2:]) for f in out.values()] == [(18, 12), (9, 6), (5, 3), (3, 2)]
    # Padding does not leak into the valid region's batch neighbours: per-image results.
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        both = model(x)["res5"]
        single = model(x[1:])["res5"]
    torch.testing.assert_close(both[1:], single, atol=1e-5, rtol=1e-5)


def test_swin_gradient_checkpointing_is_equal():
    torch.manual_seed(0)
    a = SwinTransformer(32, (1, 2, 1, 1), (1, 2, 2, 4), window_size=4, drop_path_rate=0.0)
    b = SwinTransformer(32, (1, 2, 1, 1), (1, 2, 2, 4), window_size=4, drop_path_rate=0.0)
    b.load_state_dict(a.state_dict())
    for layer in b.layers:
        layer.use_checkpoint = True
    x = torch.randn(1, 3, 64, 64)
    for m in (a, b):
        sum(f.sum() for f in m(x).values()).backward()
    torch.testing.assert_close(a.patch_embed.proj.weight.grad, b.patch_embed.proj.weight.grad)


def test_vit_patch14_outputs_exact_strides():
    torch.manual_seed(0)
    model = ViTAdapter("vit_base_patch14_dinov2", depth=1, interpolation="bilinear").eval()
    out = model(torch.randn(1, 3, 96, 160))
    assert [tuple(f.shape[-2:]) for f in out.values()] == [(24, 40), (12, 20), (6, 10), (3, 5)]


def test_vit_freeze_keeps_adapter_trainable():
    model = ViTAdapter("vit_base_patch16_224", depth=1, freeze=True)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"convs"}
