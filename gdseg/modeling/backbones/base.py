"""The backbone interface every Mask2Former backbone implements."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

FEATURE_NAMES = ("res2", "res3", "res4", "res5")
FEATURE_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


@dataclass(frozen=True)
class ShapeSpec:
    """Channels and stride (relative to the input image) of one feature map."""

    channels: int
    stride: int


class Backbone(nn.Module):
    """Base class: an image encoder giving features at strides 4, 8, 16 and 32.

    Subclasses set ``self._out_channels`` (a dict ``{"res2": C2, ..., "res5": C5}``) and
    implement ``forward(x)``: ``x`` is ``[B, 3, H, W]`` normalized float, H and W multiples
    of 32; the result is ``{"res2": [B, C2, H/4, W/4], "res3": [B, C3, H/8, W/8],
    "res4": [B, C4, H/16, W/16], "res5": [B, C5, H/32, W/32]}``.
    """

    _out_channels: dict[str, int]

    def output_shape(self) -> dict[str, ShapeSpec]:
        """Channels and stride of each output feature map, keyed by feature name."""
        return {
            name: ShapeSpec(channels=self._out_channels[name], stride=FEATURE_STRIDES[name])
            for name in FEATURE_NAMES
        }

    @property
    def size_divisibility(self) -> int:
        """Input height and width must be multiples of this."""
        return 32

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError
