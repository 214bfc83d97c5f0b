import pytest
import torch
from torch import nn

from gdseg.config import get_cfg
from gdseg.modeling import Mask2Former, build_model, build_sem_seg_head
from gdseg.modeling.backbones import ShapeSpec
from gdseg.modeling.transformer_decoder import layer_predictions

TINY = [
    "MODEL.BACKBONE.NAME", "resnet18",
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "3",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32",
    "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1",
    "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD", "64",
    "MODEL.MASK_FORMER.HIDDEN_DIM", "32",
    "MODEL.MASK_FORMER.NHEADS", "4",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "6",
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64",
    "MODEL.MASK_FORMER.DEC_LAYERS", "4",
]  # fmt: skip


def _tiny_cfg():
    cfg = get_cfg()
    cfg.merge_from_list(TINY)
    return cfg


class FakeBackbone(nn.Module):
    """Strided convs giving res2..res5 (stands in for any backbone)."""

    def __init__(self, channels=(8, 16, 24, 32)):
        super().__init__()
        self.channels = channels
        self.stem = nn.Conv2d(3, channels[0], 4, stride=4)
        self.downs = nn.ModuleList(
            nn.Conv2d(a, b, 2, stride=2) for a, b in zip(channels, channels[1:])
        )

    def output_shape(self):
        return {f"res{i + 2}": ShapeSpec(c, 4 * 2**i) for i, c in enumerate(self.channels)}

    def forward(self, x):
        feats = [self.stem(x)]
        for down in self.downs:
            feats.append(down(feats[-1]))
        return {f"res{i + 2}": f for i, f in enumerate(feats)}


def _check_outputs(out, B, Q, K, H, W, layers):
    assert out["pred_logits"].shape == (B, Q, K + 1)
    assert out["pred_masks"].shape == (B, Q, H // 4, W // 4)
    assert len(out["aux_outputs"]) == layers - 1
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (B, Q, K + 1)
        assert aux["mask_embed"].shape[:2] == (B, Q) and "pred_masks" not in aux
    for pred in layer_predictions(out):
        assert pred["pred_masks"].shape == (B, Q, H // 4, W // 4)


def test_build_model_outputs_in_train_and_eval():
    torch.manual_seed(0)
    model = build_model(_tiny_cfg())
    images = torch.randn(2, 3, 64, 96)
    for mode in (model.train, model.eval):
        mode()
        _check_outputs(model(images), B=2, Q=6, K=3, H=64, W=96, layers=4)
    keys = set(model.state_dict())
    assert all(
        k.startswith(("backbone.", "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."))
        for k in keys
    )
    assert "sem_seg_head.predictor.class_embed.weight" in keys


def test_every_parameter_gets_a_gradient_with_fake_backbone():
    torch.manual_seed(0)
    cfg = _tiny_cfg()
    backbone = FakeBackbone()
    model = Mask2Former(backbone, build_sem_seg_head(cfg, backbone.output_shape())).train()
    out = model(torch.randn(1, 3, 64, 64))
    _check_outputs(out, B=1, Q=6, K=3, H=64, W=64, layers=4)
    loss = sum(o["pred_logits"].sum() + o["pred_masks"].sum() for o in layer_predictions(out))
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_bf16_autocast_gives_finite_outputs_and_gradients():
    torch.manual_seed(0)
    model = build_model(_tiny_cfg()).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64, 64))
    tensors = [t for o in layer_predictions(out) for t in (o["pred_logits"], o["pred_masks"])]
    assert all(torch.isfinite(t).all() for t in tensors)
    sum(t.float().mean() for t in tensors).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_input_size_must_be_padded():
    model = build_model(_tiny_cfg())
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 64, 70))


def test_build_errors_name_the_key():
    cfg = _tiny_cfg()
    cfg.MODEL.META_ARCHITECTURE = "RCNN"
    with pytest.raises(ValueError, match="META_ARCHITECTURE"):
        build_model(cfg)
    cfg = _tiny_cfg()
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ("res2", "res6")
    with pytest.raises(ValueError, match="IN_FEATURES"):
        build_model(cfg)
