"""Batching of loader outputs: normalization, padding to a common size, padded targets."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["batch_images", "pad_targets"]


MIN_SIZE_DIVISIBILITY = 32  # the backbone's largest stride: inputs must be multiples of it


def batch_images(
    images: Sequence[Tensor],
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    size_divisibility: int = 32,
) -> tuple[Tensor, list[tuple[int, int]]]:
    """Normalize and pad images into one batch (detectron2 ``ImageList`` semantics).

    Args:
        images: ``[3, Hi, Wi]`` uint8 (or float 0-255) RGB tensors, all on one device.
        pixel_mean, pixel_std: per-channel statistics in 0-255 units.
        size_divisibility: the padded height and width are multiples of this; values below
            32 (e.g. the published -1) mean 32, the stride the network needs.

    Returns:
        ``[B, 3, Hp, Wp]`` float32, normalized then zero-padded at the bottom/right, and the
        unpadded ``(Hi, Wi)`` of every image.
    """
    if len(images) == 0:
        raise ValueError("batch_images needs at least one image")
    device = images[0].device
    mean = torch.as_tensor(pixel_mean, dtype=torch.float32, device=device).view(-1, 1, 1)
    std = torch.as_tensor(pixel_std, dtype=torch.float32, device=device).view(-1, 1, 1)
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    div = max(int(size_divisibility), MIN_SIZE_DIVISIBILITY)
    hp = -(-max(h for h, _ in sizes) // div) * div
    wp = -(-max(w for _, w in sizes) // div) * div
    batch = torch.zeros(len(images), 3, hp, wp, dtype=torch.float32, device=device)
    for i, (im, (h, w)) in enumerate(zip(images, sizes)):
        batch[i, :, :h, :w] = (im.float() - mean) / std
    return batch, sizes


def pad_targets(instances: Sequence[dict], padded_hw: tuple[int, int]) -> list[dict]:
    """Zero-pad instance masks to the padded frame of the batch.

    Args:
        instances: per image ``{"labels": LongTensor[N], "masks": BoolTensor[N, H, W]}``.
        padded_hw: ``(Hp, Wp)`` of the batch (>= every H, W).

    Returns:
        Per image ``{"labels": LongTensor[N], "masks": BoolTensor[N, Hp, Wp]}``.
    """
    hp, wp = padded_hw
    out = []
    for inst in instances:
        masks = inst["masks"]
        h, w = masks.shape[-2:]
        if h > hp or w > wp:
            raise ValueError(f"masks of size {(h, w)} do not fit the padded size {(hp, wp)}")
        padded = masks.new_zeros((masks.shape[0], hp, wp), dtype=torch.bool)
        padded[:, :h, :w] = masks
        out.append({"labels": inst["labels"].long(), "masks": padded})
    return out
