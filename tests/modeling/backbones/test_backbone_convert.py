"""Backbone import: transformers parity and the published detectron2 key listings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gdseg.config import get_cfg
from gdseg.modeling.backbones import (
    backbone_from_transformers,
    backbone_state_dict_from_detectron2,
    build_backbone,
)
from gdseg.modeling.backbones.convert import _hf_swin_state_dict

transformers = pytest.importorskip("transformers")

DATA = Path(__file__).resolve().parents[2] / "fixtures"  # copies of the published listings
STAGES = ["stage1", "stage2", "stage3", "stage4"]


def _randomize_batchnorm(model: torch.nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, so BN really does something."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def _hf_configs():
    resnet18_like = transformers.ResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32, 64, 128],
        depths=[2, 1, 2, 1],
        layer_type="basic",
        out_features=STAGES,
    )
    resnet50 = transformers.ResNetConfig(out_features=STAGES)  # the default is ResNet-50
    swin_tiny = transformers.SwinConfig(
        embed_dim=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        out_features=STAGES,
    )
    return {
        "resnet18_like": (transformers.ResNetBackbone, resnet18_like),
        "resnet50": (transformers.ResNetBackbone, resnet50),
        "swin_tiny": (transformers.SwinBackbone, swin_tiny),
    }


@pytest.mark.parametrize("case", ["resnet18_like", "resnet50", "swin_tiny"])
def test_backbone_from_transformers_matches_features(case):
    torch.manual_seed(0)
    cls, config = _hf_configs()[case]
    hf = cls(config).eval()
    _randomize_batchnorm(hf)
    ours = backbone_from_transformers(hf, config)
    assert not ours.training
    # 64 x 96: at strides 16 and 32 the maps (4x6, 2x3) are smaller than Swin's 7x7 window,
    # so the padding and shifted-window masking paths are exercised.
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = hf(x).feature_maps
        out = ours(x)
    assert len(ref) == 4
    for name, r in zip(["res2", "res3", "res4", "res5"], ref):
        assert out[name].shape == r.shape
        assert ours.output_shape()[name].channels == r.shape[1]
        assert (out[name] - r).abs().max().item() < 1e-4, name


def test_transformers_swin_older_names_are_mapped():
    torch.manual_seed(0)
    config = transformers.SwinConfig(
        embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], out_features=STAGES
    )
    sd = transformers.SwinBackbone(config).state_dict()
    old_names = {
        "attention.q_proj.": "attention.self.query.",
        "attention.k_proj.": "attention.self.key.",
        "attention.v_proj.": "attention.self.value.",
        "attention.o_proj.": "attention.output.dense.",
        "mlp.fc1.": "intermediate.dense.",
        "mlp.fc2.": "output.dense.",
    }
    old_sd = {}
    for k, v in sd.items():
        for new, old in old_names.items():
            k = k.replace(new, old)
        old_sd[k] = v
    a, b = _hf_swin_state_dict(sd), _hf_swin_state_dict(old_sd)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _listing(name: str) -> dict[str, torch.Tensor]:
    """Fabricate the backbone entries of a published listing ('key<TAB>shape<TAB>dtype')."""
    sd = {}
    for line in (DATA / f"published_state_dict_{name}.txt").read_text().splitlines():
        if not line.startswith("backbone."):
            continue
        key, shape, dtype = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        sd[key] = torch.zeros(dims, dtype=getattr(torch, dtype))
    return sd


@pytest.mark.parametrize(
    "listing, name, overrides",
    [
        ("R50_coco", "resnet50", []),
        ("R50_cityscapes", "resnet50", ["MODEL.RESNETS.NORM", "SyncBN"]),
        ("swin_tiny_coco", "swin_tiny", []),
    ],
)
def test_detectron2_listing_maps_exactly(listing, name, overrides):
    published = _listing(listing)
    assert len(published) > 180
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", name, *overrides])
    with torch.device("meta"):
        model = build_backbone(cfg)
    mapped = backbone_state_dict_from_detectron2(published, name)
    own = model.state_dict()
    assert sorted(mapped) == sorted(own)  # nothing missing, nothing unexpected
    for k, v in mapped.items():
        assert v.shape == own[k].shape, k
    # And torch agrees, strictly (assign: the model lives on the meta device).
    model.load_state_dict(mapped, strict=True, assign=True)


def test_detectron2_mapping_examples_and_errors():
    sd = {
        "backbone.stem.conv1.weight": torch.zeros(1),
        "backbone.stem.conv1.norm.running_var": torch.zeros(1),
        "res3.0.shortcut.norm.bias": torch.zeros(1),
        "res5.2.conv3.norm.weight": torch.zeros(1),
        "res4.1.conv2.weight": torch.zeros(1),
    }
    assert set(backbone_state_dict_from_detectron2(sd, "build_resnet_backbone")) == {
        "conv1.weight",
        "bn1.running_var",
        "layer2.0.downsample.1.bias",
        "layer4.2.bn3.weight",
        "layer3.1.conv2.weight",
    }
    with pytest.raises(KeyError, match="sem_seg_head"):
        backbone_state_dict_from_detectron2({"sem_seg_head.x.weight": torch.zeros(1)}, "resnet50")
    with pytest.raises(KeyError, match="head.weight"):
        backbone_state_dict_from_detectron2({"head.weight": torch.zeros(1)}, "swin_tiny")
