"""``build_backbone(cfg)``: the backbone registry keyed by ``cfg.MODEL.BACKBONE.NAME``."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable

from .base import Backbone
from .mobilenet import MobileNetV2
from .resnet import RESNET_DEPTHS, build_resnet
from .swin import SWIN_PRESETS, SwinTransformer
from .vit import VIT_PRESETS, ViTAdapter

logger = logging.getLogger(__name__)

# detectron2 / published Guided Distillation names -> ours.
ALIASES = {
    "build_resnet_backbone": "resnet",
    "D2SwinTransformer": "swin",
    "ViTBaseBackbone": "vit_base",
    "ViTLargeBackbone": "vit_large",
    "DeiTBaseBackbone": "deit_base",
    "DinoV2BaseBackbone": "dinov2_base",
    "DinoV2LargeBackbone": "dinov2_large",
}

BACKBONE_REGISTRY: dict[str, Callable[..., Backbone]] = {}
_FAMILY: dict[str, str] = {}


def register_backbone(name: str, family: str) -> Callable:
    """Decorator registering ``fn(cfg) -> Backbone`` under ``name`` (family: how its weights
    are named: "resnet", "swin", "vit" or "mobilenet")."""

    def deco(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
        BACKBONE_REGISTRY[name] = fn
        _FAMILY[name] = family
        return fn

    return deco


def canonical_name(name: str) -> str:
    """Resolve aliases; raise ``KeyError`` naming valid names and close matches if unknown."""
    name = ALIASES.get(name, name)
    if name not in BACKBONE_REGISTRY:
        valid = sorted(BACKBONE_REGISTRY) + sorted(ALIASES)
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(
            f"Unknown MODEL.BACKBONE.NAME {name!r}.{hint} Valid names: {', '.join(valid)}"
        )
    return name


def backbone_family(name: str) -> str:
    """ "resnet", "swin", "vit" or "mobilenet" for a backbone name or alias."""
    return _FAMILY[canonical_name(name)]


def build_backbone(cfg) -> Backbone:
    """Build the backbone named by ``cfg.MODEL.BACKBONE.NAME`` (random init, offline).

    Pretrained weights are loaded separately (``load_pretrained_backbone``).
    """
    name = canonical_name(cfg.MODEL.BACKBONE.NAME)
    if cfg.MODEL.BACKBONE.FREEZE_AT and _FAMILY[name] not in ("resnet", "mobilenet"):
        logger.warning(
            "MODEL.BACKBONE.FREEZE_AT only applies to ResNets and MobileNetV2; ignored for %s",
            name,
        )
    return BACKBONE_REGISTRY[name](cfg)


def _default(key: str):
    from gdseg.config import get_cfg

    node = get_cfg()
    for part in key.split("."):
        node = node[part]
    return tuple(node) if isinstance(node, (list, tuple)) else node


def _check_preset(cfg, name: str, values: dict[str, object]) -> None:
    """A preset fixes the architecture: refuse config keys set to something else."""
    for key, preset_value in values.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        given = tuple(node) if isinstance(node, (list, tuple)) else node
        if given != _default(key) and given != preset_value:
            raise ValueError(
                f"{key}={given} contradicts MODEL.BACKBONE.NAME={name!r} ({preset_value}); "
                f"remove the key or pick another backbone name"
            )


# -- ResNet -------------------------------------------------------------------------------------
def _resnet_kwargs(cfg) -> dict:
    r = cfg.MODEL.RESNETS
    if tuple(r.RES5_MULTI_GRID) != (1, 1, 1) or r.STEM_TYPE != "basic":
        raise ValueError("Only RES5_MULTI_GRID (1, 1, 1) and STEM_TYPE 'basic' are supported")
    return {
        "norm": r.NORM,
        "freeze_at": cfg.MODEL.BACKBONE.FREEZE_AT,
        "stride_in_1x1": r.STRIDE_IN_1X1,
    }


@register_backbone("resnet", "resnet")
def _resnet_from_depth(cfg) -> Backbone:
    return build_resnet(cfg.MODEL.RESNETS.DEPTH, **_resnet_kwargs(cfg))


def _register_resnet(depth: int) -> None:
    @register_backbone(f"resnet{depth}", "resnet")
    def _build(cfg) -> Backbone:
        _check_preset(cfg, f"resnet{depth}", {"MODEL.RESNETS.DEPTH": depth})
        return build_resnet(depth, **_resnet_kwargs(cfg))


for _depth in RESNET_DEPTHS:
    _register_resnet(_depth)


# -- Swin ---------------------------------------------------------------------------------------
def _swin_kwargs(cfg) -> dict:
    s = cfg.MODEL.SWIN
    if tuple(s.OUT_FEATURES) != ("res2", "res3", "res4", "res5"):
        raise ValueError(f"MODEL.SWIN.OUT_FEATURES must be res2..res5, got {s.OUT_FEATURES}")
    return {
        "patch_size": s.PATCH_SIZE,
        "mlp_ratio": s.MLP_RATIO,
        "qkv_bias": s.QKV_BIAS,
        "qk_scale": s.QK_SCALE,
        "drop_rate": s.DROP_RATE,
        "attn_drop_rate": s.ATTN_DROP_RATE,
        "drop_path_rate": s.DROP_PATH_RATE,
        "ape": s.APE,
        "patch_norm": s.PATCH_NORM,
        "use_checkpoint": s.USE_CHECKPOINT,
    }


_SWIN_ARCH_KEYS = ("EMBED_DIM", "DEPTHS", "NUM_HEADS", "WINDOW_SIZE", "PRETRAIN_IMG_SIZE")


@register_backbone("swin", "swin")
def _swin_from_keys(cfg) -> Backbone:
    s = cfg.MODEL.SWIN
    arch = [s[k] for k in _SWIN_ARCH_KEYS]
    return SwinTransformer(*arch, **_swin_kwargs(cfg))


def _register_swin(name: str) -> None:
    @register_backbone(name, "swin")
    def _build(cfg) -> Backbone:
        preset = SWIN_PRESETS[name]
        _check_preset(cfg, name, {f"MODEL.SWIN.{k}": v for k, v in zip(_SWIN_ARCH_KEYS, preset)})
        return SwinTransformer(*preset, **_swin_kwargs(cfg))


for _name in SWIN_PRESETS:
    _register_swin(_name)


# -- plain ViTs ---------------------------------------------------------------------------------
def _vit(cfg, timm_name: str) -> Backbone:
    v = cfg.MODEL.VIT
    return ViTAdapter(
        v.TIMM_NAME or timm_name,
        out_channels=v.OUT_CHANNELS,
        img_size=v.IMG_SIZE,
        drop_path_rate=v.DROP_PATH_RATE,
        freeze=v.FREEZE,
    )


@register_backbone("vit", "vit")
def _vit_from_timm_name(cfg) -> Backbone:
    if not cfg.MODEL.VIT.TIMM_NAME:
        raise ValueError("MODEL.BACKBONE.NAME 'vit' needs MODEL.VIT.TIMM_NAME (a timm ViT name)")
    return _vit(cfg, cfg.MODEL.VIT.TIMM_NAME)


def _register_vit(name: str) -> None:
    @register_backbone(name, "vit")
    def _build(cfg) -> Backbone:
        return _vit(cfg, VIT_PRESETS[name])


for _name in VIT_PRESETS:
    _register_vit(_name)


# -- small CNNs ---------------------------------------------------------------------------------
@register_backbone("mobilenet_v2", "mobilenet")
def _mobilenet_v2(cfg) -> Backbone:
    return MobileNetV2(norm=cfg.MODEL.RESNETS.NORM, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
