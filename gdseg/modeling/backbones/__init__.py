"""Backbones: images -> {"res2", "res3", "res4", "res5"} feature maps at strides 4..32."""

from .base import Backbone, ShapeSpec
from .build import BACKBONE_REGISTRY, backbone_family, build_backbone, canonical_name
from .convert import backbone_from_transformers, backbone_state_dict_from_detectron2
from .mobilenet import MobileNetV2
from .resnet import ResNet, build_resnet
from .swin import SwinTransformer, build_swin
from .vit import ViTAdapter, build_vit
from .weights import LoadReport, load_pretrained_backbone, read_state_dict, resolve_weights

__all__ = [
    "BACKBONE_REGISTRY",
    "Backbone",
    "LoadReport",
    "MobileNetV2",
    "ResNet",
    "ShapeSpec",
    "SwinTransformer",
    "ViTAdapter",
    "backbone_family",
    "backbone_from_transformers",
    "backbone_state_dict_from_detectron2",
    "build_backbone",
    "build_resnet",
    "build_swin",
    "build_vit",
    "canonical_name",
    "load_pretrained_backbone",
    "read_state_dict",
    "resolve_weights",
]
