"""Photometric augmentations (colour, grayscale, blur); they never move a pixel.

The ops run on PIL images where PIL's C code is much faster than torch's (HSV conversions,
Gaussian blur), and like the published code, whose strong view is built with PIL ops. Their
randomness comes from torch's global generator, as in torchvision (see ``seeded_rng``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageFilter
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "ColorAugSSD",
    "FromPIL",
    "RandomGaussianBlur",
    "ToPIL",
    "strong_photometric_transforms",
]


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high))


def _to_pil(image: torch.Tensor) -> PIL.Image.Image:
    """uint8 [3, H, W] (contiguous or channels-last) -> RGB PIL image, without a transposing
    copy (merging three planes is ~20x faster than permute + contiguous)."""
    image = image.as_subclass(torch.Tensor)
    hwc = image.permute(1, 2, 0)
    if hwc.is_contiguous():
        return PIL.Image.fromarray(hwc.numpy())
    planes = image.contiguous().numpy()
    return PIL.Image.merge("RGB", [PIL.Image.fromarray(plane) for plane in planes])


def _from_pil(pil: PIL.Image.Image, like: torch.Tensor | None = None) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, H, W] (a ``tv_tensors.Image`` unless ``like`` is plain)."""
    rgb = pil if pil.mode == "RGB" else pil.convert("RGB")
    chw = torch.from_numpy(np.stack([np.asarray(band) for band in rgb.split()]))
    if like is None or isinstance(like, tv_tensors.TVTensor):
        return tv_tensors.Image(chw)
    return chw


class ToPIL(v2.Transform):
    """``tv_tensors.Image`` uint8 [3, H, W] -> RGB PIL image (masks pass through)."""

    _transformed_types = (tv_tensors.Image,)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return _to_pil(inpt)


class FromPIL(v2.Transform):
    """RGB PIL image -> ``tv_tensors.Image`` uint8 [3, H, W]."""

    _transformed_types = (PIL.Image.Image,)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return _from_pil(inpt)


class ColorAugSSD(v2.Transform):
    """SSD-style photometric distortion (detectron2 PointRend ``ColorAugSSDTransform``).

    Each step happens with probability 1/2: brightness (add ``U[-32, 32]``), contrast (multiply
    by ``U[0.5, 1.5]``), saturation (factor ``U[0.5, 1.5]``) and hue (shift of ``U[-18, 18]``
    OpenCV units = ``U[-0.1, 0.1]`` of the hue circle), contrast either before or after the
    other two. Saturation blends with the grayscale image (torchvision/PIL) instead of scaling
    the HSV S channel. Works on uint8 images (tensor or PIL); masks pass through.
    """

    _transformed_types = (tv_tensors.Image, PIL.Image.Image)

    def __init__(
        self,
        brightness_delta: float = 32.0,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: float = 0.1,
    ):
        super().__init__()
        self.brightness_delta = brightness_delta
        self.contrast_range, self.saturation_range = contrast_range, saturation_range
        self.hue_delta = hue_delta

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        draws = torch.rand(5)
        b, c = self.brightness_delta, self.contrast_range
        s, h = self.saturation_range, self.hue_delta
        return {
            "brightness": _uniform(-b, b) if draws[0] < 0.5 else None,
            "contrast_first": bool(draws[1] < 0.5),
            "contrast": _uniform(*c) if draws[2] < 0.5 else None,
            "saturation": _uniform(*s) if draws[3] < 0.5 else None,
            "hue": _uniform(-h, h) if draws[4] < 0.5 else None,
        }

    @staticmethod
    def _point(pil: PIL.Image.Image, add: float, mul: float | None) -> PIL.Image.Image:
        # Brightness and contrast are per-value functions: one lookup table does both.
        values = np.clip(np.arange(256, dtype=np.float64) + add, 0, 255)
        if mul is not None:
            values = np.clip(values * mul, 0, 255)
        return pil.point(np.rint(values).astype(np.int64).tolist() * 3)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        pil = inpt if isinstance(inpt, PIL.Image.Image) else _to_pil(inpt)
        contrast, first = params["contrast"], params["contrast_first"]
        if params["brightness"] is not None or (first and contrast is not None):
            pil = self._point(pil, params["brightness"] or 0.0, contrast if first else None)
        if params["saturation"] is not None:
            pil = F.adjust_saturation(pil, params["saturation"])
        if params["hue"] is not None:
            pil = F.adjust_hue(pil, params["hue"])
        if not first and contrast is not None:
            pil = self._point(pil, 0.0, contrast)
        return pil if isinstance(inpt, PIL.Image.Image) else _from_pil(pil, inpt)


class RandomGaussianBlur(v2.Transform):
    """Gaussian blur with ``sigma ~ U[sigma_min, sigma_max]``, applied with probability ``p``.

    PIL images use ``ImageFilter.GaussianBlur(radius=sigma)`` as the published code; tensors a
    kernel covering +-3 sigma of the drawn sigma. Masks pass through.
    """

    _transformed_types = (tv_tensors.Image, PIL.Image.Image)

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0), p: float = 0.5):
        super().__init__()
        self.sigma, self.p = (float(sigma[0]), float(sigma[1])), p

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        if float(torch.rand(())) >= self.p:
            return {"sigma": None}
        return {"sigma": _uniform(*self.sigma)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        sigma = params["sigma"]
        if sigma is None:
            return inpt
        if isinstance(inpt, PIL.Image.Image):
            return inpt.filter(PIL.ImageFilter.GaussianBlur(radius=sigma))
        k = 2 * math.ceil(3 * sigma) + 1
        return F.gaussian_blur(inpt, kernel_size=[k, k], sigma=[sigma, sigma])


def strong_photometric_transforms(
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_p: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
) -> v2.Compose:
    """Student-side photometric ops (SPEC §2 step 3) on a uint8 image; geometry untouched.

    ColorJitter(0.4, 0.4, 0.4, 0.1) with probability ``jitter_p``, grayscale with
    ``grayscale_p``, Gaussian blur (sigma in ``blur_sigma``) with ``blur_p``. The ops run on a
    PIL image, as in the published code (and several times faster than torch's HSV code).
    """
    return v2.Compose(
        [
            ToPIL(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=jitter_p),
            v2.RandomGrayscale(p=grayscale_p),
            RandomGaussianBlur(blur_sigma, p=blur_p),
            FromPIL(),
        ]
    )
