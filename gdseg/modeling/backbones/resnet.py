"""ResNet backbones in the torchvision layout (stride in the 3x3 convolution by default).

Parameter names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1`` ...), so a
torchvision ImageNet file loads as is; detectron2 names are mapped in ``convert.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d as _TorchvisionFrozenBN

from .base import FEATURE_NAMES, Backbone

# depth -> (block type, blocks per stage); the standard torchvision definitions.
RESNET_DEPTHS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
NORMS = ("FrozenBN", "BN", "SyncBN")


class FrozenBatchNorm2d(_TorchvisionFrozenBN):
    """BatchNorm with fixed statistics and affine parameters (buffers, not parameters).

    Same state dict as torchvision's (which it subclasses), but computed with
    ``F.batch_norm`` in inference mode, so results are bit-identical to an ``nn.BatchNorm2d``
    in eval mode (torchvision's folded scale/shift differs by float rounding).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


def get_norm(norm: str) -> Callable[[int], nn.Module]:
    """Return a constructor ``channels -> norm module`` for a detectron2 norm name.

    Args:
        norm: "FrozenBN" (fixed statistics and affine, the Mask2Former COCO default),
            "BN" or "SyncBN" (the published Cityscapes configs; falls back to plain BN when
            torch.distributed is not initialized).
    """
    if norm == "FrozenBN":
        return FrozenBatchNorm2d
    if norm == "BN":
        return nn.BatchNorm2d
    if norm == "SyncBN":
        return nn.SyncBatchNorm
    raise ValueError(f"Unknown norm {norm!r}; expected one of {NORMS}")


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every (Sync)BatchNorm2d inside ``module`` by a FrozenBatchNorm2d with its stats.

    Frozen stages must not update running statistics (detectron2 does the same).
    """
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        if module.affine:
            frozen.weight.copy_(module.weight.detach())
            frozen.bias.copy_(module.bias.detach())
        if module.track_running_stats:
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new_child = freeze_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def _make_block(
    kind: str,
    in_channels: int,
    out_channels: int,
    stride: int,
    norm_layer: Callable[[int], nn.Module],
    stride_in_1x1: bool,
) -> nn.Module:
    """One residual block with torchvision's module names, for any channel counts."""
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
            norm_layer(out_channels),
        )
    if kind == "basic":
        block = BasicBlock(in_channels, out_channels, stride, downsample, norm_layer=norm_layer)
        return block
    mid = out_channels // 4
    block = Bottleneck(in_channels, mid, stride, downsample, norm_layer=norm_layer)
    if mid * Bottleneck.expansion != out_channels:
        # torchvision ties the output width to 4 * mid; transformers' configs need not.
        block.conv3 = nn.Conv2d(mid, out_channels, 1, bias=False)
        block.bn3 = norm_layer(out_channels)
    if stride_in_1x1 and stride != 1:
        # MSRA/caffe layout: the 1x1 reduction strides, the 3x3 does not.
        block.conv1.stride = (stride, stride)
        block.conv2.stride = (1, 1)
    return block


class ResNet(Backbone):
    """ResNet feature extractor; outputs the four stages (strides 4, 8, 16, 32).

    Args:
        block: "basic" (ResNet-18/34) or "bottleneck" (ResNet-50/101/152).
        depths: number of blocks in each of the 4 stages.
        stage_channels: output channels of each stage (torchvision: 64..512 basic,
            256..2048 bottleneck; a bottleneck's inner width is a quarter of it).
        stem_channels: output channels of the 7x7 stem convolution.
        norm: "FrozenBN", "BN" or "SyncBN".
        freeze_at: detectron2 semantics: 0 trains everything, 1 freezes the stem, k >= 2
            freezes the stem and the first k - 1 stages (their BN become FrozenBN).
        stride_in_1x1: put the stride in the first 1x1 convolution of bottlenecks (MSRA
            layout) instead of the 3x3 (torchvision layout).
    """

    def __init__(
        self,
        block: str,
        depths: Sequence[int],
        stage_channels: Sequence[int],
        stem_channels: int = 64,
        norm: str = "FrozenBN",
        freeze_at: int = 0,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"Unknown ResNet block {block!r}; expected 'basic' or 'bottleneck'")
        if len(depths) != 4 or len(stage_channels) != 4:
            raise ValueError(
                f"ResNet needs 4 stages, got depths={depths}, channels={stage_channels}"
            )
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at must be in 0..5, got {freeze_at}")
        norm_layer = get_norm(norm)
        self.conv1 = nn.Conv2d(3, stem_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = stem_channels
        for i, (depth, out_channels) in enumerate(zip(depths, stage_channels)):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(
                    _make_block(block, in_channels, out_channels, stride, norm_layer, stride_in_1x1)
                )
                in_channels = out_channels
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self._init_weights()
        self._out_channels = dict(zip(FEATURE_NAMES, (int(c) for c in stage_channels)))
        self.freeze(freeze_at)

    def _init_weights(self) -> None:
        # torchvision's initialisation of convolutions (norms start as the identity).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def freeze(self, freeze_at: int) -> None:
        """Stop gradients in the stem (``freeze_at >= 1``) and stages ``< freeze_at``."""
        parts: list[nn.Module] = []
        if freeze_at >= 1:
            parts += [self.conv1, self.bn1]
        parts += [getattr(self, f"layer{i}") for i in range(1, freeze_at)]
        for part in parts:
            for p in part.parameters():
                p.requires_grad_(False)
        if freeze_at >= 1:
            self.bn1 = freeze_batchnorm(self.bn1)
            for i in range(1, freeze_at):
                freeze_batchnorm(getattr(self, f"layer{i}"))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args: x [B, 3, H, W]. Returns {"res2": [B, C2, H/4, W/4], ..., "res5": [.., H/32, W/32]}."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = {}
        for i, name in enumerate(FEATURE_NAMES):
            x = getattr(self, f"layer{i + 1}")(x)
            out[name] = x
        return out


def build_resnet(
    depth: int, norm: str = "FrozenBN", freeze_at: int = 0, stride_in_1x1: bool = False
) -> ResNet:
    """The standard torchvision ResNet-``depth`` (18, 34, 50, 101 or 152) as a backbone."""
    if depth not in RESNET_DEPTHS:
        raise ValueError(
            f"Unsupported ResNet depth {depth}; expected one of {sorted(RESNET_DEPTHS)}"
        )
    block, depths = RESNET_DEPTHS[depth]
    channels = (64, 128, 256, 512) if block == "basic" else (256, 512, 1024, 2048)
    return ResNet(block, depths, channels, 64, norm, freeze_at, stride_in_1x1)
