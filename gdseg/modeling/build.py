"""``build_model(cfg)``: the only place that reads the model config keys."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .backbones import build_backbone
from .mask2former import Mask2Former, MaskFormerHead
from .pixel_decoder import MSDeformAttnPixelDecoder
from .transformer_decoder import MultiScaleMaskedTransformerDecoder

__all__ = ["build_model", "build_pixel_decoder", "build_sem_seg_head", "build_transformer_decoder"]

logger = logging.getLogger(__name__)


def build_pixel_decoder(cfg, input_shape: Mapping[str, Any]) -> MSDeformAttnPixelDecoder:
    """Pixel decoder from ``MODEL.SEM_SEG_HEAD.*`` (``input_shape``: name -> ShapeSpec)."""
    head = cfg.MODEL.SEM_SEG_HEAD
    if head.PIXEL_DECODER_NAME != "MSDeformAttnPixelDecoder":
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME must be 'MSDeformAttnPixelDecoder', got {head.PIXEL_DECODER_NAME!r}"
        )
    missing = [f for f in head.IN_FEATURES if f not in input_shape]
    if missing:
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.IN_FEATURES {missing} are not backbone outputs {sorted(input_shape)}"
        )
    return MSDeformAttnPixelDecoder(
        {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
        conv_dim=head.CONVS_DIM,
        mask_dim=head.MASK_DIM,
        norm=head.NORM,
        transformer_in_features=tuple(head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES),
        common_stride=head.COMMON_STRIDE,
        transformer_dropout=cfg.MODEL.MASK_FORMER.DROPOUT,
        # the published pixel decoder takes its heads from MASK_FORMER.NHEADS
        transformer_nheads=cfg.MODEL.MASK_FORMER.NHEADS,
        transformer_dim_feedforward=head.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD,
        transformer_enc_layers=head.TRANSFORMER_ENC_LAYERS,
        transformer_n_points=head.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS,
        amp=head.PIXEL_DECODER_AMP,
    )


def build_transformer_decoder(cfg, in_channels: int) -> MultiScaleMaskedTransformerDecoder:
    """Masked-attention decoder from ``MODEL.MASK_FORMER.*``."""
    mf = cfg.MODEL.MASK_FORMER
    if mf.TRANSFORMER_DECODER_NAME != "MultiScaleMaskedTransformerDecoder":
        raise ValueError(
            "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME must be 'MultiScaleMaskedTransformerDecoder', "
            f"got {mf.TRANSFORMER_DECODER_NAME!r}"
        )
    if mf.DEC_LAYERS < 1:
        raise ValueError(f"MODEL.MASK_FORMER.DEC_LAYERS must be >= 1, got {mf.DEC_LAYERS}")
    return MultiScaleMaskedTransformerDecoder(
        in_channels,
        num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
        hidden_dim=mf.HIDDEN_DIM,
        num_queries=mf.NUM_OBJECT_QUERIES,
        nheads=mf.NHEADS,
        dim_feedforward=mf.DIM_FEEDFORWARD,
        # DEC_LAYERS counts predictions: the learnable queries' one plus one per layer
        dec_layers=mf.DEC_LAYERS - 1,
        pre_norm=mf.PRE_NORM,
        mask_dim=cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
        enforce_input_project=mf.ENFORCE_INPUT_PROJ,
        # the published decoder layers hard-code dropout 0 (MASK_FORMER.DROPOUT is the encoder's)
        dropout=0.0,
    )


def build_sem_seg_head(cfg, input_shape: Mapping[str, Any]) -> MaskFormerHead:
    """Pixel decoder + transformer decoder for backbone outputs ``input_shape``."""
    pixel_decoder = build_pixel_decoder(cfg, input_shape)
    predictor = build_transformer_decoder(cfg, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM)
    return MaskFormerHead(pixel_decoder, predictor)


def build_model(cfg) -> Mask2Former:
    """Mask2Former with the backbone ``MODEL.BACKBONE.NAME`` (random init; weights are loaded
    separately, e.g. by the checkpointer or :mod:`gdseg.convert`)."""
    if cfg.MODEL.META_ARCHITECTURE != "MaskFormer":
        raise ValueError(
            f"MODEL.META_ARCHITECTURE must be 'MaskFormer', got {cfg.MODEL.META_ARCHITECTURE!r}"
        )
    backbone = build_backbone(cfg)
    model = Mask2Former(backbone, build_sem_seg_head(cfg, backbone.output_shape()))
    logger.debug("built Mask2Former with %d parameters", sum(p.numel() for p in model.parameters()))
    return model
