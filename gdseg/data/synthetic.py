"""Seeded synthetic instance-segmentation data, written as real COCO files (images + json).

Each image shows 0..``max_instances`` shapes (circle, square, triangle, star, ring, cross) on a
gradient or blotchy background with clutter lines. Colour and texture (flat, stripes, checker,
noise, gradient) are drawn independently of the class, so a model has to learn *shape*.
Shapes vary in size, aspect, rotation and overlap; heavily hidden instances are removed so
every label stays visible. Unoccluded polygon shapes are stored as polygons, occluded ones and
rings (which have a hole) as compressed RLE, so both formats are exercised.

The data is generated on first use into a cache folder keyed by the parameters and reused
afterwards; generation writes to a temporary folder and renames it, so concurrent processes
never see half a dataset.
"""

from __future__ import annotations

import colorsys
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["SHAPES", "STYLES", "default_cache_dir", "make_synthetic_coco"]

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
STYLES = ("textured", "plain")
DEFAULT_OBJECT_SIZE = (0.08, 0.22)
# Bump when the drawing code changes, so old caches are not reused.
GENERATOR_VERSION = 1
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "unlabeled": 3}
_COMPLETE_MARKER = ".complete"


def default_cache_dir() -> Path:
    """``$GDSEG_CACHE_DIR/synthetic`` or ``~/.cache/gdseg/synthetic``."""
    base = os.environ.get("GDSEG_CACHE_DIR") or os.path.join("~", ".cache", "gdseg")
    return Path(base).expanduser() / "synthetic"


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


def _outline(shape: str, r: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Polygon(s) [K, 2] of a shape of radius ~r centred at 0 (ring: outer, inner)."""
    if shape in ("circle", "ring"):
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        circle = np.stack([np.cos(t), np.sin(t)], 1)
        return (
            [r * circle, r * rng.uniform(0.45, 0.6) * circle] if shape == "ring" else [r * circle]
        )
    if shape == "square":
        return [r * 0.8 * np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)]
    if shape == "triangle":
        t = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return [r * np.stack([np.cos(t), np.sin(t)], 1)]
    if shape == "star":
        t = np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
        return [r * rad[:, None] * np.stack([np.cos(t), np.sin(t)], 1)]
    if shape == "cross":
        a = rng.uniform(0.28, 0.4)
        q = [(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1)]
        pts = q + [(-x, -y) for x, y in q]
        return [r * np.array(pts, dtype=float)]
    raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    h, s, v = rng.uniform(0, 1), rng.uniform(0.35, 1), rng.uniform(0.3, 1)
    return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0


@functools.lru_cache(maxsize=4)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel row and column coordinates, float32 [h, w] each (cached: made once per size)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy, xx


def _texture(
    yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator, style: str = "textured"
) -> np.ndarray:
    """A random fill [..., 3] in 0..255 at pixels (yy, xx), independent of the shape class."""
    c1 = _random_colour(rng).astype(np.float32)
    kind = rng.integers(5) if style == "textured" else 0
    if kind == 0:  # flat colour
        t = np.zeros_like(yy)
    elif kind == 4:  # colour noise
        noise = rng.standard_normal(yy.shape, dtype=np.float32)[..., None]
        return c1 + noise * (30 * rng.uniform(0.5, 1.0, 3)).astype(np.float32)
    else:  # stripes, checker or gradient between two colours, at a random angle
        ang = rng.uniform(0, np.pi)
        u = xx * np.cos(ang) + yy * np.sin(ang)
        if kind == 3:
            t = (u - u.min()) / max(float(np.ptp(u)), 1.0)
        else:
            period = rng.uniform(4, 10)
            t = np.floor(u / period) % 2
            if kind == 2:
                v = -xx * np.sin(ang) + yy * np.cos(ang)
                t = np.abs(t - np.floor(v / period) % 2)
    c2 = _random_colour(rng).astype(np.float32)
    t = t[..., None]
    return c1 * (1 - t) + c2 * t


def _background(h: int, w: int, rng: np.random.Generator, style: str) -> np.ndarray:
    """Gradient, blotches or an object-like texture, plus clutter lines and pixel noise.

    ``style="plain"``: a two-colour gradient and faint noise only.
    """
    yy, xx = _grid(h, w)
    kind = rng.integers(3) if style == "textured" else 0
    if kind == 0:  # two-colour linear gradient
        c1, c2 = _random_colour(rng), _random_colour(rng)
        ang = rng.uniform(0, 2 * np.pi)
        u = xx * np.cos(ang) + yy * np.sin(ang)
        t = ((u - u.min()) / max(float(np.ptp(u)), 1.0))[..., None]
        out = c1 * (1 - t) + c2 * t
    elif kind == 1:  # blotches: a few random colours smoothly interpolated
        g = int(rng.integers(3, 7))
        small = np.stack([_random_colour(rng) for _ in range(g * g)]).reshape(g, g, 3)
        small = Image.fromarray(small.astype(np.uint8)).resize((w, h), Image.BICUBIC)
        out = np.asarray(small)
    else:  # the textures objects get, so that texture alone does not say "object"
        out = _texture(yy, xx, rng)
    out = np.array(out, dtype=np.float32)
    if style == "plain":
        return out + rng.standard_normal(out.shape, dtype=np.float32) * 3
    for _ in range(rng.integers(0, 4)):  # clutter that is not an object
        ang, off = rng.uniform(0, np.pi), rng.uniform(-0.5, 0.5) * max(h, w)
        d = np.abs((xx - w / 2) * np.sin(ang) - (yy - h / 2) * np.cos(ang) - off)
        out[d < rng.uniform(0.5, 2.0)] = _random_colour(rng)
    out += rng.standard_normal(out.shape, dtype=np.float32) * rng.uniform(0, 10)
    return out


def _rasterize(polys: list[np.ndarray], h: int, w: int) -> np.ndarray:
    """Bool [h, w] of the union of polygons, rasterized as pycocotools decodes them."""
    flat = [p.reshape(-1).tolist() for p in polys]
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects(flat, h, w))).astype(bool)


def _draw_instance(shape: str, h: int, w: int, rng: np.random.Generator, size: tuple[float, float]):
    """(polygons in image coordinates, full bool mask) of one randomly placed shape.

    ``size``: (min, max) radius as a fraction of the shorter image side. The centre stays
    inside the image but the shape may be cut by the border.
    """
    side = min(h, w)
    r = side * rng.uniform(*size)
    aspect = rng.uniform(0.8, 1.25)
    rot = rng.uniform(0, 2 * np.pi)
    rmat = np.array([[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]])
    cx, cy = rng.uniform(0.5 * r, w - 0.5 * r), rng.uniform(0.5 * r, h - 0.5 * r)
    polys = []
    for p in _outline(shape, r, rng):
        polys.append(np.round((p * [aspect, 1 / aspect]) @ rmat.T + [cx, cy], 2))
    outer = _rasterize(polys[:1], h, w)
    mask = outer & ~_rasterize(polys[1:], h, w) if len(polys) > 1 else outer
    return polys, mask


def _visible(masks: list[np.ndarray]) -> list[np.ndarray]:
    """Visible part of each mask when painted in order (later ones on top)."""
    cover = np.zeros_like(masks[0]) if masks else None
    out = [None] * len(masks)
    for i in range(len(masks) - 1, -1, -1):
        out[i] = masks[i] & ~cover
        cover |= masks[i]
    return out


def _make_image(
    h: int,
    w: int,
    classes: tuple[str, ...],
    n: int,
    rng: np.random.Generator,
    style: str,
    size: tuple[float, float],
):
    """(uint8 image [h, w, 3], [(class index, polygons or None, visible mask)])."""
    insts = []
    for _ in range(n):
        k = int(rng.integers(len(classes)))
        polys, mask = _draw_instance(classes[k], h, w, rng, size)
        if mask.sum() >= 20:
            insts.append((k, polys, mask))
    while insts:  # drop the most hidden instance until every one is mostly visible
        vis = _visible([m for _, _, m in insts])
        frac = [v.sum() / max(m.sum(), 1) for v, (_, _, m) in zip(vis, insts)]
        worst = int(np.argmin(frac))
        if frac[worst] >= 0.55 and vis[worst].sum() >= 20:
            break
        insts.pop(worst)
    img = _background(h, w, rng, style)
    out = []
    vis = _visible([m for _, _, m in insts]) if insts else []
    for (k, polys, mask), v in zip(insts, vis):
        ys, xs = np.nonzero(mask)
        under = img[ys, xs].mean(0)
        for _ in range(4):  # avoid camouflage: the object should stand out from what is under
            fill = _texture(ys.astype(np.float32), xs.astype(np.float32), rng, style)
            if np.abs(fill.mean(0) - under).sum() > 80:
                break
        img[ys, xs] = fill + rng.standard_normal(fill.shape, dtype=np.float32) * 4
        # Polygons only where they are exact: no hole, not hidden, not cut by the border.
        inside = all(p.min() >= 0 and (p <= [w, h]).all() for p in polys)
        exact_polygon = classes[k] != "ring" and inside and bool((v == mask).all())
        out.append((k, polys if exact_polygon else None, v))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), out


# ---------------------------------------------------------------------------------------------
# Dataset files
# ---------------------------------------------------------------------------------------------


def _generate(out: Path, params: dict) -> None:
    h, w = params["image_size"]
    classes = SHAPES[: params["num_classes"]]
    ext = params["image_format"]
    (out / "images").mkdir(parents=True)
    images, anns = [], []
    split_code = _SPLIT_CODES.get(params["split"], 9)
    for i in range(params["num_images"]):
        # One generator per image: image i does not depend on how many images are made.
        rng = np.random.default_rng([params["seed"], split_code, i])
        n = int(rng.integers(params["min_instances"], params["max_instances"] + 1))
        img, insts = _make_image(
            h,
            w,
            classes,
            n,
            rng,
            params.get("style", "textured"),
            tuple(params.get("object_size", DEFAULT_OBJECT_SIZE)),
        )
        name = f"{i + 1:06d}.{ext}"
        save_kw = {"quality": 92} if ext == "jpg" else {}
        Image.fromarray(img).save(out / "images" / name, **save_kw)
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        for k, polys, vis in insts:
            rle = mask_util.encode(np.asfortranarray(vis.astype(np.uint8)))
            if polys is not None:
                segm = [p.reshape(-1).tolist() for p in polys]
            else:
                segm = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": k + 1,
                    "segmentation": segm,
                    "area": float(mask_util.area(rle)),
                    "bbox": [float(v) for v in mask_util.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
    data = {
        "info": {"description": "gdseg synthetic shapes", "gdseg_synthetic": params},
        "images": images,
        "annotations": anns,
        "categories": [
            {"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(classes)
        ],
    }
    (out / "annotations.json").write_text(json.dumps(data))
    (out / _COMPLETE_MARKER).write_text("ok\n")


def make_synthetic_coco(
    root: str | os.PathLike | None = None,
    num_images: int = 400,
    image_size: int | tuple[int, int] = 128,
    seed: int = 0,
    num_classes: int = 5,
    max_instances: int = 6,
    min_instances: int = 1,
    image_format: str = "jpg",
    split: str = "train",
    style: str = "textured",
    object_size: tuple[float, float] = (0.08, 0.22),
) -> tuple[str, str]:
    """Generate (or reuse) a synthetic COCO-format dataset.

    Args:
        root: cache folder; the data goes to ``<root>/<hash of the parameters>/``
            (default :func:`default_cache_dir`).
        num_images: number of images.
        image_size: side, or (height, width).
        seed: seed; with ``split``, fixes every pixel and annotation.
        num_classes: number of shape classes, the first ones of :data:`SHAPES` (1..6).
        max_instances, min_instances: instances drawn per image (uniform); a few of them may
            be removed when hidden by others, so some images can end up with fewer.
        image_format: "jpg" or "png".
        split: "train", "val", ...; different splits give different images for one seed.
        style: "textured" (stripes, checkers, noise, clutter lines: the model must learn shape)
            or "plain" (flat-coloured shapes on a smooth gradient: learned in minutes on a CPU).
        object_size: (min, max) shape radius as a fraction of the shorter image side.

    Returns:
        (json path, image folder), ready for :func:`gdseg.data.coco.load_coco_instances`.
    """
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in 1..{len(SHAPES)}, got {num_classes}")
    object_size = (float(object_size[0]), float(object_size[1]))
    if not 0 < object_size[0] <= object_size[1] <= 1:
        raise ValueError(
            f"object_size must be (min, max) with 0 < min <= max <= 1, got {object_size}"
        )
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    if not 0 <= min_instances <= max_instances or num_images < 1 or min(hw) < 32:
        raise ValueError(
            f"need 0 <= min_instances <= max_instances, num_images >= 1 and image sides >= 32; "
            f"got {min_instances}, {max_instances}, {num_images}, {hw}"
        )
    params = {
        "num_images": int(num_images),
        "image_size": [int(hw[0]), int(hw[1])],
        "seed": int(seed),
        "num_classes": int(num_classes),
        "max_instances": int(max_instances),
        "min_instances": int(min_instances),
        "image_format": image_format,
        "split": split,
        "version": GENERATOR_VERSION,
    }
    # Only non-default values enter the cache key, so existing datasets keep their folders.
    if style != "textured":
        params["style"] = style
    if object_size != DEFAULT_OBJECT_SIZE:
        params["object_size"] = list(object_size)
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    base = Path(root).expanduser() if root is not None else default_cache_dir()
    final = base / f"{split}_{key}"
    if not (final / _COMPLETE_MARKER).is_file():
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".tmp_{split}_{key}_"))
        try:
            logger.info("Generating %d synthetic %s images into %s", num_images, split, final)
            _generate(tmp / "data", params)
            if final.exists() and not (final / _COMPLETE_MARKER).is_file():
                shutil.rmtree(final, ignore_errors=True)  # leftover of an interrupted copy
            try:
                os.rename(tmp / "data", final)
            except OSError:
                if not (final / _COMPLETE_MARKER).is_file():  # not another process's result
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final / "annotations.json"), str(final / "images")
