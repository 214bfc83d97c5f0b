"""MobileNetV2 (torchvision layout) as a small backbone for CPU work and tests."""

from __future__ import annotations

import torch
from torchvision.models import mobilenet_v2

from .base import FEATURE_NAMES, Backbone
from .resnet import freeze_batchnorm, get_norm

# Last index of torchvision's ``features`` at strides 4, 8, 16 and 32, and their channels.
_STAGE_ENDS = (3, 6, 13, 17)
_STAGE_CHANNELS = (24, 32, 96, 320)


class MobileNetV2(Backbone):
    """torchvision MobileNetV2 (width 1.0) cut into four stages.

    The final 1x1 convolution to 1280 channels (``features.18``) and the classifier are
    dropped: res5 is the 320-channel stride-32 map. Parameter names are torchvision's
    (``features.0.0.weight`` ...), so its ImageNet file (``mobilenet_v2-b0353104.pth``) loads
    directly (its ``features.18`` and ``classifier`` entries are reported as unused).

    Args:
        norm: "FrozenBN" (default), "BN" or "SyncBN".
        freeze_at: detectron2 semantics, as for ResNets: 0 trains everything, 1 freezes the
            stem (``features.0``), k >= 2 the stem and the first k - 1 stages (their BN become
            FrozenBN). Freezing the stride-4 layers of a pretrained backbone saves ~40 % of a
            small model's CPU training step.
    """

    def __init__(self, norm: str = "FrozenBN", freeze_at: int = 0) -> None:
        super().__init__()
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at must be in 0..5, got {freeze_at}")
        features = mobilenet_v2(weights=None, norm_layer=get_norm(norm)).features
        self.features = features[: _STAGE_ENDS[-1] + 1]
        self._out_channels = dict(zip(FEATURE_NAMES, _STAGE_CHANNELS))
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int) -> None:
        """Stop gradients in the stem (``freeze_at >= 1``) and stages ``< freeze_at``."""
        if freeze_at <= 0:
            return
        end = 0 if freeze_at == 1 else _STAGE_ENDS[freeze_at - 2]
        for i in range(end + 1):
            self.features[i].requires_grad_(False)
            self.features[i] = freeze_batchnorm(self.features[i])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args: x [B, 3, H, W]. Returns {"res2": [B, 24, H/4, W/4], ..., "res5": [B, 320, H/32, W/32]}."""
        out = {}
        start = 0
        for name, end in zip(FEATURE_NAMES, _STAGE_ENDS):
            for i in range(start, end + 1):
                x = self.features[i](x)
            out[name] = x
            start = end + 1
        return out
