"""Training and test-time augmentation pipelines built on ``torchvision.transforms.v2``.

Images travel as ``tv_tensors.Image`` (uint8 ``[3, H, W]``) and instance masks as
``tv_tensors.Mask`` (bool ``[N, H, W]``), so every geometric op moves both together. Call a
pipeline as ``image, masks = pipeline(image, masks)`` (or ``pipeline(image)`` without masks).

Randomness comes from torch's global generator, as in torchvision. :func:`seeded_rng` runs a
pipeline under a forked, explicitly seeded generator so that an augmentation is a deterministic
function of a seed (the loaders derive it from the sample's position in the stream) and the
caller's random state is left untouched. Photometric ops live in ``photometric.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .photometric import ColorAugSSD, strong_photometric_transforms

__all__ = [
    "ColorAugSSD",
    "LargeScaleJitter",
    "ResizeCrop",
    "ResizeShortestEdge",
    "build_strong_transforms",
    "build_train_transforms",
    "build_transforms",
    "build_weak_transforms",
    "cityscapes_transforms",
    "flip_transform",
    "lsj_transforms",
    "seeded_rng",
    "strong_photometric_transforms",
    "inference_transforms",
]

# Mapper names (INPUT.DATASET_MAPPER_NAME) and the geometric pipeline each one selects.
LSJ_MAPPERS = ("coco_instance_lsj",)
MULTISCALE_MAPPERS = ("mask_former_instance",)


@contextlib.contextmanager
def seeded_rng(seed: int | None) -> Iterator[None]:
    """Runs the enclosed code with torch's CPU generator seeded by ``seed``.

    The generator state is saved and restored around the block, so the caller's random stream
    does not move. ``seed=None`` uses (and advances) the current global state, as torchvision.
    """
    if seed is None:
        yield
        return
    # Only the CPU generator: torch.manual_seed would also queue seeding of every lazily
    # initialized accelerator backend, costing more than the augmentations of a small image.
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high))


def _nearest_exact_index(out_len: int, in_len: int, begin: int, count: int) -> np.ndarray:
    """Source indices of output pixels ``begin .. begin+count-1`` of a nearest-exact resize.

    Same pixel centres as bilinear resizing (``(i + 0.5) * in / out``), so masks stay aligned
    with the bilinearly resized image (plain "nearest" drifts by up to half a source pixel).
    """
    idx = (np.arange(begin, begin + count, dtype=np.float64) + 0.5) * (in_len / out_len)
    return np.minimum(np.floor(idx).astype(np.int64), in_len - 1)


def _resize_crop_pad_mask(
    mask: torch.Tensor,
    size: tuple[int, int],
    box: tuple[int, int, int, int],
    pad: list[int],
    fill: int,
) -> torch.Tensor:
    """Nearest-exact resize to ``size``, crop ``box``, pad ``[l, t, r, b]``; only the kept
    window is computed. Tensor[..., H, W] -> Tensor[..., h + t + b, w + l + r], same dtype."""
    (out_h, out_w), (top, left, crop_h, crop_w) = size, box
    *lead, in_h, in_w = mask.shape
    rows = _nearest_exact_index(out_h, in_h, top, crop_h)
    cols = _nearest_exact_index(out_w, in_w, left, crop_w)
    src = mask.reshape(-1, in_h, in_w).numpy()
    if len(rows):  # rows are sorted: gather columns on the needed source rows only
        src = src[:, rows[0] : rows[-1] + 1]
        rows = rows - rows[0]
    # numpy's take is several times faster than torch.index_select on small integer types.
    kept = np.take(np.take(src, cols, axis=2), rows, axis=1)
    left_pad, top_pad, right_pad, bottom_pad = pad
    out_shape = (kept.shape[0], top_pad + crop_h + bottom_pad, left_pad + crop_w + right_pad)
    # np.zeros gets pre-zeroed pages from the OS: much cheaper than filling.
    out = np.zeros(out_shape, kept.dtype) if fill == 0 else np.full(out_shape, fill, kept.dtype)
    out[:, top_pad : top_pad + crop_h, left_pad : left_pad + crop_w] = kept
    return torch.from_numpy(out).reshape(*lead, *out.shape[-2:])


class ResizeCrop(v2.Transform):
    """Base of the "resize, then crop, then pad" geometric transforms.

    Subclasses draw ``{"size": (H, W), "box": (top, left, h, w), "pad": [l, t, r, b]}`` in
    :meth:`resize_crop_params`. Images are resized (bilinear, antialiased) then cropped and
    padded with ``image_fill``. Masks (any dtype; bool is cheapest) are sampled only inside the
    crop box with nearest-exact indices, which gives the pixels of resizing the full mask and
    cropping it at a fraction of the cost when the image is upscaled; padding uses ``mask_fill``.
    """

    def __init__(self, image_fill: int = 0, mask_fill: int = 0) -> None:
        super().__init__()
        self.image_fill, self.mask_fill = image_fill, mask_fill

    def resize_crop_params(self, height: int, width: int) -> dict[str, Any]:
        raise NotImplementedError

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return self.resize_crop_params(*v2.query_size(flat_inputs))

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        size, box, pad = params["size"], params["box"], params["pad"]
        if isinstance(inpt, tv_tensors.Mask):
            plain = inpt.as_subclass(torch.Tensor)
            return tv_tensors.wrap(
                _resize_crop_pad_mask(plain, size, box, pad, self.mask_fill), like=inpt
            )
        out = inpt
        if tuple(size) != tuple(F.get_size(inpt)):
            out = self._call_kernel(F.resize, out, size=list(size), antialias=True)
        if tuple(box) != (0, 0, *size):
            out = self._call_kernel(F.crop, out, *box)
        if any(pad):
            out = self._call_kernel(F.pad, out, padding=pad, fill=self.image_fill)
        return out


class LargeScaleJitter(ResizeCrop):
    """COCO large-scale jitter: detectron2 ``ResizeScale`` + ``FixedSizeCrop`` in one step.

    Draws ``s ~ U[min_scale, max_scale]``, resizes (aspect kept) to fit in ``s * crop_size``,
    then takes a uniformly placed ``crop_size`` window; an image smaller than the window is
    padded at the bottom/right, so pixel (0, 0) stays image content.
    """

    def __init__(
        self,
        crop_size: tuple[int, int],
        min_scale: float = 0.1,
        max_scale: float = 2.0,
        image_fill: int = 0,
        mask_fill: int = 0,
    ) -> None:
        super().__init__(image_fill, mask_fill)
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.min_scale, self.max_scale = min_scale, max_scale

    def resize_crop_params(self, height: int, width: int) -> dict[str, Any]:
        ch, cw = self.crop_size
        scale = _uniform(self.min_scale, self.max_scale)
        r = min(scale * ch / height, scale * cw / width)
        h, w = max(1, round(height * r)), max(1, round(width * r))
        top = int(torch.randint(max(h - ch, 0) + 1, ()))
        left = int(torch.randint(max(w - cw, 0) + 1, ()))
        kept_h, kept_w = min(h, ch), min(w, cw)
        return {
            "size": (h, w),
            "box": (top, left, kept_h, kept_w),
            "pad": [0, 0, cw - kept_w, ch - kept_h],
        }


class ResizeShortestEdge(ResizeCrop):
    """Shorter side to a size drawn from ``short_sizes`` (longer side <= ``max_size``), then an
    optional random crop of at most ``crop_size`` (detectron2 "absolute" crop; never pads).

    One size and no crop is the deterministic test-time resize; ``short_sizes == (0,)`` keeps
    the input size. Rounding follows detectron2 (``int(x + 0.5)``).
    """

    def __init__(
        self,
        short_sizes: int | Sequence[int],
        max_size: int = 0,
        crop_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        sizes = (short_sizes,) if isinstance(short_sizes, int) else tuple(short_sizes)
        if not sizes:
            raise ValueError("short_sizes must not be empty")
        self.short_sizes, self.max_size = sizes, max_size
        self.crop_size = None if crop_size is None else (int(crop_size[0]), int(crop_size[1]))

    def resize_crop_params(self, height: int, width: int) -> dict[str, Any]:
        short = self.short_sizes[int(torch.randint(len(self.short_sizes), ()))]
        h, w = height, width
        if short > 0:
            r = short / min(height, width)
            if self.max_size > 0:
                r = min(r, self.max_size / max(height, width))
            h, w = max(1, int(height * r + 0.5)), max(1, int(width * r + 0.5))
        box = (0, 0, h, w)
        if self.crop_size is not None:
            ch, cw = min(h, self.crop_size[0]), min(w, self.crop_size[1])
            top, left = int(torch.randint(h - ch + 1, ())), int(torch.randint(w - cw + 1, ()))
            box = (top, left, ch, cw)
        return {"size": (h, w), "box": box, "pad": [0, 0, 0, 0]}


def flip_transform(random_flip: str) -> list[v2.Transform]:
    """``INPUT.RANDOM_FLIP`` ("horizontal" | "vertical" | "none") -> a list of 0 or 1 flips."""
    if random_flip == "horizontal":
        return [v2.RandomHorizontalFlip(p=0.5)]
    if random_flip == "vertical":
        return [v2.RandomVerticalFlip(p=0.5)]
    if random_flip == "none":
        return []
    raise ValueError(f"RANDOM_FLIP must be 'horizontal', 'vertical' or 'none', got {random_flip!r}")


def lsj_transforms(
    image_size: int,
    min_scale: float = 0.1,
    max_scale: float = 2.0,
    random_flip: str = "horizontal",
    image_fill: int = 128,
) -> v2.Compose:
    """COCO large-scale jitter: flip, resize to ``[min, max]_scale * image_size``, crop/pad to
    ``image_size`` x ``image_size`` (image padded with ``image_fill``, masks with 0).

    The fill of 128 is detectron2's ``FixedSizeCrop`` default, used by the published model."""
    return v2.Compose(
        [
            *flip_transform(random_flip),
            LargeScaleJitter((image_size, image_size), min_scale, max_scale, image_fill, 0),
        ]
    )


def cityscapes_transforms(
    min_sizes: Sequence[int],
    max_size: int,
    crop_size: tuple[int, int] | None = (512, 1024),
    color_aug_ssd: bool = True,
    random_flip: str = "horizontal",
) -> v2.Compose:
    """Multi-scale shorter side, random crop ``(h, w)`` (no padding), SSD colour jitter, flip."""
    ops: list[v2.Transform] = [ResizeShortestEdge(min_sizes, max_size, crop_size)]
    if color_aug_ssd:
        ops.append(ColorAugSSD())
    ops.extend(flip_transform(random_flip))
    return v2.Compose(ops)


def inference_transforms(min_size: int, max_size: int) -> v2.Compose:
    """Deterministic test-time resize (shorter side ``min_size``; ``min_size == 0``: none)."""
    return v2.Compose([ResizeShortestEdge((min_size,), max_size)])


def _min_sizes_train(sizes: Sequence[int], sampling: str) -> list[int]:
    """``choice``: one of ``sizes``; ``range``: any integer in ``[sizes[0], sizes[1]]``."""
    if sampling == "choice":
        return [int(s) for s in sizes]
    if sampling == "range":
        if len(sizes) != 2:
            raise ValueError(f"INPUT.MIN_SIZE_TRAIN must be (min, max) with 'range', got {sizes}")
        return list(range(int(sizes[0]), int(sizes[1]) + 1))
    raise ValueError(
        f"INPUT.MIN_SIZE_TRAIN_SAMPLING {sampling!r} is unknown; allowed: choice, range"
    )


def _crop_size(cfg: Any) -> tuple[int, int] | None:
    crop = cfg.INPUT.CROP
    if not crop.ENABLED:
        return None
    if crop.TYPE != "absolute":
        raise ValueError(f"INPUT.CROP.TYPE {crop.TYPE!r} is not supported; use 'absolute'")
    return int(crop.SIZE[0]), int(crop.SIZE[1])


def build_transforms(cfg: Any, is_train: bool, photometric: bool = True) -> v2.Compose:
    """Geometric (+ photometric when ``photometric``) pipeline selected by the config.

    Training: ``INPUT.DATASET_MAPPER_NAME`` picks LSJ (``coco_instance_lsj``) or the Cityscapes
    multi-scale recipe (``mask_former_instance``). Test: shorter side ``INPUT.MIN_SIZE_TEST``.
    """
    inp = cfg.INPUT
    if not is_train:
        return inference_transforms(int(inp.MIN_SIZE_TEST), int(inp.MAX_SIZE_TEST))
    name = inp.DATASET_MAPPER_NAME
    if name in LSJ_MAPPERS:
        return lsj_transforms(
            int(inp.IMAGE_SIZE), float(inp.MIN_SCALE), float(inp.MAX_SCALE), inp.RANDOM_FLIP
        )
    if name in MULTISCALE_MAPPERS:
        return cityscapes_transforms(
            _min_sizes_train(inp.MIN_SIZE_TRAIN, inp.MIN_SIZE_TRAIN_SAMPLING),
            int(inp.MAX_SIZE_TRAIN),
            _crop_size(cfg),
            color_aug_ssd=bool(inp.COLOR_AUG_SSD) and photometric,
            random_flip=inp.RANDOM_FLIP,
        )
    allowed = ", ".join(LSJ_MAPPERS + MULTISCALE_MAPPERS)
    raise ValueError(f"INPUT.DATASET_MAPPER_NAME {name!r} is unknown; allowed: {allowed}")


def build_train_transforms(cfg: Any) -> v2.Compose:
    """Labeled-stream training pipeline."""
    return build_transforms(cfg, is_train=True)


def build_weak_transforms(cfg: Any) -> v2.Compose:
    """Unlabeled-stream geometric (weak) view: the training geometry, no photometric change."""
    return build_transforms(cfg, is_train=True, photometric=False)


def build_strong_transforms(cfg: Any) -> v2.Compose:
    """Unlabeled-stream strong photometric ops applied on top of the weak view.

    The published recipe is fixed (SPEC §2 step 3), so no config key drives it; ``cfg`` is taken
    for symmetry with the other builders.
    """
    del cfg
    return strong_photometric_transforms()
