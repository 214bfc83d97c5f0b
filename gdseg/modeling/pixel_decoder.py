"""Mask2Former pixel decoder: deformable-attention encoder on the low-resolution features plus
FPN-style lateral/output convolutions down to the mask-feature stride.

Parameter names are those of the published detectron2 model
(``input_proj``, ``transformer.level_embed``, ``transformer.encoder.layers.i.*``, ``adapter_1``,
``layer_1``, ``mask_features``) so published checkpoints load unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .linear import Linear
from .ms_deform_attn import MSDeformAttn
from .position_encoding import PositionEmbeddingSine

__all__ = ["Conv2dNorm", "MSDeformAttnPixelDecoder", "MSDeformAttnTransformerEncoderOnly"]


class Conv2dNorm(nn.Conv2d):
    """``nn.Conv2d`` followed by an optional ``norm`` and activation (detectron2 ``Conv2d``);
    keeps detectron2's parameter names (``weight``, ``norm.weight``, ``norm.bias``)."""

    def __init__(
        self, *args: Any, norm: nn.Module | None = None, activation: bool = False, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        return F.relu(x) if self.activation else x


def c2_xavier_fill(module: nn.Conv2d) -> None:
    """Caffe2 "XavierFill" of detectron2 (kaiming_uniform with a=1), bias zero."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


def _norm(norm: str, channels: int) -> nn.Module | None:
    if norm == "GN":
        return nn.GroupNorm(32, channels)
    if norm == "":
        return None
    raise ValueError(f"pixel decoder norm must be 'GN' or '', got {norm!r}")


class MSDeformAttnEncoderLayer(nn.Module):
    """Deformable self-attention + FFN, post-norm."""

    def __init__(
        self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = Linear(d_model, d_ffn)
        self.linear2 = Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = dropout

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: list[tuple[int, int]],
    ):
        """src ``[B, S, C]``, pos ``[1 or B, S, C]``, reference_points ``[1 or B, S, L, 2]``."""
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes)
        src = self.norm1(src + F.dropout(src2, self.dropout, self.training))
        src2 = self.linear2(F.dropout(F.relu(self.linear1(src)), self.dropout, self.training))
        return self.norm2(src + F.dropout(src2, self.dropout, self.training))


class MSDeformAttnEncoder(nn.Module):
    """Stack of :class:`MSDeformAttnEncoderLayer` (holds ``layers`` for the published names)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Deformable-attention encoder over flattened multi-scale features (no padding masks)."""

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        num_feature_levels: int = 3,
        enc_n_points: int = 4,
    ):
        super().__init__()
        self.encoder = MSDeformAttnEncoder(
            [
                MSDeformAttnEncoderLayer(
                    d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points
                )
                for _ in range(num_encoder_layers)
            ]
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier for every matrix, then the deformable-attention init, normal level embeddings."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def reference_points(spatial_shapes: list[tuple[int, int]], device: torch.device) -> Tensor:
        """Pixel centres of every level, normalized to [0, 1]: ``[1, S, 1, 2]`` (x, y)."""
        points = []
        for h, w in spatial_shapes:
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device) / h,
                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device) / w,
                indexing="ij",
            )
            points.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))
        return torch.cat(points, 0)[None, :, None, :]

    def forward(
        self, srcs: list[Tensor], pos_embeds: list[Tensor]
    ) -> tuple[Tensor, list[tuple[int, int]]]:
        """Encode ``srcs`` (``[B, C, h, w]`` per level, low resolution first).

        Args:
            srcs: projected features per level.
            pos_embeds: ``[1, C, h, w]`` position embedding per level.

        Returns:
            ``[B, S, C]`` encoded tokens (levels concatenated) and the ``(h, w)`` per level.
        """
        spatial_shapes = [(s.shape[2], s.shape[3]) for s in srcs]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos = torch.cat(
            [
                p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                for lvl, p in enumerate(pos_embeds)
            ],
            1,
        ).to(src.dtype)
        # valid ratios are 1 (no padding masks), so every level shares the same normalized points
        ref = self.reference_points(spatial_shapes, src.device)
        for layer in self.encoder.layers:
            src = layer(src, pos, ref, spatial_shapes)
        return src, spatial_shapes


class MSDeformAttnPixelDecoder(nn.Module):
    """Pixel decoder of Mask2Former.

    Args:
        input_shape: backbone feature name -> object with ``channels`` and ``stride``.
        conv_dim: channels of the decoder (``CONVS_DIM``).
        mask_dim: channels of the mask features (``MASK_DIM``).
        norm: "GN" (GroupNorm(32)) or "" for the lateral/output convs.
        transformer_in_features: features refined by the deformable encoder.
        common_stride: stride of the mask features (4).
        transformer_dropout, transformer_nheads, transformer_dim_feedforward,
        transformer_enc_layers, transformer_n_points: the deformable encoder.
        amp: run under an enclosing autocast in low precision. False (published behaviour)
            runs the pixel decoder in fp32 even inside autocast.

    ``forward(features)`` returns ``(mask_features [B, mask_dim, H/s, W/s],
    multi_scale_features)``: three ``[B, conv_dim, h, w]`` maps, lowest resolution first.
    """

    def __init__(
        self,
        input_shape: Mapping[str, Any],
        *,
        conv_dim: int = 256,
        mask_dim: int = 256,
        norm: str = "GN",
        transformer_in_features: tuple[str, ...] | list[str] = ("res3", "res4", "res5"),
        common_stride: int = 4,
        transformer_dropout: float = 0.0,
        transformer_nheads: int = 8,
        transformer_dim_feedforward: int = 1024,
        transformer_enc_layers: int = 6,
        transformer_n_points: int = 4,
        amp: bool = False,
    ):
        super().__init__()
        self.amp = amp
        shapes = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [k for k, _ in shapes]  # "res2" ... "res5"
        feature_channels = [v.channels for _, v in shapes]
        tr_shapes = [(k, v) for k, v in shapes if k in transformer_in_features]
        self.transformer_in_features = [k for k, _ in tr_shapes]
        tr_channels = [v.channels for _, v in tr_shapes]
        tr_strides = [v.stride for _, v in tr_shapes]
        self.transformer_num_feature_levels = len(self.transformer_in_features)

        # from low to high resolution (res5 first), as published
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
            for c in tr_channels[::-1]
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim,
            nhead=transformer_nheads,
            num_encoder_layers=transformer_enc_layers,
            dim_feedforward=transformer_dim_feedforward,
            dropout=transformer_dropout,
            num_feature_levels=self.transformer_num_feature_levels,
            enc_n_points=transformer_n_points,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        self.mask_dim = mask_dim
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        c2_xavier_fill(self.mask_features)

        self.maskformer_num_feature_levels = 3  # the transformer decoder always uses 3 scales
        self.common_stride = common_stride
        self.num_fpn_levels = int(math.log2(min(tr_strides)) - math.log2(common_stride))
        use_bias = norm == ""
        for idx, in_channels in enumerate(feature_channels[: self.num_fpn_levels]):
            lateral = Conv2dNorm(
                in_channels, conv_dim, kernel_size=1, bias=use_bias, norm=_norm(norm, conv_dim)
            )
            output = Conv2dNorm(
                conv_dim,
                conv_dim,
                kernel_size=3,
                padding=1,
                bias=use_bias,
                norm=_norm(norm, conv_dim),
                activation=True,
            )
            c2_xavier_fill(lateral)
            c2_xavier_fill(output)
            self.add_module(f"adapter_{idx + 1}", lateral)
            self.add_module(f"layer_{idx + 1}", output)

    def forward(self, features: Mapping[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Backbone features (name -> ``[B, C, h, w]``) to mask features and 3 scales."""
        if self.amp:
            return self._forward(features)
        device_type = next(iter(features.values())).device.type
        with torch.autocast(device_type, enabled=False):
            return self._forward({k: v.float() for k, v in features.items()})

    def _forward(self, features: Mapping[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        srcs, pos = [], []
        for idx, name in enumerate(self.transformer_in_features[::-1]):
            x = features[name]
            srcs.append(self.input_proj[idx](x))
            pos.append(self.pe_layer(x))
        y, spatial_shapes = self.transformer(srcs, pos)
        B = y.shape[0]
        out = [
            z.transpose(1, 2).reshape(B, -1, h, w)
            for z, (h, w) in zip(y.split([h * w for h, w in spatial_shapes], dim=1), spatial_shapes)
        ]
        # top-down (low to high resolution): adapter_1 / layer_1 belong to the highest resolution
        for i in range(self.num_fpn_levels, 0, -1):
            cur = getattr(self, f"adapter_{i}")(features[self.in_features[i - 1]])
            # bilinear (not nearest, despite "FPN"), as in the published model
            y = cur + F.interpolate(
                out[-1], size=cur.shape[-2:], mode="bilinear", align_corners=False
            )
            out.append(getattr(self, f"layer_{i}")(y))
        multi_scale_features = out[: self.maskformer_num_feature_levels]
        return self.mask_features(out[-1]), multi_scale_features
