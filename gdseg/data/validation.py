"""Bad-input checks shared by the dataset loaders.

Every problem found in a user's files is reported as a :class:`DataError` that names the file,
the record (image id / annotation id) and what was expected. Loaders either raise it or, when
asked to skip bad records, hand it to :class:`BadRecords`, which counts and logs what was
skipped so that nothing passes silently.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

# Polygon vertices and boxes may stick out of the image by this many pixels before we call
# them out of bounds: annotation tools put vertices on the outer pixel border (x == width).
BOUNDS_TOLERANCE = 2.0

# EXIF orientations 5..8 rotate by 90 degrees, i.e. swap width and height.
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


class DataError(ValueError):
    """A bad input file or record.

    Attributes:
        file: the file that holds the problem (image or json), or None.
        record: the record it concerns, e.g. "image id 42" or "annotation id 7 (image id 42)".
        problem: what is wrong.
        expected: what was expected instead, or None.
    """

    def __init__(
        self,
        problem: str,
        *,
        file: str | os.PathLike | None = None,
        record: str | None = None,
        expected: str | None = None,
    ) -> None:
        self.file = None if file is None else str(file)
        self.record = record
        self.problem = problem
        self.expected = expected
        where = ", ".join(x for x in (self.file, record) if x)
        msg = f"{where}: {problem}" if where else problem
        if expected:
            msg += f" (expected {expected})"
        super().__init__(msg)


class BadRecords:
    """Raise or collect bad records, depending on ``skip``.

    Args:
        skip: if False, :meth:`report` raises the error; if True, it is counted and kept.
        source: name of the dataset/file, used in the summary warning.
    """

    def __init__(self, skip: bool, source: str) -> None:
        self.skip = skip
        self.source = source
        self.errors: list[DataError] = []

    def report(self, err: DataError) -> None:
        if not self.skip:
            raise err
        self.errors.append(err)

    @property
    def count(self) -> int:
        return len(self.errors)

    def summarize(self) -> dict[str, Any]:
        """Log a warning when records were skipped; return the metadata entries to record."""
        if self.errors:
            shown = "\n  ".join(str(e) for e in self.errors[:10])
            more = f"\n  ... and {self.count - 10} more" if self.count > 10 else ""
            logger.warning(
                "Skipped %d bad record(s) in %s:\n  %s%s", self.count, self.source, shown, more
            )
        return {"num_skipped": self.count, "skipped": [str(e) for e in self.errors]}


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def _to_uint8_rgb(img: Image.Image) -> np.ndarray:
    """Convert any PIL mode to uint8 [H, W, 3] RGB.

    16-bit and 32-bit integer images are scaled from the 16-bit range (PNG/TIFF with 16 bits
    per sample open as "I;16" or "I"); a plain ``convert("RGB")`` would clip them to white.
    Alpha is dropped (the colour channels are kept as stored), as in detectron2's reader that
    the published models were trained with.
    """
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.float64)
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if np.nanmax(arr, initial=0.0) <= 1.0:  # float images are usually in [0, 1]
            arr = arr * 255.0
        arr = np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids Pillow's warning about palette transparency
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def read_image(
    path: str | os.PathLike,
    format: str = "RGB",
    *,
    record: str | None = None,
    expected_hw: tuple[int, int] | None = None,
) -> np.ndarray:
    """Read an image as uint8 [H, W, 3], EXIF orientation applied.

    Grayscale, palette, RGBA/LA (alpha dropped), CMYK and 16-bit images are converted.

    Args:
        path: image file.
        format: "RGB" or "BGR" channel order of the result.
        record: the record id to name in errors, e.g. "image id 42".
        expected_hw: (height, width) the dataset promises; a different size is an error.

    Returns:
        np.uint8 array [H, W, 3].

    Raises:
        DataError: missing/unreadable file or size mismatch, naming the file and record.
    """
    if format not in ("RGB", "BGR"):
        raise ValueError(f"format must be 'RGB' or 'BGR', got {format!r}")
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            arr = _to_uint8_rgb(img)
    except FileNotFoundError:
        raise DataError("image file not found", file=path, record=record) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image ({e})", file=path, record=record) from e
    if expected_hw is not None and tuple(arr.shape[:2]) != tuple(expected_hw):
        raise DataError(
            f"image is {arr.shape[0]}x{arr.shape[1]} (HxW, after EXIF orientation)",
            file=path,
            record=record,
            expected=f"{expected_hw[0]}x{expected_hw[1]} as given in the annotation file",
        )
    if format == "BGR":
        arr = arr[:, :, ::-1]
    return np.ascontiguousarray(arr)


def read_image_size(path: str | os.PathLike, record: str | None = None) -> tuple[int, int]:
    """(height, width) of an image after EXIF orientation, reading only the file header."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except FileNotFoundError:
        raise DataError("image file not found", file=path, record=record) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image ({e})", file=path, record=record) from e
    if orientation in _TRANSPOSING_ORIENTATIONS:
        h, w = w, h
    return h, w


def check_image_files(
    items: Sequence[tuple[str, str, tuple[int, int] | None]], num_threads: int = 8
) -> list[tuple[tuple[int, int] | None, DataError | None]]:
    """Check that images exist, are readable and have the expected size (headers only).

    Args:
        items: (path, record description, expected (h, w) or None) per image.
        num_threads: threads reading headers (file access, not CPU, is the cost).

    Returns:
        per item, ((h, w) read from the header or None, the DataError found or None).
    """

    def check(item: tuple[str, str, tuple[int, int] | None]):
        path, record, expected = item
        try:
            hw = read_image_size(path, record)
        except DataError as e:
            return None, e
        if expected is not None and hw != tuple(expected):
            err = DataError(
                f"image is {hw[0]}x{hw[1]} (HxW, after EXIF orientation)",
                file=path,
                record=record,
                expected=f"{expected[0]}x{expected[1]} as given in the annotation file "
                "(if only the orientation differs, the annotation tool ignored EXIF rotation)",
            )
            return hw, err
        return hw, None

    if len(items) < 64 or num_threads <= 1:
        return [check(it) for it in items]
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        return list(pool.map(check, items, chunksize=64))


# ---------------------------------------------------------------------------------------------
# Annotations
# ---------------------------------------------------------------------------------------------


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def segmentation_to_rle(segm: Any, height: int, width: int) -> dict:
    """COCO segmentation (polygons, uncompressed or compressed RLE) -> one compressed RLE.

    Follows pycocotools' ``COCO.annToRLE`` exactly, so decoding gives ``annToMask``.
    """
    if isinstance(segm, list):
        return mask_util.merge(mask_util.frPyObjects(segm, height, width))
    if isinstance(segm["counts"], list):
        return mask_util.frPyObjects(segm, height, width)
    return segm


def check_segmentation(segm: Any, height: int, width: int) -> tuple[str, str] | None:
    """Structural check of a COCO segmentation against an image of (height, width).

    Returns:
        None when valid, else (problem, expected).
    """
    tol = BOUNDS_TOLERANCE
    if isinstance(segm, list):
        if not segm:
            return "empty polygon list", "at least one polygon"
        for i, poly in enumerate(segm):
            if not isinstance(poly, list):
                return f"polygon {i} is a {type(poly).__name__}", "a flat list [x0, y0, x1, ...]"
            if len(poly) < 6 or len(poly) % 2:
                return (
                    f"polygon {i} has {len(poly)} coordinates",
                    "at least 3 points (an even number >= 6 of coordinates)",
                )
            # Built-in sum/min/max run in C: this check stays cheap on 10^6 COCO polygons.
            try:
                finite = math.isfinite(sum(poly))
                xs, ys = poly[0::2], poly[1::2]
                x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
            except TypeError:
                finite = False
            if not finite:
                return f"polygon {i} is not a list of finite numbers", "[x0, y0, x1, ...]"
            if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
                return (
                    f"polygon {i} spans x [{x0:g}, {x1:g}], y [{y0:g}, {y1:g}], outside the image",
                    f"coordinates within the {width}x{height} (WxH) image",
                )
        return None
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        size = segm["size"]
        if list(size) != [height, width]:
            return f"RLE size {list(size)}", f"[height, width] = [{height}, {width}]"
        counts = segm["counts"]
        if isinstance(counts, list):
            if not all(isinstance(c, int) and c >= 0 for c in counts):
                return "uncompressed RLE counts are not non-negative integers", None
            if sum(counts) != height * width:
                return f"uncompressed RLE counts sum to {sum(counts)}", f"{height * width} = H*W"
        elif not isinstance(counts, (str, bytes)):
            return f"RLE counts of type {type(counts).__name__}", "a list, str or bytes"
        return None
    return (
        f"segmentation of type {type(segm).__name__}",
        "a list of polygons or an RLE dict with 'size' and 'counts'",
    )


def check_bbox(bbox: Any, height: int, width: int) -> tuple[str, str] | None:
    """Check an XYWH box against an image of (height, width); None when valid."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(map(_is_number, bbox)):
        return f"bbox {bbox!r}", "[x, y, w, h] of 4 finite numbers"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"bbox {list(bbox)} has zero or negative size", "w > 0 and h > 0"
    tol = BOUNDS_TOLERANCE
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        return (
            f"bbox {list(bbox)} lies outside the image",
            f"a box within the {width}x{height} (WxH) image",
        )
    return None


def mask_area(rle: dict) -> int:
    """Number of foreground pixels of a compressed RLE (no full decode)."""
    return int(mask_util.area(rle))


def rle_to_bbox(rle: dict) -> list[float]:
    """Tight XYWH box of a compressed RLE."""
    return [float(v) for v in mask_util.toBbox(rle)]
