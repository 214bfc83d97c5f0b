"""Overlays of predicted instances: coloured masks, boxes, "class score" captions.

Drawing is torchvision's (``draw_segmentation_masks`` / ``draw_bounding_boxes``); this module
only picks colours (fixed per class, so one class has one colour across images) and captions.
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.ops import masks_to_boxes
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

__all__ = ["class_color", "draw_instances", "save_image"]


def class_color(label: int) -> tuple[int, int, int]:
    """A saturated RGB colour per class; golden-ratio hue steps keep neighbours distinct."""
    hue = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _caption_font() -> str | None:
    """A TrueType font file (DejaVu Sans, shipped with matplotlib) or None for PIL's default.

    torchvision's default bitmap font has a fixed ~10 px size, unreadable on large photos.
    """
    try:
        import matplotlib
    except ImportError:
        return None
    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
    return path if os.path.isfile(path) else None


def draw_instances(
    image: torch.Tensor,
    masks: torch.Tensor,
    labels: Sequence[int],
    scores: Sequence[float],
    class_names: Sequence[str],
    alpha: float = 0.5,
) -> torch.Tensor:
    """Draws instances on an image.

    Args:
        image: uint8 Tensor[3, H, W] (RGB).
        masks: bool Tensor[N, H, W].
        labels: N contiguous class indices.
        scores: N scores in [0, 1].
        class_names: name of every class index.
        alpha: mask opacity.

    Returns:
        uint8 Tensor[3, H, W], the overlay.
    """
    nonempty = masks.flatten(1).any(1) if masks.numel() else torch.zeros(0, dtype=torch.bool)
    idx = torch.nonzero(nonempty).flatten().tolist()
    if not idx:
        return image.clone()
    masks = masks[idx].bool()
    labels = [int(labels[i]) for i in idx]
    scores = [float(scores[i]) for i in idx]
    colors = [class_color(c) for c in labels]
    out = draw_segmentation_masks(image, masks, alpha=alpha, colors=colors)
    names = [class_names[c] if 0 <= c < len(class_names) else f"class_{c}" for c in labels]
    captions = [f"{n} {s:.2f}" for n, s in zip(names, scores)]
    font = _caption_font()
    size = max(10, round(min(image.shape[-2:]) / 40))  # scale captions with the image
    return draw_bounding_boxes(
        out,
        masks_to_boxes(masks),
        labels=captions,
        colors=colors,
        width=max(1, size // 6),
        font=font,
        font_size=size if font else None,
        label_colors="white",
        fill_labels=True,
        label_background_colors=colors,
    )


def save_image(image: torch.Tensor, path: str | os.PathLike) -> None:
    """Saves a uint8 Tensor[3, H, W] as PNG/JPEG (by extension), creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())).save(path)
