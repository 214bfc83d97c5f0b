"""Cityscapes instance segmentation from ``leftImg8bit/`` + ``gtFine/*_instanceIds.png``.

In an ``instanceIds`` image a pixel holds ``label_id * 1000 + k`` for instance k of a class
with instances, or the bare ``label_id`` where the annotators marked a group of objects
(e.g. a crowd of cars). The 8 evaluated thing classes and their ids come from
``cityscapesscripts.helpers.labels``; group regions become crowd annotations (``iscrowd=1``).
Masks are stored as compressed RLE (``counts`` as str) in the records.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from .splits import read_image_list
from .validation import BadRecords, DataError, read_image_size

logger = logging.getLogger(__name__)

__all__ = ["cityscapes_metadata", "cityscapes_thing_labels", "load_cityscapes_instances"]

_IMAGE_SUFFIX = "_leftImg8bit.png"
_GT_SUFFIX = "_gtFine_instanceIds.png"


def cityscapes_thing_labels() -> list[tuple[str, int]]:
    """(name, label id) of the evaluated classes with instances, in label-table order."""
    try:
        from cityscapesscripts.helpers.labels import labels
    except ImportError as e:  # optional dependency
        raise ImportError(
            "Cityscapes needs cityscapesscripts: pip install 'gdseg[cityscapes]'"
        ) from e
    return [(lb.name, lb.id) for lb in labels if lb.hasInstances and not lb.ignoreInEval]


def cityscapes_metadata(image_dir: str | None = None, gt_dir: str | None = None) -> dict:
    """Metadata of the Cityscapes instance task (8 thing classes)."""
    things = cityscapes_thing_labels()
    return {
        "thing_classes": [name for name, _ in things],
        "thing_dataset_id_to_contiguous_id": {lid: k for k, (_, lid) in enumerate(things)},
        "thing_contiguous_id_to_dataset_id": {k: lid for k, (_, lid) in enumerate(things)},
        "json_file": None,
        "image_root": None if image_dir is None else os.path.abspath(image_dir),
        "gt_dir": None if gt_dir is None else os.path.abspath(gt_dir),
        "evaluator_type": "cityscapes",
    }


def _key(entry: str) -> str:
    """``<city>_<seq>_<frame>`` of an image/annotation path or published list entry."""
    return "_".join(os.path.basename(entry).split("_")[:3])


def _annotations(gt: np.ndarray, image_id: int, label_map: dict[int, int]) -> list[dict]:
    """Record annotations of one instanceIds array [H, W]."""
    anns = []
    for uid in np.unique(gt):
        uid = int(uid)
        label = uid // 1000 if uid >= 1000 else uid
        if label not in label_map:
            continue
        rle = mask_util.encode(np.asfortranarray(gt == uid, dtype=np.uint8))
        anns.append(
            {
                "category_id": label_map[label],
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                "bbox": [float(v) for v in mask_util.toBbox(rle)],
                "iscrowd": int(uid < 1000),
                # Unique and stable: instance ids are < 100000 (label id < 100, k < 1000).
                "id": image_id * 100000 + uid,
            }
        )
    return anns


def _load_one(image_file: Path, gt_file: Path, image_id: int, label_map: dict[int, int]) -> dict:
    record = f"image {_key(image_file.name)} (image id {image_id})"
    h, w = read_image_size(image_file, record)
    if not gt_file.is_file():
        raise DataError(
            "annotation file not found",
            file=gt_file,
            record=record,
            expected=f"a *{_GT_SUFFIX} next to the image's city folder in gtFine",
        )
    try:
        with Image.open(gt_file) as im:
            gt = np.asarray(im).astype(np.int32)
    except OSError as e:
        raise DataError(f"cannot read annotation image ({e})", file=gt_file, record=record) from e
    if gt.shape != (h, w):
        raise DataError(
            f"annotation is {gt.shape[0]}x{gt.shape[1]} (HxW)",
            file=gt_file,
            record=record,
            expected=f"{h}x{w} like {image_file}",
        )
    return {
        "file_name": str(image_file.absolute()),
        "image_id": image_id,
        "height": h,
        "width": w,
        "annotations": _annotations(gt, image_id, label_map),
    }


def load_cityscapes_instances(
    image_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    image_list: str | os.PathLike | None = None,
    filter_empty: bool = True,
    skip_bad: bool = False,
    num_threads: int = 4,
) -> tuple[list[dict], dict]:
    """Load Cityscapes instance records.

    Args:
        image_dir: e.g. ``cityscapes/leftImg8bit/train`` (``<city>/*_leftImg8bit.png``).
        gt_dir: e.g. ``cityscapes/gtFine/train`` (``<city>/*_gtFine_instanceIds.png``).
        image_list: optional list file restricting the images (a labeled fraction): lines
            ``<city>/<name>_leftImg8bit.png`` as written by ``gdseg split cityscapes``, or the
            published ``<name>_gtFine_instanceIds.png`` entries.
        filter_empty: drop images without non-crowd instances.
        skip_bad: skip (count, log) images with missing/unreadable/mismatched files.
        num_threads: threads decoding the annotation PNGs.

    Returns:
        (records, metadata). Image ids are positions in the sorted full folder listing, so a
        fraction subset keeps the ids of the full split.
    """
    image_dir, gt_dir = Path(image_dir), Path(gt_dir)
    if not image_dir.is_dir():
        raise DataError(
            "folder not found",
            file=image_dir,
            expected=f"<city>/*{_IMAGE_SUFFIX} images (Cityscapes layout)",
        )
    files = sorted(image_dir.glob(f"*/*{_IMAGE_SUFFIX}"), key=lambda p: p.name)
    if not files:
        raise DataError(f"no *{_IMAGE_SUFFIX} images", file=image_dir, expected="<city>/ folders")
    ids = {_key(p.name): i for i, p in enumerate(files)}
    if image_list is not None:
        wanted = [_key(e) for e in read_image_list(image_list)]
        unknown = [k for k in wanted if k not in ids]
        if unknown:
            raise DataError(
                f"{len(unknown)} listed image(s) not found, e.g. {unknown[0]}",
                file=image_list,
                expected=f"images under {image_dir}",
            )
        keep = set(wanted)
        files = [p for p in files if _key(p.name) in keep]

    meta = cityscapes_metadata(str(image_dir), str(gt_dir))
    label_map = meta["thing_dataset_id_to_contiguous_id"]
    bad = BadRecords(skip_bad, str(image_list or image_dir))

    def work(p: Path):
        gt_file = gt_dir / p.parent.name / p.name.replace(_IMAGE_SUFFIX, _GT_SUFFIX)
        try:
            return _load_one(p, gt_file, ids[_key(p.name)], label_map)
        except DataError as e:
            return e

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        results = list(pool.map(work, files))
    records = []
    for res in results:
        if isinstance(res, DataError):
            bad.report(res)
        elif not filter_empty or any(a["iscrowd"] == 0 for a in res["annotations"]):
            records.append(res)
    logger.info("%s: %d Cityscapes images with instances", bad.source, len(records))
    meta.update(bad.summarize())
    return records, meta
