"""Import Mask2Former weights made by other implementations.

- :func:`from_transformers`: a ``transformers.Mask2FormerForUniversalSegmentation`` (ResNet or
  Swin backbone) -> an equivalent gdseg :class:`~gdseg.modeling.Mask2Former`.
- :func:`convert_published_state_dict` / :func:`load_published_state_dict`: published detectron2
  Mask2Former checkpoints and Guided Distillation checkpoints (``modelTeacher.`` /
  ``modelStudent.`` prefixes under ``"model"``) -> our parameter names, strictly.
- :func:`convert_checkpoint`: a weights file -> a gdseg checkpoint file (``gdseg convert``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from .modeling.backbones import backbone_from_transformers, backbone_state_dict_from_detectron2
from .modeling.mask2former import Mask2Former, MaskFormerHead
from .modeling.pixel_decoder import MSDeformAttnPixelDecoder
from .modeling.transformer_decoder import MultiScaleMaskedTransformerDecoder

__all__ = [
    "convert_checkpoint",
    "convert_published_state_dict",
    "from_transformers",
    "head_state_dict_from_transformers",
    "load_published_state_dict",
]

logger = logging.getLogger(__name__)

# Criterion buffers saved by the published code next to the network, and the normalization
# constants some detectron2 files carry: not part of our model (normalization is preprocessing).
_DROPPED_KEYS = ("criterion.empty_weight", "ssl_criterion.empty_weight", "pixel_mean", "pixel_std")
_PREFIXES = {"teacher": "modelTeacher.", "student": "modelStudent."}

# --------------------------------------------------------------------------------------------
# transformers -> gdseg

_Rule = tuple[str, Callable[[re.Match], str]]
_PD, _TD = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."
_HF_HEAD_RULES: list[_Rule] = [
    (
        r"model\.pixel_level_module\.decoder\.input_projections\.(\d+)\.",
        lambda m: f"{_PD}input_proj.{m[1]}.",
    ),
    (
        r"model\.pixel_level_module\.decoder\.level_embed$",
        lambda m: f"{_PD}transformer.level_embed",
    ),
    (
        r"model\.pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.(self_attn\.\w+|self_attn_layer_norm|fc1|fc2|"
        r"final_layer_norm)\.",
        lambda m: f"{_PD}transformer.encoder.layers.{m[1]}.{_HF_ENCODER_NAMES.get(m[2], m[2])}.",
    ),
    (r"model\.pixel_level_module\.decoder\.mask_projection\.", lambda m: f"{_PD}mask_features."),
    (
        r"model\.pixel_level_module\.decoder\.(adapter|layer)_(\d+)\.([01])\.",
        lambda m: f"{_PD}{m[1]}_{m[2]}.{'' if m[3] == '0' else 'norm.'}",
    ),
    (r"model\.transformer_module\.queries_embedder\.", lambda m: f"{_TD}query_embed."),
    (r"model\.transformer_module\.queries_features\.", lambda m: f"{_TD}query_feat."),
    (r"model\.transformer_module\.level_embed\.", lambda m: f"{_TD}level_embed."),
    (
        r"model\.transformer_module\.input_projections\.(\d+)\.",
        lambda m: f"{_TD}input_proj.{m[1]}.",
    ),
    (r"model\.transformer_module\.decoder\.layernorm\.", lambda m: f"{_TD}decoder_norm."),
    (
        r"model\.transformer_module\.decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.",
        lambda m: f"{_TD}mask_embed.layers.{m[1]}.",
    ),
    (
        r"model\.transformer_module\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.",
        lambda m: f"{_TD}transformer_self_attention_layers.{m[1]}.self_attn.out_proj.",
    ),
    (
        r"model\.transformer_module\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.",
        lambda m: f"{_TD}transformer_self_attention_layers.{m[1]}.norm.",
    ),
    (
        r"model\.transformer_module\.decoder\.layers\.(\d+)\.cross_attn\.",
        lambda m: f"{_TD}transformer_cross_attention_layers.{m[1]}.multihead_attn.",
    ),
    (
        r"model\.transformer_module\.decoder\.layers\.(\d+)\.cross_attn_layer_norm\.",
        lambda m: f"{_TD}transformer_cross_attention_layers.{m[1]}.norm.",
    ),
    (
        r"model\.transformer_module\.decoder\.layers\.(\d+)\.(fc1|fc2|final_layer_norm)\.",
        lambda m: f"{_TD}transformer_ffn_layers.{m[1]}.{_HF_FFN_NAMES[m[2]]}.",
    ),
    (r"class_predictor\.", lambda m: f"{_TD}class_embed."),
]
_HF_ENCODER_NAMES = {
    "self_attn_layer_norm": "norm1",
    "fc1": "linear1",
    "fc2": "linear2",
    "final_layer_norm": "norm2",
}
_HF_FFN_NAMES = {"fc1": "linear1", "fc2": "linear2", "final_layer_norm": "norm"}
# transformers' decoder self-attention keeps q, k, v apart; ours is nn.MultiheadAttention's fused layout
_HF_QKV = re.compile(
    r"model\.transformer_module\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)"
)


def head_state_dict_from_transformers(hf_sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename the head entries of a ``Mask2FormerForUniversalSegmentation`` state dict.

    Backbone entries (``model.pixel_level_module.encoder.*``) and the loss buffers
    (``criterion.*``) are skipped; anything else unknown raises ``KeyError``.

    Returns:
        ``sem_seg_head.*`` entries with our (= detectron2's) names.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in hf_sd.items():
        if key.startswith(("model.pixel_level_module.encoder.", "criterion.")):
            continue
        m = _HF_QKV.fullmatch(key)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
            continue
        for pattern, repl in _HF_HEAD_RULES:
            m = re.match(pattern, key)
            if m:
                out[repl(m) + key[m.end() :]] = value
                break
        else:
            raise KeyError(f"Unexpected transformers Mask2Former key {key!r}")
    for (layer, kind), parts in qkv.items():
        name = "in_proj_weight" if kind == "weight" else "in_proj_bias"
        fused = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        out[f"{_TD}transformer_self_attention_layers.{layer}.self_attn.{name}"] = fused
    return out


def from_transformers(hf_model: nn.Module) -> Mask2Former:
    """A gdseg Mask2Former computing the same function as a transformers model.

    Args:
        hf_model: ``transformers.Mask2FormerForUniversalSegmentation`` with a ResNet or Swin
            backbone (``use_timm_backbone=False``), any sizes its config allows.

    Returns:
        :class:`Mask2Former` with copied weights, on the model's device and dtype, in its
        train/eval mode.
    """
    config = hf_model.config
    hf_backbone = hf_model.model.pixel_level_module.encoder
    backbone = backbone_from_transformers(hf_backbone, config.backbone_config)
    if len(config.feature_strides) != 4 or tuple(config.feature_strides) != (4, 8, 16, 32):
        raise NotImplementedError(f"feature_strides {config.feature_strides} (need 4, 8, 16, 32)")
    if config.activation_function != "relu":
        raise NotImplementedError(
            f"activation_function {config.activation_function!r} (need 'relu')"
        )
    pixel_decoder = MSDeformAttnPixelDecoder(
        backbone.output_shape(),
        conv_dim=config.feature_size,
        mask_dim=config.mask_feature_size,
        norm="GN",
        transformer_in_features=("res3", "res4", "res5"),
        common_stride=config.common_stride,
        transformer_dropout=config.dropout,
        transformer_nheads=config.num_attention_heads,
        transformer_dim_feedforward=config.encoder_feedforward_dim,
        transformer_enc_layers=config.encoder_layers,
        transformer_n_points=4,
    )
    predictor = MultiScaleMaskedTransformerDecoder(
        config.feature_size,
        num_classes=config.num_labels,
        hidden_dim=config.hidden_dim,
        num_queries=config.num_queries,
        nheads=config.num_attention_heads,
        dim_feedforward=config.dim_feedforward,
        dec_layers=config.decoder_layers - 1,
        pre_norm=config.pre_norm,
        mask_dim=config.mask_feature_size,
        enforce_input_project=config.enforce_input_projection,
        dropout=config.dropout,
    )
    model = Mask2Former(backbone, MaskFormerHead(pixel_decoder, predictor))
    head = head_state_dict_from_transformers(hf_model.state_dict())
    missing, unexpected = model.sem_seg_head.load_state_dict(
        {k[len("sem_seg_head.") :]: v for k, v in head.items()}, strict=False
    )
    if missing or unexpected:
        raise KeyError(f"transformers import mismatch: missing={missing} unexpected={unexpected}")
    param = next(hf_model.parameters())
    return model.to(device=param.device, dtype=param.dtype).train(hf_model.training)


# --------------------------------------------------------------------------------------------
# published detectron2 / Guided Distillation checkpoints -> gdseg


def _select_model(sd: Mapping[str, Tensor], which: str) -> dict[str, Tensor]:
    """The entries of one model of a (possibly two-model) checkpoint, prefix removed."""
    if which not in ("auto", "teacher", "student"):
        raise ValueError(f"which must be 'auto', 'teacher' or 'student', got {which!r}")
    present = {name for name, prefix in _PREFIXES.items() if any(k.startswith(prefix) for k in sd)}
    if not present:
        if which != "auto":
            raise KeyError(
                f"which={which!r} but the checkpoint has no modelTeacher./modelStudent. entries"
            )
        return dict(sd)
    if which == "auto":
        # a stage-2 checkpoint's result is its student; a stage-1 checkpoint only has a teacher
        which = "student" if "student" in present else "teacher"
    if which not in present:
        # a stage-1 file holds one model, saved as "modelTeacher.": it is the model itself
        (only,) = present
        logger.info("checkpoint has no %s; using its only model (%s)", which, only)
        which = only
    prefix = _PREFIXES[which]
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def convert_published_state_dict(
    sd: Mapping[str, Tensor], backbone_name: str, which: str = "auto"
) -> dict[str, Tensor]:
    """Published Mask2Former / Guided Distillation entries -> our state-dict names.

    Args:
        sd: the checkpoint's ``"model"`` dict (or the whole checkpoint); numpy arrays
            (detectron2 ``.pkl``) are turned into tensors.
        backbone_name: ``cfg.MODEL.BACKBONE.NAME`` of the target model (e.g. "resnet50",
            "swin_tiny" or a detectron2 alias), which decides how backbone keys are renamed.
        which: "teacher", "student" or "auto" (the student if present, else the teacher) for
            Guided Distillation checkpoints; a file holding one model (stage 1) gives that model
            whatever is asked. Ignored for plain Mask2Former checkpoints.

    Returns:
        ``backbone.*`` and ``sem_seg_head.*`` entries for :class:`Mask2Former`.

    Raises:
        KeyError: an entry that is neither backbone, head nor a known criterion buffer.
    """
    if isinstance(sd.get("model"), Mapping):
        sd = sd["model"]
    sd = {
        k: torch.as_tensor(v) for k, v in _select_model(sd, which).items() if k not in _DROPPED_KEYS
    }
    backbone = {k: v for k, v in sd.items() if k.startswith("backbone.")}
    head = {k: v for k, v in sd.items() if k.startswith("sem_seg_head.")}
    other = sorted(set(sd) - set(backbone) - set(head))
    if other:
        raise KeyError(
            f"{len(other)} checkpoint entries are neither backbone nor head: {other[:10]}"
        )
    out = {
        f"backbone.{k}": v
        for k, v in backbone_state_dict_from_detectron2(backbone, backbone_name).items()
    }
    out.update(head)
    return out


def load_published_state_dict(
    sd: Mapping[str, Tensor], cfg_or_model, which: str = "auto"
) -> Mask2Former:
    """Load a published checkpoint into a model, strictly (nothing missing or unexpected).

    Args:
        sd: see :func:`convert_published_state_dict`.
        cfg_or_model: a config (the model is built with ``build_model``) or a
            :class:`Mask2Former` (the backbone's weight layout is inferred from its class).
        which: see :func:`convert_published_state_dict`.

    Returns:
        The model with the weights loaded.
    """
    if isinstance(cfg_or_model, nn.Module):
        model = cfg_or_model
        backbone_name = _backbone_name_of(model.backbone)
    else:
        from .modeling import build_model

        model = build_model(cfg_or_model)
        backbone_name = cfg_or_model.MODEL.BACKBONE.NAME
    converted = convert_published_state_dict(sd, backbone_name, which)
    model.load_state_dict(converted, strict=True)
    return model


def _backbone_name_of(backbone: nn.Module) -> str:
    """A registered backbone name of the same weight family as ``backbone``."""
    from .modeling.backbones import MobileNetV2, ResNet, SwinTransformer, ViTAdapter

    families = (
        (ResNet, "resnet50"),
        (SwinTransformer, "swin_tiny"),
        (ViTAdapter, "vit_base"),
        (MobileNetV2, "mobilenet_v2"),
    )
    for cls, name in families:
        if isinstance(backbone, cls):
            return name
    raise TypeError(f"cannot tell the weight layout of backbone {type(backbone).__name__}")


def convert_checkpoint(src: str, dst: str, cfg, which: str = "auto") -> dict[str, Tensor]:
    """Write a gdseg checkpoint (``{"model", "config", "gdseg_version"}``) from a published
    detectron2 / Guided Distillation weights file (``.pkl`` or ``.pth``).

    The weights are checked by loading them strictly into ``build_model(cfg)``.

    Returns:
        The converted state dict.
    """
    from . import __version__
    from .modeling.backbones import read_state_dict

    model = load_published_state_dict(read_state_dict(src), cfg, which)
    state = model.state_dict()
    torch.save({"model": state, "config": cfg.dump(), "gdseg_version": __version__}, dst)
    logger.info("wrote %s (%d entries) from %s", dst, len(state), src)
    return state


# --------------------------------------------------------------------------------------------
# command line: gdseg convert


def add_convert_args(parser) -> None:
    parser.add_argument(
        "--config-file",
        required=True,
        metavar="FILE",
        help="gdseg config of the target model, e.g. "
        "configs/coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml",
    )
    parser.add_argument(
        "--weights",
        required=True,
        metavar="SRC",
        help="published Mask2Former (.pkl/.pth) or Guided Distillation checkpoint",
    )
    parser.add_argument("--out", required=True, metavar="DST", help="gdseg checkpoint to write")
    parser.add_argument(
        "--which",
        choices=("auto", "teacher", "student"),
        default="auto",
        help="model of a Guided Distillation checkpoint (auto: the student if present)",
    )
    parser.add_argument("opts", nargs="*", default=[], help="KEY VALUE config overrides")


def convert_main(args) -> int:
    from .config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(list(args.opts))
    convert_checkpoint(args.weights, args.out, cfg, which=args.which)
    return 0
