"""Dataset record -> the dict a loader yields (see the contract's "Loader output").

Masks are decoded from polygons / RLE at the original image size and then go through the same
``torchvision.transforms.v2`` pipeline as the image (as ``tv_tensors.Mask``), so they stay
pixel-aligned. Crowd regions never become targets. Every mapper takes an optional ``seed``:
with it, the augmentation is a deterministic function of the seed (see ``seeded_rng``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from .coco import decode_mask
from .transforms import (
    build_strong_transforms,
    build_transforms,
    build_weak_transforms,
    seeded_rng,
)
from .validation import read_image

__all__ = [
    "InstanceMapper",
    "InferenceMapper",
    "UnlabeledMapper",
    "build_test_mapper",
    "build_train_mapper",
    "build_unlabeled_mapper",
    "decode_instances",
    "load_image",
]

logger = logging.getLogger(__name__)

Record = Mapping[str, Any]


def load_image(record: Record) -> torch.Tensor:
    """Read the record's image as uint8 Tensor[3, H, W] (RGB, EXIF orientation applied).

    The tensor is a channels-last view of the decoded [H, W, 3] array: torch's uint8 resize is
    several times faster on that layout than on a contiguous [3, H, W] copy.

    Raises:
        DataError: missing/unreadable file, or a size differing from the record's height/width.
    """
    expected = None
    if record.get("height") and record.get("width"):
        expected = (int(record["height"]), int(record["width"]))
    arr = read_image(
        record["file_name"], record=f"image id {record.get('image_id')}", expected_hw=expected
    )
    if not arr.flags.writeable:  # arrays viewing PIL's buffer are read-only
        arr = arr.copy()
    return torch.from_numpy(arr).permute(2, 0, 1)


def decode_instances(record: Record, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-crowd annotations -> (labels LongTensor[N], masks BoolTensor[N, height, width])."""
    anns = [a for a in record.get("annotations", ()) if not a.get("iscrowd", 0)]
    labels = torch.tensor([int(a["category_id"]) for a in anns], dtype=torch.long)
    if not anns:
        return labels, torch.zeros((0, height, width), dtype=torch.bool)
    masks = np.stack([decode_mask(a, height, width) for a in anns])
    return labels, torch.from_numpy(masks.view(np.bool_))  # decode_mask gives 0/1


def _plain(t: torch.Tensor) -> torch.Tensor:
    """tv_tensors -> plain contiguous tensors (no subclass dispatch downstream)."""
    return t.as_subclass(torch.Tensor).contiguous()


class InstanceMapper:
    """Labeled record -> ``{"image", "instances": {"labels", "masks"}, "image_id", ...}``.

    Args:
        transforms: geometric + photometric pipeline called as ``transforms(image, masks)``.
        image_loader: record -> uint8 Tensor[3, H, W] (default: :func:`load_image`).

    Instances whose mask is empty after augmentation (cropped away) are dropped.
    """

    def __init__(
        self,
        transforms: v2.Transform,
        image_loader: Callable[[Record], torch.Tensor] = load_image,
    ) -> None:
        self.transforms = transforms
        self.image_loader = image_loader

    def __call__(self, record: Record, seed: int | None = None) -> dict[str, Any]:
        image = self.image_loader(record)
        height, width = image.shape[-2:]
        labels, masks = decode_instances(record, height, width)
        with seeded_rng(seed):
            image, masks = self.transforms(tv_tensors.Image(image), tv_tensors.Mask(masks))
        masks = _plain(masks)
        # amax over a uint8 view is ~20x faster than any() over bool on CPU.
        keep = masks.view(torch.uint8).flatten(1).amax(1) > 0
        return {
            "image": _plain(image),
            "instances": {"labels": labels[keep], "masks": masks[keep]},
            "image_id": record.get("image_id"),
            "file_name": record["file_name"],
            "height": int(height),
            "width": int(width),
        }


class UnlabeledMapper:
    """Unlabeled record -> ``{"image_weak", "image_strong", "image_id", "file_name", ...}``.

    One geometric (weak) view is drawn; the strong view is the weak view after photometric ops
    only, so both share geometry pixel for pixel. Annotations, if any, are ignored.

    Args:
        weak_transforms: geometric pipeline (no photometric change) for the teacher's view.
        strong_transforms: photometric pipeline applied on top of the weak view (student).
        image_loader: record -> uint8 Tensor[3, H, W].
    """

    def __init__(
        self,
        weak_transforms: v2.Transform,
        strong_transforms: v2.Transform,
        image_loader: Callable[[Record], torch.Tensor] = load_image,
    ) -> None:
        self.weak_transforms = weak_transforms
        self.strong_transforms = strong_transforms
        self.image_loader = image_loader

    def __call__(self, record: Record, seed: int | None = None) -> dict[str, Any]:
        image = self.image_loader(record)
        height, width = image.shape[-2:]
        with seeded_rng(seed):
            weak = self.weak_transforms(tv_tensors.Image(image))
            strong = self.strong_transforms(weak)
        return {
            "image_weak": _plain(weak),
            "image_strong": _plain(strong),
            "image_id": record.get("image_id"),
            "file_name": record["file_name"],
            "height": int(height),
            "width": int(width),
        }


class InferenceMapper:
    """Record -> ``{"image", "image_id", "file_name", "height", "width"}`` (test-time resize).

    ``height`` / ``width`` are the original size, the size predictions are resized back to.
    """

    def __init__(
        self,
        transforms: v2.Transform,
        image_loader: Callable[[Record], torch.Tensor] = load_image,
    ) -> None:
        self.transforms = transforms
        self.image_loader = image_loader

    def __call__(self, record: Record, seed: int | None = None) -> dict[str, Any]:
        image = self.image_loader(record)
        height, width = image.shape[-2:]
        with seeded_rng(seed):
            image = self.transforms(tv_tensors.Image(image))
        return {
            "image": _plain(image),
            "image_id": record.get("image_id"),
            "file_name": record["file_name"],
            "height": int(height),
            "width": int(width),
        }


def build_train_mapper(cfg: Any) -> InstanceMapper:
    """Labeled-stream mapper from ``INPUT.*``."""
    return InstanceMapper(build_transforms(cfg, is_train=True))


def build_unlabeled_mapper(cfg: Any) -> UnlabeledMapper:
    """Unlabeled-stream mapper: the training geometry as weak view, SPEC §2 strong ops."""
    return UnlabeledMapper(build_weak_transforms(cfg), build_strong_transforms(cfg))


def build_test_mapper(cfg: Any) -> InferenceMapper:
    """Inference mapper: shorter side ``INPUT.MIN_SIZE_TEST``, longer <= ``INPUT.MAX_SIZE_TEST``."""
    return InferenceMapper(build_transforms(cfg, is_train=False))
