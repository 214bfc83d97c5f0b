"""Seeded, recorded, nested labeled-fraction splits (the ``gdseg split`` command).

The published split tool draws fractions without a seed, so nobody can reproduce a split.
Here every image gets a rank from a hash of (seed, image key); a p % split takes the
``int(p * N / 100)`` images of lowest rank. Hence the same seed gives the same split on any
machine and NumPy version, and the splits of one seed are nested (1 % inside 2 % inside 5 %).
Split files follow the published names: ``<stem>_<suffix>.json`` where the suffix is the
integer percentage, or ``int(100 / p)`` below 1 % (0.4 % -> 250).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..fileio import atomic_write_text
from .coco import read_coco_json
from .validation import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "normalize_percentage",
    "percentage_suffix",
    "read_image_list",
    "split_cityscapes",
    "split_coco",
]


def normalize_percentage(p: float) -> float:
    """A labeled fraction in percent; values above 100 are the published code ``100 / p``.

    Examples: 5 -> 5.0, 0.4 -> 0.4, 250 -> 0.4, 1000 -> 0.1, 100 -> 100.0 (all labels).
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0:
        raise ValueError(f"percentage must be a positive number, got {p!r}")
    return float(p) if p <= 100 else 100.0 / p


def percentage_suffix(p: float) -> str:
    """File/dataset-name suffix of a percentage: ``str(int(p))`` if p >= 1, else ``int(100/p)``.

    Accepts the published code too (250 -> "250").
    """
    p = normalize_percentage(p)
    return str(int(p)) if p >= 1 else str(int(100 / p))


def _checked_percentages(percentages: Iterable[float]) -> list[tuple[float, float, str]]:
    """(as given, normalized, suffix) per percentage; refuses ambiguous ones."""
    out, seen = [], {}
    for given in percentages:
        p = normalize_percentage(given)
        if p >= 1 and p != int(p):
            raise ValueError(
                f"percentage {given} >= 1 must be a whole number (file names carry the integer "
                "percentage; use e.g. 2 or 3)"
            )
        suffix = percentage_suffix(p)
        if suffix in seen and seen[suffix] != p:
            raise ValueError(
                f"percentages {seen[suffix]} and {p} would both write suffix '{suffix}'"
            )
        seen[suffix] = p
        out.append((given, p, suffix))
    if not out:
        raise ValueError("no percentages given")
    return out


def _rank(seed: int, key: str) -> bytes:
    """Sort key of one image: a hash of (seed, key), independent of list order and NumPy."""
    return hashlib.sha256(f"{seed}\x00{key}".encode()).digest()


def ordered_by_seed(keys: Sequence[str], seed: int) -> list[int]:
    """Indices of ``keys`` in the seeded order; the prefixes of this order are the splits."""
    return sorted(range(len(keys)), key=lambda i: _rank(seed, keys[i]))


def _num_selected(p: float, n: int, source: str) -> int:
    k = int(p * n / 100)
    if k == 0:
        need = math.ceil(100 / p)
        raise ValueError(
            f"{p} % of the {n} images of {source} selects 0 images; a {p} % split needs at "
            f"least {need} images (or use a larger percentage)"
        )
    return k


def _sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def split_coco(
    json_file: str | os.PathLike,
    percentages: Iterable[float],
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
) -> dict[float, str]:
    """Write labeled-fraction subsets of a COCO json.

    Each output ``<out_dir>/<stem>_<suffix>.json`` holds exactly ``int(p * N / 100)`` of the
    N images, all of their annotations, and every other top-level entry (categories, info,
    licenses) unchanged, plus a ``"gdseg_split"`` record: seed, percentage, source file and
    its sha256, image ids. Nothing is written if any percentage is refused.

    Args:
        json_file: the full COCO json, e.g. ``instances_train2017.json``.
        percentages: e.g. ``[0.4, 1, 2, 5, 10]`` (the published code 250 means 0.4).
        seed: split seed.
        out_dir: output folder (default: the json's folder).

    Returns:
        {percentage as given: path of the written json}.

    Raises:
        DataError: malformed json (says what is wrong).
        ValueError: a percentage selecting zero images, or an invalid percentage.
    """
    json_file = Path(json_file)
    data = read_coco_json(json_file)
    images = data["images"]
    ids = []
    for i, img in enumerate(images):
        iid = img.get("id") if isinstance(img, dict) else None
        if not isinstance(iid, (int, str)) or isinstance(iid, bool):
            raise DataError(f"images[{i}] has id {iid!r}", file=json_file, expected="an image id")
        ids.append(iid)
    if len(set(ids)) != len(ids):
        raise DataError("duplicate image ids", file=json_file, expected="unique ids")
    if not images:
        raise DataError("the json lists no images", file=json_file, expected="images to split")
    plan = _checked_percentages(percentages)
    counts = [_num_selected(p, len(images), str(json_file)) for _, p, _ in plan]

    order = ordered_by_seed([str(i) for i in ids], seed)
    out_dir = Path(out_dir) if out_dir is not None else json_file.parent
    source_sha = _sha256_of(json_file)
    written: dict[float, str] = {}
    for (given, p, suffix), k in zip(plan, counts):
        chosen = {ids[i] for i in order[:k]}
        subset = {key: v for key, v in data.items() if key not in ("images", "annotations")}
        subset["images"] = [img for img in images if img["id"] in chosen]
        subset["annotations"] = [
            a for a in data.get("annotations") or [] if a.get("image_id") in chosen
        ]
        subset["gdseg_split"] = {
            "tool": "gdseg split",
            "seed": seed,
            "percentage": p,
            "source": str(json_file.resolve()),
            "source_sha256": source_sha,
            "source_num_images": len(images),
            "num_images": k,
            "image_ids": [img["id"] for img in subset["images"]],
        }
        path = out_dir / f"{json_file.stem}_{suffix}.json"
        atomic_write_text(json.dumps(subset), path)
        logger.info("%s %% split (seed %d): %d/%d images -> %s", p, seed, k, len(images), path)
        written[given] = str(path)
    return written


def _cityscapes_images(root: Path, split: str) -> list[str]:
    """Image paths relative to ``leftImg8bit/<split>`` (``<city>/<name>_leftImg8bit.png``)."""
    image_dir = root / "leftImg8bit" / split
    if not image_dir.is_dir():
        raise DataError(
            "folder not found",
            file=image_dir,
            expected="the Cityscapes layout <root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png",
        )
    rel = sorted(p.relative_to(image_dir).as_posix() for p in image_dir.glob("*/*_leftImg8bit.png"))
    if not rel:
        raise DataError("no *_leftImg8bit.png images", file=image_dir, expected="<city>/ folders")
    return rel


def split_cityscapes(
    root: str | os.PathLike,
    percentages: Iterable[float],
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    split: str = "train",
) -> dict[float, str]:
    """Write labeled-fraction list files of Cityscapes images (no copies, no links).

    Each ``<out_dir>/<split>_<suffix>.txt`` lists ``int(p * N / 100)`` image paths relative to
    ``<root>/leftImg8bit/<split>``, one per line, after ``#`` comment lines recording the seed,
    percentage and source. :func:`gdseg.data.cityscapes.load_cityscapes_instances` reads them
    (as well as the published ``perc_<p>.txt`` lists).

    Args:
        root: Cityscapes root holding ``leftImg8bit/`` and ``gtFine/``.
        percentages: e.g. ``[5, 10, 20, 30]``.
        seed: split seed.
        out_dir: output folder (default ``<root>/splits``, where the catalog looks).
        split: which image split to subsample.

    Returns:
        {percentage as given: path of the list file}.
    """
    root = Path(root)
    rel = _cityscapes_images(root, split)
    plan = _checked_percentages(percentages)
    counts = [_num_selected(p, len(rel), str(root / "leftImg8bit" / split)) for _, p, _ in plan]
    order = ordered_by_seed(rel, seed)
    out_dir = Path(out_dir) if out_dir is not None else root / "splits"
    written: dict[float, str] = {}
    for (given, p, suffix), k in zip(plan, counts):
        chosen = sorted(rel[i] for i in order[:k])
        header = (
            f"# gdseg split cityscapes: seed={seed} percentage={p} num_images={k} "
            f"source_num_images={len(rel)}\n# source: {(root / 'leftImg8bit' / split).resolve()}\n"
        )
        path = out_dir / f"{split}_{suffix}.txt"
        atomic_write_text(header + "".join(line + "\n" for line in chosen), path)
        logger.info(
            "%s %% cityscapes split (seed %d): %d/%d images -> %s", p, seed, k, len(rel), path
        )
        written[given] = str(path)
    return written


def read_image_list(path: str | os.PathLike) -> list[str]:
    """Entries of a list file, skipping blank lines and ``#`` comments."""
    if not os.path.isfile(path):
        raise DataError("list file not found", file=path, expected="a split list (gdseg split)")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith("#")]
