"""Plain ViTs (ViT, DeiT, DINOv2) through a simple multi-scale adapter.

The ViT trunk is timm's model definition, built offline (``pretrained=False``); weights come
from a local file (see ``weights.py``). The last layer's normalized patch tokens form a grid
at stride ``patch_size``; a 1x1 convolution per output projects it to 128/256/512/1024
channels and it is resized to strides 4/8/16/32 (the published Guided Distillation design).
Attribute names (``model`` for the trunk, ``convs`` for the adapter) are those of the
published DeiT/DINOv2 backbones, whose trunk names equal timm's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import FEATURE_NAMES, FEATURE_STRIDES, Backbone

logger = logging.getLogger(__name__)

# Our name -> timm model definition.
VIT_PRESETS: dict[str, str] = {
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    # The published DeiT backbone is the 384-px DeiT-B/16.
    "deit_base": "deit_base_patch16_384",
    "dinov2_base": "vit_base_patch14_dinov2",
    "dinov2_large": "vit_large_patch14_dinov2",
}


class ViTAdapter(Backbone):
    """A timm ViT whose last normalized patch tokens are turned into 4 feature maps.

    Inputs whose size is not a multiple of the patch size (patch 14 with multiple-of-32
    images) are resized up to the next multiple before patchifying, as the published code
    does; the outputs always have exactly ``H / s, W / s`` pixels for s = 4, 8, 16, 32.

    Args:
        timm_name: a timm ViT model name (e.g. "vit_base_patch14_dinov2").
        out_channels: channels of res2..res5.
        img_size: pretraining image size; sizes the stored position embedding (0 = the timm
            model's default). Any input size works (position embeddings are interpolated).
        drop_path_rate: stochastic depth rate of the trunk.
        freeze: freeze the trunk (only the adapter's 1x1 convolutions are trained).
        interpolation: resize mode for the image and the token grid ("nearest" as published,
            or "bilinear").
        **timm_kwargs: more arguments of ``timm.create_model`` (e.g. ``depth`` for a small
            test model).
    """

    def __init__(
        self,
        timm_name: str,
        out_channels: Sequence[int] = (128, 256, 512, 1024),
        img_size: int = 0,
        drop_path_rate: float = 0.0,
        freeze: bool = False,
        interpolation: str = "nearest",
        **timm_kwargs,
    ) -> None:
        super().__init__()
        import timm  # local: only ViT users pay for importing timm's model zoo

        if len(out_channels) != 4:
            raise ValueError(f"out_channels needs 4 values (res2..res5), got {out_channels}")
        if interpolation not in ("nearest", "bilinear"):
            raise ValueError(
                f"interpolation must be 'nearest' or 'bilinear', got {interpolation!r}"
            )
        kwargs = dict(timm_kwargs, img_size=img_size) if img_size else dict(timm_kwargs)
        # pretrained=False: never touch the network; weights are loaded from local files.
        self.model = timm.create_model(
            timm_name,
            pretrained=False,
            num_classes=0,
            global_pool="",
            dynamic_img_size=True,
            drop_path_rate=drop_path_rate,
            **kwargs,
        )
        self.timm_name = timm_name
        self.patch_size = int(self.model.patch_embed.patch_size[0])
        self.interpolation = interpolation
        dim = self.model.embed_dim
        self.convs = nn.ModuleList(nn.Conv2d(dim, int(c), kernel_size=1) for c in out_channels)
        self._out_channels = dict(zip(FEATURE_NAMES, (int(c) for c in out_channels)))
        if freeze:
            for p in self.model.parameters():
                p.requires_grad_(False)

    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        if self.interpolation == "nearest":
            return F.interpolate(x, size=size, mode="nearest")
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args: x [B, 3, H, W]. Returns {"res2": [B, C2, H/4, W/4], ..., "res5": [B, C5, H/32, W/32]}."""
        h, w = x.shape[-2:]
        p = self.patch_size
        gh, gw = -(-h // p), -(-w // p)
        tokens = self.model.forward_features(self._resize(x, (gh * p, gw * p)))
        tokens = tokens[:, self.model.num_prefix_tokens :]
        grid = tokens.transpose(1, 2).reshape(x.shape[0], -1, gh, gw)
        out = {}
        for name, conv in zip(FEATURE_NAMES, self.convs):
            s = FEATURE_STRIDES[name]
            # A 1x1 conv commutes with nearest/bilinear resizing (weights sum to one), so
            # project first: the stride-4 map then has 128 channels instead of 768/1024.
            out[name] = self._resize(conv(grid), (h // s, w // s))
        return out


def build_vit(name: str, **kwargs) -> ViTAdapter:
    """A preset from :data:`VIT_PRESETS`; ``kwargs`` go to :class:`ViTAdapter`."""
    return ViTAdapter(VIT_PRESETS[name], **kwargs)
