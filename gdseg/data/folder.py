"""Unlabeled image records: from a folder, from a COCO json's image list, or from labeled records.

Unlabeled records are ``{"file_name", "image_id"}`` plus ``"height"``/``"width"`` when known.
Their images are checked when read (:func:`gdseg.data.validation.read_image`); pass
``check_images=True`` to check every file up front instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .coco import read_coco_json
from .validation import BadRecords, DataError, check_image_files

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "as_unlabeled", "load_image_folder", "load_unlabeled_from_json"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _checked(records: list[dict], source: str, skip_bad: bool, check_images: bool) -> dict:
    """Header-check the records' images in place (dropping bad ones when skipping)."""
    bad = BadRecords(skip_bad, source)
    if check_images:
        items = [
            (
                r["file_name"],
                f"image id {r['image_id']}",
                (r["height"], r["width"]) if "height" in r else None,
            )
            for r in records
        ]
        keep = []
        for r, (hw, err) in zip(records, check_image_files(items)):
            if err is not None:
                bad.report(err)
                continue
            r["height"], r["width"] = hw
            keep.append(r)
        records[:] = keep
    return bad.summarize()


def load_image_folder(
    folder: str | os.PathLike,
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
    check_images: bool = False,
    skip_bad: bool = False,
) -> tuple[list[dict], dict]:
    """Unlabeled records of every image under a folder (recursive, symlinks followed).

    Files are sorted by their path relative to ``folder``; the image id is the position in
    that order, so ids are the same on every machine for the same folder content.

    Args:
        folder: root folder.
        extensions: lower-case file extensions to keep (case-insensitive match).
        check_images: open every header to check readability and record the size.
        skip_bad: with ``check_images``, skip unreadable files (counted) instead of raising.

    Returns:
        (records, metadata with "image_root", "num_skipped").
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError("folder not found", file=root, expected="a folder of images")
    rel = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # skip .cache, .git, ...
        for name in filenames:
            if name.lower().endswith(extensions) and not name.startswith("."):
                rel.append(os.path.relpath(os.path.join(dirpath, name), root))
    rel.sort(key=lambda p: Path(p).as_posix())
    if not rel:
        raise DataError(
            "no images found", file=root, expected=f"files ending in {', '.join(extensions)}"
        )
    records = [{"file_name": str((root / p).absolute()), "image_id": i} for i, p in enumerate(rel)]
    summary = _checked(records, str(root), skip_bad, check_images)
    logger.info("%s: %d unlabeled images", root, len(records))
    return records, {"image_root": str(root.absolute()), "json_file": None, **summary}


def load_unlabeled_from_json(
    json_file: str | os.PathLike,
    image_root: str | os.PathLike,
    check_images: bool = False,
    skip_bad: bool = False,
) -> tuple[list[dict], dict]:
    """Unlabeled records of the images a COCO json lists (its annotations are ignored).

    Args:
        json_file: COCO json; only ``images`` (``id``, ``file_name``, optional sizes) is used.
        image_root: folder the file names are relative to.
        check_images: open every header to check existence, readability and size.
        skip_bad: skip bad images (counted) instead of raising.

    Returns:
        (records in json order, metadata with "json_file", "image_root", "num_skipped").
    """
    data = read_coco_json(json_file)
    bad = BadRecords(skip_bad, str(json_file))
    records, seen = [], set()
    for i, img in enumerate(data["images"]):
        iid = img.get("id") if isinstance(img, dict) else None
        name = img.get("file_name") if isinstance(img, dict) else None
        if iid is None or iid in seen or not isinstance(name, str) or not name:
            bad.report(
                DataError(
                    f"images[{i}] has id {iid!r} and file_name {name!r}",
                    file=json_file,
                    record=f"image id {iid}",
                    expected="a unique id and a file_name",
                )
            )
            continue
        seen.add(iid)
        rec = {"file_name": os.path.abspath(os.path.join(image_root, name)), "image_id": iid}
        if isinstance(img.get("height"), int) and isinstance(img.get("width"), int):
            rec["height"], rec["width"] = img["height"], img["width"]
        records.append(rec)
    summary = _checked(records, str(json_file), skip_bad, check_images)
    skipped = bad.summarize()
    meta = {
        "json_file": os.path.abspath(json_file),
        "image_root": os.path.abspath(image_root),
        "num_skipped": summary["num_skipped"] + skipped["num_skipped"],
        "skipped": skipped["skipped"] + summary["skipped"],
    }
    if not records:
        raise DataError("no usable images listed", file=json_file, expected="an 'images' list")
    return records, meta


def as_unlabeled(records: list[dict]) -> list[dict]:
    """Unlabeled copies of labeled records (the published default unlabeled set)."""
    keys = ("file_name", "image_id", "height", "width")
    return [{k: r[k] for k in keys if k in r} for r in records]
