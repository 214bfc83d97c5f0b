"""COCO-format instance segmentation datasets -> records (see the contract for the format).

Polygons, uncompressed and compressed RLE are kept as they are in the json; :func:`decode_mask`
turns any of them into the same pixels as pycocotools' ``COCO.annToMask``. Crowd regions stay
in the records with ``iscrowd=1``: the transforms leave them out of the training targets and
the evaluator treats them as crowd.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os

import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO

from .validation import (
    BadRecords,
    DataError,
    check_bbox,
    check_image_files,
    check_segmentation,
    mask_area,
    rle_to_bbox,
    segmentation_to_rle,
)

logger = logging.getLogger(__name__)

__all__ = [
    "COCO_CATEGORY_IDS",
    "COCO_THING_CLASSES",
    "decode_mask",
    "load_coco_instances",
    "read_coco_json",
    "segmentation_to_rle",
]


# The 80 COCO thing classes, by json category id (ids have gaps: 12, 26, 29, 30, ...).
# fmt: off
COCO_THING_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]
# fmt: on
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def decode_mask(ann: dict, height: int, width: int) -> np.ndarray:
    """Decode one annotation's segmentation into a binary mask.

    Args:
        ann: a record annotation (or raw COCO annotation) with a "segmentation".
        height, width: size of the image it belongs to.

    Returns:
        np.uint8 [height, width] of 0/1, equal to pycocotools' ``annToMask``.
    """
    rle = segmentation_to_rle(ann["segmentation"], height, width)
    return np.ascontiguousarray(mask_util.decode(rle))


def read_coco_json(json_file: str | os.PathLike) -> dict:
    """Read a COCO json and check its top-level structure.

    Raises:
        DataError: missing file, invalid JSON, or missing/ill-typed "images", "annotations"
            or "categories" lists, saying which.
    """
    if not os.path.isfile(json_file):
        raise DataError("annotation file not found", file=json_file, expected="a COCO json file")
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})", file=json_file
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read file ({e})", file=json_file) from e
    if not isinstance(data, dict):
        raise DataError(
            f"top level is a {type(data).__name__}",
            file=json_file,
            expected='a JSON object with "images", "annotations" and "categories"',
        )
    if not isinstance(data.get("images"), list):
        raise DataError('no "images" list', file=json_file, expected="COCO format")
    for key in ("annotations", "categories"):
        if key in data and not isinstance(data[key], list):
            raise DataError(f'"{key}" is not a list', file=json_file, expected="COCO format")
    return data


def _image_ids(data: dict, json_file: str) -> None:
    """Check every image has a unique integer id and a file name."""
    seen: set[int] = set()
    for i, img in enumerate(data["images"]):
        iid = img.get("id") if isinstance(img, dict) else None
        if not isinstance(iid, int) or isinstance(iid, bool):
            raise DataError(
                f"images[{i}] has id {iid!r}", file=json_file, expected="an integer image id"
            )
        if iid in seen:
            raise DataError(f"duplicate image id {iid}", file=json_file, expected="unique ids")
        seen.add(iid)
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise DataError(
                "image has no file_name",
                file=json_file,
                record=f"image id {iid}",
                expected='a "file_name" string',
            )


def _categories(data: dict, json_file: str) -> tuple[list[str], dict[int, int]]:
    """Category names and json id -> contiguous id (json ids sorted ascending)."""
    cats = data.get("categories") or []
    if not cats:
        raise DataError('no "categories"', file=json_file, expected="at least one category")
    by_id: dict[int, str] = {}
    for i, c in enumerate(cats):
        cid = c.get("id") if isinstance(c, dict) else None
        if not isinstance(cid, int) or isinstance(cid, bool):
            raise DataError(
                f"categories[{i}] has id {cid!r}", file=json_file, expected="an integer category id"
            )
        if cid in by_id:
            raise DataError(f"duplicate category id {cid}", file=json_file, expected="unique ids")
        by_id[cid] = str(c.get("name", cid))
    ids = sorted(by_id)
    return [by_id[i] for i in ids], {cid: k for k, cid in enumerate(ids)}


def _annotation_ids(data: dict, json_file: str) -> None:
    """Check annotation ids are unique; number them 1.. when the json has none at all."""
    anns = data.get("annotations") or []
    have = [isinstance(a, dict) and "id" in a for a in anns]
    if anns and not any(have):
        logger.warning("%s: annotations have no 'id'; numbering them 1..%d", json_file, len(anns))
        for k, a in enumerate(anns):
            a["id"] = k + 1
        return
    seen: set = set()
    for i, a in enumerate(anns):
        if not isinstance(a, dict) or "id" not in a:
            raise DataError(
                f"annotations[{i}] has no 'id'",
                file=json_file,
                expected="every annotation to have a unique id",
            )
        if a["id"] in seen:
            raise DataError(
                f"duplicate annotation id {a['id']}", file=json_file, expected="unique ids"
            )
        seen.add(a["id"])


def _build_coco_api(data: dict) -> COCO:
    """pycocotools index over an already-validated dataset (its prints are swallowed)."""
    api = COCO()
    api.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


def _convert_annotation(
    ann: dict, height: int, width: int, cat_map: dict[int, int], file: str
) -> dict:
    """Validate one raw annotation and turn it into a record annotation (raises DataError)."""
    record = f"annotation id {ann['id']} (image id {ann.get('image_id')})"
    if ann.get("category_id") not in cat_map:
        raise DataError(
            f"unknown category_id {ann.get('category_id')!r}",
            file=file,
            record=record,
            expected=f"one of {sorted(cat_map)}",
        )
    segm = ann.get("segmentation")
    if segm is None:
        raise DataError("no segmentation", file=file, record=record, expected="polygons or RLE")
    bad = check_segmentation(segm, height, width)
    if bad is not None:
        raise DataError(bad[0], file=file, record=record, expected=bad[1])
    try:
        rle = segmentation_to_rle(segm, height, width)
        area = mask_area(rle)
    except (TypeError, ValueError, KeyError) as e:
        raise DataError(f"cannot decode segmentation ({e})", file=file, record=record) from e
    if area == 0:
        raise DataError(
            "mask is empty (0 pixels inside the image)",
            file=file,
            record=record,
            expected="a mask with at least one pixel",
        )
    if "bbox" in ann:
        bad = check_bbox(ann["bbox"], height, width)
        if bad is not None:
            raise DataError(bad[0], file=file, record=record, expected=bad[1])
        bbox = [float(v) for v in ann["bbox"]]
    else:
        bbox = rle_to_bbox(rle)
    iscrowd = int(ann.get("iscrowd", 0))
    if iscrowd not in (0, 1):
        raise DataError(
            f"iscrowd = {ann.get('iscrowd')!r}", file=file, record=record, expected="0 or 1"
        )
    return {
        "category_id": cat_map[ann["category_id"]],
        "segmentation": segm,
        "bbox": bbox,
        "iscrowd": iscrowd,
        "id": ann["id"],
    }


def _image_sizes(
    images: list[dict], paths: list[str], json_file: str, bad: BadRecords, check_images: bool
) -> dict[int, tuple[int, int]]:
    """(height, width) per good image id; bad images are reported and left out.

    With ``check_images`` every file is opened (header only) to check it exists, is readable
    and matches the json's size; images the json gives no size for take the file's size.
    """
    given: dict[int, tuple[int, int] | None] = {}
    for img in images:
        h, w = img.get("height"), img.get("width")
        if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w)):
            given[img["id"]] = (h, w)
        elif h is None and w is None and check_images:
            given[img["id"]] = None  # take the size from the file
        else:
            bad.report(
                DataError(
                    f"height/width = {h!r}/{w!r}",
                    file=json_file,
                    record=f"image id {img['id']}",
                    expected="positive integers in the json",
                )
            )
    if not check_images:
        return {k: v for k, v in given.items() if v is not None}
    todo = [(p, img) for p, img in zip(paths, images) if img["id"] in given]
    results = check_image_files([(p, f"image id {img['id']}", given[img["id"]]) for p, img in todo])
    sizes: dict[int, tuple[int, int]] = {}
    for (_, img), (hw, err) in zip(todo, results):
        if err is not None:
            bad.report(err)
        else:
            sizes[img["id"]] = hw
    return sizes


def load_coco_instances(
    json_file: str | os.PathLike,
    image_root: str | os.PathLike,
    dataset_name: str | None = None,
    filter_empty: bool = True,
    skip_bad: bool = False,
    check_images: bool = True,
) -> tuple[list[dict], dict]:
    """Load a COCO-format instance segmentation json into records.

    Args:
        json_file: COCO instances json.
        image_root: folder the json's ``file_name`` entries are relative to.
        dataset_name: name used in log messages (defaults to the json path).
        filter_empty: drop images without any non-crowd annotation.
        skip_bad: skip bad images/annotations (counted and logged) instead of raising.
        check_images: check each image exists, is readable and has the json's size (header
            read only, a few threads); turn off to load huge datasets faster.

    Returns:
        (records sorted by image id, metadata with "thing_classes",
        "thing_dataset_id_to_contiguous_id", "thing_contiguous_id_to_dataset_id",
        "json_file", "image_root", "evaluator_type", "split" (the ``gdseg split`` record of
        a labeled-fraction file, or None), "num_skipped", "skipped").

    Raises:
        DataError: naming the file, record and what was expected.
    """
    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    data = read_coco_json(json_file)
    _image_ids(data, json_file)
    thing_classes, cat_map = _categories(data, json_file)
    _annotation_ids(data, json_file)
    bad = BadRecords(skip_bad, dataset_name or json_file)

    images = sorted(data["images"], key=lambda img: img["id"])
    paths = [os.path.join(image_root, img["file_name"]) for img in images]
    sizes = _image_sizes(images, paths, json_file, bad, check_images)

    api = _build_coco_api(data)
    for ann in data.get("annotations") or []:
        if ann.get("image_id") not in api.imgs:
            bad.report(
                DataError(
                    f"unknown image_id {ann.get('image_id')!r}",
                    file=json_file,
                    record=f"annotation id {ann['id']}",
                    expected="an id listed in 'images'",
                )
            )

    records, num_empty = [], 0
    for img, path in zip(images, paths):
        hw = sizes.get(img["id"])
        if hw is None:
            continue
        anns = []
        for ann in api.imgToAnns.get(img["id"], []):
            try:
                anns.append(_convert_annotation(ann, hw[0], hw[1], cat_map, json_file))
            except DataError as e:
                bad.report(e)
        if filter_empty and not any(a["iscrowd"] == 0 for a in anns):
            num_empty += 1
            continue
        records.append(
            {
                "file_name": os.path.abspath(path),
                "image_id": img["id"],
                "height": hw[0],
                "width": hw[1],
                "annotations": anns,
            }
        )
    if num_empty:
        logger.info("%s: dropped %d image(s) without annotations", bad.source, num_empty)
    logger.info(
        "%s: %d images, %d annotations",
        bad.source,
        len(records),
        sum(len(r["annotations"]) for r in records),
    )
    metadata = {
        "thing_classes": thing_classes,
        "thing_dataset_id_to_contiguous_id": cat_map,
        "thing_contiguous_id_to_dataset_id": {v: k for k, v in cat_map.items()},
        "json_file": os.path.abspath(json_file),
        "image_root": os.path.abspath(image_root),
        "evaluator_type": "coco",
        # How a labeled-fraction file was made (written by gdseg split), without the id list.
        "split": {k: v for k, v in (data.get("gdseg_split") or {}).items() if k != "image_ids"}
        or None,
        **bad.summarize(),
    }
    return records, metadata
