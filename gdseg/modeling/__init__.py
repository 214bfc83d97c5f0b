"""Mask2Former in plain PyTorch: backbones, pixel decoder, transformer decoder, criterion."""

from .backbones import build_backbone
from .build import build_model, build_sem_seg_head
from .criterion import build_criterion
from .mask2former import Mask2Former, MaskFormerHead
from .postprocess import instance_inference
from .preprocess import batch_images, pad_targets

__all__ = [
    "Mask2Former",
    "MaskFormerHead",
    "batch_images",
    "build_backbone",
    "build_criterion",
    "build_model",
    "build_sem_seg_head",
    "instance_inference",
    "pad_targets",
]
