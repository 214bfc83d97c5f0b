"""Augmentations keep masks on their pixels, and weak/strong views share geometry exactly."""

import pytest
import torch
import torch.nn.functional as TF
from torchvision import tv_tensors
from torchvision.transforms import v2

from gdseg.config import get_cfg
from gdseg.data.mapper import UnlabeledMapper
from gdseg.data.transforms import (
    ColorAugSSD,
    LargeScaleJitter,
    ResizeShortestEdge,
    build_transforms,
    build_weak_transforms,
    cityscapes_transforms,
    inference_transforms,
    lsj_transforms,
    seeded_rng,
    strong_photometric_transforms,
)

RECT_COLOUR = (255, 200, 40)  # yellow: stays far brighter than the background under colour aug
BACKGROUND = (10, 10, 10)


def _drawn_image(h=96, w=128, box=(20, 60, 16, 56)):
    """Dark image with one coloured rectangle (rows y0:y1, cols x0:x1) left of centre, so that
    a flip applied to the image but not to the mask (or vice versa) is caught."""
    y0, y1, x0, x1 = box
    image = torch.tensor(BACKGROUND, dtype=torch.uint8).view(3, 1, 1).repeat(1, h, w)
    image[:, y0:y1, x0:x1] = torch.tensor(RECT_COLOUR, dtype=torch.uint8).view(3, 1, 1)
    mask = torch.zeros(1, h, w, dtype=torch.bool)
    mask[:, y0:y1, x0:x1] = True
    return tv_tensors.Image(image), tv_tensors.Mask(mask)


def _erode(x: torch.Tensor) -> torch.Tensor:
    """3x3 binary erosion of a bool [H, W] map (pixels outside the image do not erode)."""
    dilated_complement = TF.max_pool2d((~x).float()[None, None], 3, stride=1, padding=1)
    return ~(dilated_complement[0, 0] > 0)


def _coloured_pixels(image: torch.Tensor) -> torch.Tensor | None:
    """Pixels of the rectangle: brighter than halfway between the darkest and brightest level.
    None when the view holds a single level (all rectangle or all background)."""
    gray = image.float().mean(0)
    lo, hi = float(gray.min()), float(gray.max())
    if hi - lo < 40:
        return None
    return gray > (lo + hi) / 2


def _assert_aligned(image: torch.Tensor, mask: torch.Tensor) -> None:
    """The mask covers the coloured pixels; they may differ only on a 1-pixel boundary band
    (antialiased image edge vs. nearest-neighbour mask edge)."""
    coloured = _coloured_pixels(image)
    if coloured is None:
        level = float(image.float().mean())
        assert bool(mask.all()) if level > 60 else not bool(mask.any())
        return
    assert not bool((_erode(mask) & ~coloured).any()), "mask covers background pixels"
    assert not bool((_erode(coloured) & ~mask).any()), "coloured pixels outside the mask"


def test_lsj_keeps_mask_on_coloured_pixels():
    pipeline = lsj_transforms(64, min_scale=0.1, max_scale=2.0, image_fill=0)
    sizes, flipped = set(), set()
    for seed in range(40):
        image, mask = _drawn_image()
        with seeded_rng(seed):
            out_image, out_mask = pipeline(image, mask)
        assert out_image.shape == (3, 64, 64) and out_mask.shape == (1, 64, 64)
        assert out_mask.dtype == torch.bool
        _assert_aligned(out_image, out_mask[0])
        sizes.add(int(out_mask.sum()))
        flipped.add(bool(out_mask[0, :, :32].sum() < out_mask[0, :, 32:].sum()))
    assert len(sizes) > 10 and flipped == {True, False}  # the jitter really varied


def test_lsj_misaligned_mask_is_detected():
    """The alignment check itself can fail: a mask shifted by 2 pixels is rejected."""
    image, mask = _drawn_image()
    with seeded_rng(0):
        out_image, out_mask = lsj_transforms(64, 0.9, 0.9, image_fill=0)(image, mask)
    with pytest.raises(AssertionError):
        _assert_aligned(out_image, torch.roll(out_mask[0], 2, dims=1))


@pytest.mark.parametrize("color_aug", [False, True])
def test_cityscapes_keeps_mask_on_coloured_pixels(color_aug):
    pipeline = cityscapes_transforms(
        (48, 64, 96, 128), max_size=256, crop_size=(48, 96), color_aug_ssd=color_aug
    )
    shapes = set()
    for seed in range(30):
        image, mask = _drawn_image()
        with seeded_rng(seed):
            out_image, out_mask = pipeline(image, mask)
        assert out_image.shape[-2:] == out_mask.shape[-2:]
        assert out_image.shape[-2] <= 48 and out_image.shape[-1] <= 96
        _assert_aligned(out_image, out_mask[0])
        shapes.add(int(out_mask.sum()))
    assert len(shapes) > 5


def test_lsj_pads_bottom_right_with_zero():
    image, mask = _drawn_image(h=64, w=64, box=(0, 64, 0, 64))  # all rectangle
    with seeded_rng(0):
        out_image, out_mask = LargeScaleJitter((64, 64), 0.5, 0.5)(image, mask)
    assert out_image.shape == (3, 64, 64)
    assert bool(out_mask[0, :32, :32].all()) and not bool(out_mask[0, 32:].any())
    assert not bool(out_mask[0, :, 32:].any())
    assert bool((out_image[:, 32:] == 0).all()) and bool((out_image[:, :, 32:] == 0).all())
    assert bool((out_image[:, :32, :32] > 0).all())


def test_mask_resize_crop_equals_full_resize_then_crop():
    """Masks are sampled only inside the crop; the pixels equal resizing the whole mask."""
    torch.manual_seed(0)
    masks = tv_tensors.Mask(torch.rand(3, 37, 53) > 0.5)
    params = {"size": (90, 120), "box": (11, 7, 50, 60), "pad": [0, 0, 4, 6]}
    out = LargeScaleJitter((64, 64)).transform(masks, params)
    full = TF.interpolate(masks.float()[None], size=(90, 120), mode="nearest-exact")[0] > 0.5
    expected = TF.pad(full[:, 11:61, 7:67], (0, 4, 0, 6))
    assert out.dtype == torch.bool and torch.equal(out.as_subclass(torch.Tensor), expected)


def test_inference_resize():
    image = tv_tensors.Image(torch.zeros(3, 60, 100, dtype=torch.uint8))
    assert inference_transforms(30, 1000)(image).shape == (3, 30, 50)
    assert inference_transforms(30, 40)(image).shape == (3, 24, 40)  # longer side capped
    assert inference_transforms(0, 0)(image).shape == (3, 60, 100)  # 0: no resize


def test_resize_shortest_edge_choices_and_crop():
    image = tv_tensors.Image(torch.zeros(3, 50, 100, dtype=torch.uint8))
    seen = set()
    for seed in range(20):
        with seeded_rng(seed):
            out = ResizeShortestEdge((20, 40), 1000, crop_size=(30, 50))(image)
        seen.add(tuple(out.shape[-2:]))
    assert seen == {(20, 40), (30, 50)}  # 20x40 is smaller than the crop: kept whole


def test_seeded_rng_is_deterministic_and_leaves_global_state():
    image, mask = _drawn_image()
    pipeline = lsj_transforms(64, image_fill=0)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    with seeded_rng(7):
        a = pipeline(image, mask)
    with seeded_rng(7):
        b = pipeline(image, mask)
    with seeded_rng(8):
        c = pipeline(image, mask)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_color_aug_ssd_is_pointwise_and_leaves_masks():
    image, mask = _drawn_image()
    changed = False
    for seed in range(10):
        with seeded_rng(seed):
            out_image, out_mask = ColorAugSSD()(image, mask)
        assert torch.equal(out_mask, mask)
        assert _is_pointwise_function(image, out_image)
        changed |= not torch.equal(out_image, image)
    assert changed


# --------------------------------------------------------------------------------------------
# Weak / strong views of unlabeled images
# --------------------------------------------------------------------------------------------


def _palette_image(h=96, w=128):
    """Flat colour regions (a 4x4 grid of colours), so a colour identifies a region."""
    g = torch.Generator().manual_seed(0)
    colours = torch.randint(0, 256, (16, 3), generator=g, dtype=torch.uint8)
    rows = torch.arange(h) * 4 // h
    cols = torch.arange(w) * 4 // w
    cell = rows[:, None] * 4 + cols[None, :]
    return tv_tensors.Image(colours[cell].permute(2, 0, 1).contiguous())


def _is_pointwise_function(src: torch.Tensor, dst: torch.Tensor) -> bool:
    """True when equal colours in ``src`` always map to equal colours in ``dst`` at the same
    pixel, i.e. ``dst`` is a per-pixel colour change of ``src`` with identical geometry."""
    key = (src.long() * torch.tensor([65536, 256, 1]).view(3, 1, 1)).sum(0).flatten()
    _, group = torch.unique(key, return_inverse=True)
    values = dst.reshape(3, -1).long()
    n = int(group.max()) + 1
    lo = torch.full((3, n), 10**6).scatter_reduce(1, group.expand(3, -1), values, "amin")
    hi = torch.full((3, n), -1).scatter_reduce(1, group.expand(3, -1), values, "amax")
    return bool((lo == hi).all())


def _unlabeled_mapper(strong: v2.Transform) -> UnlabeledMapper:
    image = _palette_image()
    return UnlabeledMapper(
        lsj_transforms(64, 0.5, 1.5, image_fill=0),
        strong,
        image_loader=lambda record: image.clone(),
    )


RECORD = {"file_name": "unused.png", "image_id": 1}


def test_strong_with_photometric_ops_off_equals_weak():
    mapper = _unlabeled_mapper(strong_photometric_transforms(0.0, 0.0, 0.0))
    weak_views = []
    for seed in range(8):
        out = mapper(RECORD, seed)
        assert out["image_weak"].dtype == torch.uint8 and out["image_weak"].shape == (3, 64, 64)
        assert torch.equal(out["image_weak"], out["image_strong"])
        weak_views.append(out["image_weak"])
    assert any(not torch.equal(weak_views[0], v) for v in weak_views[1:])  # geometry varies


def test_strong_colour_change_is_pixel_aligned_with_weak():
    mapper = _unlabeled_mapper(strong_photometric_transforms(1.0, 0.0, 0.0))
    for seed in range(8):
        out = mapper(RECORD, seed)
        weak, strong = out["image_weak"], out["image_strong"]
        assert not torch.equal(weak, strong)
        assert _is_pointwise_function(weak, strong)
        # ...and the check fails when the geometry differs (here: a flipped strong view).
        assert not _is_pointwise_function(weak, strong.flip(-1))


def test_strong_view_edges_agree_with_weak_view():
    """All strong ops on (jitter, grayscale, blur): the drawn shape keeps its place."""
    image, _ = _drawn_image(box=(20, 70, 30, 90))
    mapper = UnlabeledMapper(
        lsj_transforms(64, 0.8, 1.2, image_fill=0),
        strong_photometric_transforms(1.0, 0.5, 1.0),
        image_loader=lambda record: image.clone(),
    )
    for seed in range(10):
        out = mapper(RECORD, seed)
        weak, strong = _coloured_pixels(out["image_weak"]), _coloured_pixels(out["image_strong"])
        assert weak is not None and strong is not None
        iou = (weak & strong).sum() / (weak | strong).sum()
        assert iou > 0.85
        centre_w = torch.nonzero(weak).float().mean(0)
        centre_s = torch.nonzero(strong).float().mean(0)
        assert torch.allclose(centre_w, centre_s, atol=0.5)


def test_build_transforms_from_config():
    cfg = get_cfg()
    cfg.INPUT.IMAGE_SIZE = 64
    image, mask = _drawn_image()
    with seeded_rng(0):
        out_image, out_mask = build_transforms(cfg, is_train=True)(image, mask)
    assert out_image.shape == (3, 64, 64)
    cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_instance"
    cfg.INPUT.MIN_SIZE_TRAIN = (48, 64)
    cfg.INPUT.MAX_SIZE_TRAIN = 256
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.SIZE = (32, 64)
    cfg.INPUT.COLOR_AUG_SSD = True
    with seeded_rng(0):
        out_image, out_mask = build_transforms(cfg, is_train=True)(image, mask)
    assert out_image.shape == (3, 32, 64)
    assert not any(isinstance(t, ColorAugSSD) for t in build_weak_transforms(cfg).transforms)
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 48, 1000
    assert build_transforms(cfg, is_train=False)(image).shape == (3, 48, 64)
    cfg.INPUT.DATASET_MAPPER_NAME = "nope"
    with pytest.raises(ValueError, match="coco_instance_lsj"):
        build_transforms(cfg, is_train=True)
