"""Mask2Former meta-architecture: backbone -> pixel decoder -> masked-attention decoder.

The network only maps normalized images to predictions: no loss, no config, no training
state. Losses live in :mod:`gdseg.modeling.criterion`, inference in
:mod:`gdseg.modeling.postprocess`.
"""

from __future__ import annotations

from torch import Tensor, nn

from .pixel_decoder import MSDeformAttnPixelDecoder
from .transformer_decoder import MultiScaleMaskedTransformerDecoder

__all__ = ["Mask2Former", "MaskFormerHead"]


class MaskFormerHead(nn.Module):
    """Holds the pixel decoder and the transformer decoder (``predictor``), so parameter names
    are ``sem_seg_head.pixel_decoder.*`` / ``sem_seg_head.predictor.*`` as published."""

    def __init__(
        self, pixel_decoder: MSDeformAttnPixelDecoder, predictor: MultiScaleMaskedTransformerDecoder
    ):
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor

    def forward(self, features: dict[str, Tensor]) -> dict:
        """Backbone features -> predictions (see :meth:`Mask2Former.forward`)."""
        mask_features, multi_scale_features = self.pixel_decoder(features)
        return self.predictor(multi_scale_features, mask_features)


class Mask2Former(nn.Module):
    """Mask2Former for instance segmentation.

    Args:
        backbone: module with ``forward(x) -> {"res2": ..., "res5": ...}`` (strides 4..32).
        sem_seg_head: :class:`MaskFormerHead`.

    ``forward(images)``: ``images`` is ``[B, 3, H, W]`` normalized float with H and W multiples
    of 32. In train and in eval mode it returns ``{"pred_logits": [B, Q, K+1],
    "pred_masks": [B, Q, H/4, W/4], "aux_outputs": [{"pred_logits", "mask_embed"}] * (L - 1)}``
    (mask logits, not probabilities; the last class is "no object"; ``aux_outputs`` holds the
    predictions of the learnable queries and of every decoder layer but the last). Every
    prediction also holds its ``"mask_embed"`` ``[B, Q, C]`` and the output holds
    ``"mask_features"`` ``[B, C, H/4, W/4]``, with ``pred_masks = mask_embed @ mask_features``:
    the criterion recomputes the few masks it trains from them, and the auxiliary predictions
    leave their full-resolution masks unformed
    (:func:`gdseg.modeling.transformer_decoder.predicted_masks` forms them).
    """

    def __init__(self, backbone: nn.Module, sem_seg_head: MaskFormerHead):
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head

    @property
    def size_divisibility(self) -> int:
        """Inputs must be padded to a multiple of this."""
        return max(32, int(getattr(self.backbone, "size_divisibility", 32)))

    def forward(self, images: Tensor) -> dict:
        d = self.size_divisibility
        if images.dim() != 4 or images.shape[-2] % d or images.shape[-1] % d:
            raise ValueError(
                f"images must be [B, 3, H, W] with H and W multiples of {d}, got {tuple(images.shape)}"
            )
        return self.sem_seg_head(self.backbone(images))
