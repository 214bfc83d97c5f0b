"""Backbone weights from other implementations: transformers modules and detectron2 names.

- :func:`backbone_from_transformers` builds our backbone equal to a transformers
  ``ResNetBackbone`` / ``SwinBackbone`` (as used inside
  ``Mask2FormerForUniversalSegmentation``) and copies its weights.
- :func:`backbone_state_dict_from_detectron2` renames published detectron2 backbone keys
  (Mask2Former / Guided Distillation checkpoints) to ours.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from .base import Backbone
from .build import backbone_family
from .resnet import ResNet
from .swin import SwinTransformer

# --------------------------------------------------------------------------------------------
# detectron2 -> ours


def _d2_resnet_key(key: str) -> str | None:
    """detectron2 ResNet name -> torchvision name (None if it is not a ResNet key)."""
    m = re.fullmatch(r"stem\.conv1\.(weight|norm\.(\w+))", key)
    if m:
        return "conv1.weight" if m.group(1) == "weight" else f"bn1.{m.group(2)}"
    m = re.fullmatch(r"res([2-5])\.(\d+)\.(conv[1-3]|shortcut)\.(weight|norm\.(\w+))", key)
    if not m:
        return None
    stage, block, conv, attr = int(m.group(1)) - 1, m.group(2), m.group(3), m.group(4)
    if conv == "shortcut":
        module, norm = "downsample.0", "downsample.1"
    else:
        module, norm = conv, f"bn{conv[-1]}"
    name = f"{module}.weight" if attr == "weight" else f"{norm}.{m.group(5)}"
    return f"layer{stage}.{block}.{name}"


_SWIN_KEY = re.compile(
    r"patch_embed\.(proj|norm)\.(weight|bias)"
    r"|absolute_pos_embed"
    r"|layers\.\d+\.blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
    r"|layers\.\d+\.blocks\.\d+\.attn\.relative_position_(bias_table|index)"
    r"|layers\.\d+\.downsample\.(reduction\.weight|norm\.(weight|bias))"
    r"|norm[0-3]\.(weight|bias)"
)
_VIT_KEY = re.compile(r"model\.\S+|convs\.[0-3]\.(weight|bias)")
_MOBILENET_KEY = re.compile(r"features\.\S+")


def _identity_if(pattern: re.Pattern) -> Callable[[str], str | None]:
    return lambda key: key if pattern.fullmatch(key) else None


D2_KEY_MAPPERS: dict[str, Callable[[str], str | None]] = {
    "resnet": _d2_resnet_key,
    "swin": _identity_if(_SWIN_KEY),
    "vit": _identity_if(_VIT_KEY),
    "mobilenet": _identity_if(_MOBILENET_KEY),
}


def backbone_state_dict_from_detectron2(
    sd: dict[str, torch.Tensor], name: str
) -> dict[str, torch.Tensor]:
    """Rename a published detectron2 backbone state dict to our backbone's names.

    Args:
        sd: backbone entries, with or without the leading ``"backbone."`` (e.g. the
            ``backbone.*`` part of a Mask2Former / Guided Distillation checkpoint, after
            removing ``modelTeacher.``/``modelStudent.``). Values are passed through unchanged.
        name: our backbone name (``cfg.MODEL.BACKBONE.NAME``: "resnet50", "swin_tiny", ...,
            or the detectron2 aliases "build_resnet_backbone", "D2SwinTransformer").

    Returns:
        The same tensors under our names, without the ``"backbone."`` prefix: ResNet
        ``stem.conv1`` / ``resN.i.convK(.norm)`` / ``shortcut`` become torchvision's
        ``conv1``/``bn1`` / ``layer{N-1}.i.convK``/``bnK`` / ``downsample.0|1``; Swin and ViT
        names are already ours. ``num_batches_tracked`` entries (SyncBN checkpoints) are kept.

    Raises:
        KeyError: a key has no counterpart in our backbone (listed in the message).
    """
    mapper = D2_KEY_MAPPERS[backbone_family(name)]
    out, unknown = {}, []
    for key, value in sd.items():
        short = key[len("backbone.") :] if key.startswith("backbone.") else key
        new = mapper(short)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise KeyError(
            f"{len(unknown)} detectron2 keys have no counterpart in backbone {name!r}: "
            f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''}"
        )
    return out


# --------------------------------------------------------------------------------------------
# transformers -> ours

# (pattern on the start of a transformers name, function of the match -> our prefix).
_Rule = tuple[str, Callable[[re.Match], str]]
_HF_RESNET_RULES: list[_Rule] = [
    (r"embedder\.embedder\.convolution\.", lambda m: "conv1."),
    (r"embedder\.embedder\.normalization\.", lambda m: "bn1."),
    (
        r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.(convolution|normalization)\.",
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.{int(m[3] == 'normalization')}.",
    ),
    (
        r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d)\.(convolution|normalization)\.",
        lambda m: (
            f"layer{int(m[1]) + 1}.{m[2]}."
            f"{'conv' if m[4] == 'convolution' else 'bn'}{int(m[3]) + 1}."
        ),
    ),
]

# For SwinBackbone. Block internals are renamed by _HF_SWIN_BLOCK_RULES, which knows both the
# current (q_proj/o_proj) and the older (self.query/output.dense) transformers names; q, k, v
# are concatenated into our fused qkv afterwards.
_HF_SWIN_RULES: list[_Rule] = [
    (r"swin\.embeddings\.patch_embeddings\.projection\.", lambda m: "patch_embed.proj."),
    (r"swin\.embeddings\.norm\.", lambda m: "patch_embed.norm."),
    (r"hidden_states_norms\.stage(\d)\.", lambda m: f"norm{int(m[1]) - 1}."),
    (r"swin\.encoder\.layers\.(\d+)\.downsample\.", lambda m: f"layers.{m[1]}.downsample."),
    (
        r"swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.",
        lambda m: f"layers.{m[1]}.blocks.{m[2]}.",
    ),
]
_HF_SWIN_BLOCK_RULES = {
    "layernorm_before.": "norm1.",
    "layernorm_after.": "norm2.",
    "attention.q_proj.": "attn.q.",
    "attention.k_proj.": "attn.k.",
    "attention.v_proj.": "attn.v.",
    "attention.self.query.": "attn.q.",
    "attention.self.key.": "attn.k.",
    "attention.self.value.": "attn.v.",
    "attention.o_proj.": "attn.proj.",
    "attention.output.dense.": "attn.proj.",
    "attention.relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
    "attention.self.relative_position_bias_table": "attn.relative_position_bias_table",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
    "intermediate.dense.": "mlp.fc1.",
    "output.dense.": "mlp.fc2.",
}


def _rename(key: str, rules: list[_Rule]) -> tuple[str, str] | None:
    """Apply the first matching rule: returns (our prefix, rest of the key) or None."""
    for pattern, repl in rules:
        m = re.match(pattern, key)
        if m:
            return repl(m), key[m.end() :]
    return None


def _hf_resnet_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        renamed = _rename(key, _HF_RESNET_RULES)
        if renamed is None:
            raise KeyError(f"Unexpected transformers ResNet key {key!r}")
        out[renamed[0] + renamed[1]] = value
    return out


def _hf_swin_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith("swin.layernorm."):
            continue  # SwinModel's final norm; the backbone outputs use hidden_states_norms
        if key.endswith("relative_position_index"):
            continue  # a deterministic buffer we build ourselves
        renamed = _rename(key, _HF_SWIN_RULES)
        if renamed is None:
            raise KeyError(f"Unexpected transformers Swin key {key!r}")
        prefix, rest = renamed
        if ".blocks." in prefix:
            sub = next((k for k in _HF_SWIN_BLOCK_RULES if rest.startswith(k)), None)
            if sub is None:
                raise KeyError(f"Unexpected transformers Swin key {key!r}")
            rest = _HF_SWIN_BLOCK_RULES[sub] + rest[len(sub) :]
        out[prefix + rest] = value
    for key in [k for k in out if ".attn.q." in k]:
        # Our attention uses one fused qkv projection (the detectron2 / original layout).
        k_key, v_key = key.replace(".attn.q.", ".attn.k."), key.replace(".attn.q.", ".attn.v.")
        fused = torch.cat([out.pop(key), out.pop(k_key), out.pop(v_key)], dim=0)
        out[key.replace(".attn.q.", ".attn.qkv.")] = fused
    return out


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise NotImplementedError(f"transformers backbone not supported by gdseg: {what}")


def _resnet_from_hf_config(config, norm: str) -> ResNet:
    _check(config.hidden_act == "relu", f"hidden_act={config.hidden_act!r} (need 'relu')")
    _check(not config.downsample_in_first_stage, "downsample_in_first_stage=True")
    _check(config.num_channels == 3, f"num_channels={config.num_channels}")
    return ResNet(
        block=config.layer_type,
        depths=list(config.depths),
        stage_channels=list(config.hidden_sizes),
        stem_channels=config.embedding_size,
        norm=norm,
        stride_in_1x1=bool(getattr(config, "downsample_in_bottleneck", False)),
    )


def _swin_from_hf_config(config) -> SwinTransformer:
    _check(not config.use_absolute_embeddings, "use_absolute_embeddings=True")
    _check(config.hidden_act == "gelu", f"hidden_act={config.hidden_act!r} (need 'gelu')")
    _check(abs(config.layer_norm_eps - 1e-5) < 1e-12, f"layer_norm_eps={config.layer_norm_eps}")
    _check(config.num_channels == 3, f"num_channels={config.num_channels}")
    _check(len(config.depths) == 4, f"{len(config.depths)} stages (need 4)")
    return SwinTransformer(
        embed_dim=config.embed_dim,
        depths=list(config.depths),
        num_heads=list(config.num_heads),
        window_size=config.window_size,
        pretrain_img_size=config.image_size,
        patch_size=config.patch_size,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=config.qkv_bias,
        drop_rate=config.hidden_dropout_prob,
        attn_drop_rate=config.attention_probs_dropout_prob,
        drop_path_rate=config.drop_path_rate,
    )


def backbone_from_transformers(
    hf_backbone_module: nn.Module, hf_backbone_config, norm: str = "FrozenBN"
) -> Backbone:
    """Our backbone, with the weights of a transformers ``ResNetBackbone`` or ``SwinBackbone``.

    Args:
        hf_backbone_module: the transformers backbone, e.g.
            ``Mask2FormerForUniversalSegmentation.model.pixel_level_module.encoder``.
        hf_backbone_config: its config (``ResNetConfig`` or ``SwinConfig``, i.e.
            ``mask2former_config.backbone_config``). All four stages must be output.
        norm: norm layer of a ResNet ("FrozenBN" = BatchNorm in eval mode, "BN", "SyncBN").

    Returns:
        A :class:`ResNet` or :class:`SwinTransformer` on the module's device and dtype, in
        its train/eval mode, whose features equal the transformers ``feature_maps``.
    """
    model_type = getattr(hf_backbone_config, "model_type", None)
    stages = list(getattr(hf_backbone_config, "out_features", None) or [])
    _check(stages == ["stage1", "stage2", "stage3", "stage4"], f"out_features={stages}")
    sd = hf_backbone_module.state_dict()
    if model_type == "resnet":
        ours: Backbone = _resnet_from_hf_config(hf_backbone_config, norm)
        mapped = _hf_resnet_state_dict(sd)
    elif model_type == "swin":
        ours = _swin_from_hf_config(hf_backbone_config)
        mapped = _hf_swin_state_dict(sd)
    else:
        raise NotImplementedError(
            f"transformers backbone {model_type!r} is not supported; expected 'resnet' or 'swin'"
        )
    ours.load_state_dict(mapped, strict=False)
    missing, unexpected = _load_report(ours, mapped)
    if missing or unexpected:
        raise KeyError(f"transformers import mismatch: missing={missing} unexpected={unexpected}")
    param = next(hf_backbone_module.parameters())
    return ours.to(device=param.device, dtype=param.dtype).train(hf_backbone_module.training)


def _load_report(model: nn.Module, sd: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Keys of ``model`` absent from ``sd`` and keys of ``sd`` absent from ``model``.

    ``num_batches_tracked`` and ``relative_position_index`` are ignored: the first is not
    stored by FrozenBN, the second is a constant we build.
    """

    def ignorable(k: str) -> bool:
        return k.endswith(("num_batches_tracked", "relative_position_index"))

    own = set(model.state_dict())
    missing = sorted(k for k in own - set(sd) if not ignorable(k))
    unexpected = sorted(k for k in set(sd) - own if not ignorable(k))
    return missing, unexpected
