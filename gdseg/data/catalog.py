"""Dataset registry: names -> (records, metadata).

Built-in names follow the published layout (SPEC §5) under a root taken from, in order, the
``root`` argument, ``$GDSEG_DATASETS``, ``$DETECTRON2_DATASETS`` and ``./datasets``:

- ``coco_2017_train``, ``coco_2017_val``: ``coco/{train,val}2017/`` +
  ``coco/annotations/instances_{train,val}2017.json``;
- ``coco_2017_train_<suffix>``: ``coco/annotations/instances_train2017_<suffix>.json``
  (suffix = integer percent, or ``int(100/p)`` below 1 %; made by ``gdseg split coco``);
- ``coco_2017_unlabel`` (alias ``coco_2017_unlabel_train``): every image under
  ``coco/unlabeled2017/`` (or the published ``coco_unlabel/`` json + ``images/``);
- ``coco_2017_train_unlabeled``: the training images without their labels;
- ``cityscapes_fine_instance_seg_{train,val}``: ``cityscapes/{leftImg8bit,gtFine}/<split>/``;
- ``cityscapes_fine_instance_seg_train_<p>``: the list ``cityscapes/splits/train_<p>.txt``
  (``gdseg split cityscapes``) or the published ``{leftImg8bit,gtFine}/train_<p>/`` folders;
- ``cityscapes_fine_instance_seg_train_unlabeled``: the Cityscapes training images;
- ``synthetic_{train,val}``, ``synthetic_train_<suffix>``, ``synthetic_train_unlabeled``:
  generated shapes (:mod:`gdseg.data.synthetic`), split with the split seed on first use.

Other datasets are added with :func:`register`, :func:`register_coco_instances` or
:func:`register_image_folder`.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cityscapes import cityscapes_metadata, load_cityscapes_instances
from .coco import COCO_CATEGORY_IDS, COCO_THING_CLASSES, load_coco_instances
from .folder import as_unlabeled, load_image_folder, load_unlabeled_from_json
from .splits import normalize_percentage as normalize
from .splits import percentage_suffix, split_coco
from .synthetic import SHAPES, make_synthetic_coco
from .validation import DataError

__all__ = [
    "build_labeled_dataset",
    "build_test_datasets",
    "build_unlabeled_dataset",
    "SYNTHETIC_DEFAULTS",
    "dataset_root",
    "get_dataset",
    "get_metadata",
    "list_datasets",
    "name_for_percentage",
    "register",
    "register_coco_instances",
    "register_image_folder",
]

SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "num_train": 400,
    "num_val": 100,
    "image_size": 128,
    "seed": 0,
    "num_classes": 5,
    "max_instances": 6,
    "style": "textured",
    "object_size": (0.08, 0.22),
    "root": None,
}

_REGISTRY: dict[str, tuple[Callable[..., Any], dict]] = {}

# fmt: off
_BUILTIN_NAMES = (
    "coco_2017_train", "coco_2017_val", "coco_2017_train_<suffix>", "coco_2017_unlabel",
    "coco_2017_train_unlabeled", "cityscapes_fine_instance_seg_train",
    "cityscapes_fine_instance_seg_val", "cityscapes_fine_instance_seg_train_<p>",
    "cityscapes_fine_instance_seg_train_unlabeled", "synthetic_train", "synthetic_val",
    "synthetic_train_<suffix>", "synthetic_train_unlabeled",
)
# fmt: on


def dataset_root(root: str | os.PathLike | None = None) -> Path:
    """The datasets root: ``root`` or $GDSEG_DATASETS or $DETECTRON2_DATASETS or ./datasets."""
    if root:
        return Path(root).expanduser()
    env = os.environ.get("GDSEG_DATASETS") or os.environ.get("DETECTRON2_DATASETS")
    return Path(env or "datasets").expanduser()


def register(
    name: str, loader_fn: Callable[..., Any], metadata: dict | None = None, overwrite: bool = False
) -> None:
    """Register a dataset.

    Args:
        name: dataset name.
        loader_fn: returns records or (records, metadata); it receives those of the options
            of :func:`get_dataset` (``filter_empty``, ``skip_bad``, ...) it declares.
        metadata: static metadata (merged under what the loader returns).
        overwrite: allow replacing an existing registration.
    """
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"dataset {name!r} is already registered (pass overwrite=True)")
    _REGISTRY[name] = (loader_fn, dict(metadata or {}))


def register_coco_instances(
    name: str,
    json_file: str | os.PathLike,
    image_root: str | os.PathLike,
    metadata: dict | None = None,
) -> None:
    """Register a COCO-format json + image folder under ``name``."""

    def load(filter_empty: bool = True, skip_bad: bool = False, check_images: bool = True):
        return load_coco_instances(
            json_file, image_root, name, filter_empty, skip_bad, check_images
        )

    register(
        name, load, {"json_file": str(json_file), "image_root": str(image_root), **(metadata or {})}
    )


def register_image_folder(name: str, folder: str | os.PathLike) -> None:
    """Register a folder of unlabeled images (recursive) under ``name``."""

    def load(skip_bad: bool = False, check_images: bool = False):
        return load_image_folder(folder, check_images=check_images, skip_bad=skip_bad)

    register(name, load, {"image_root": str(folder)})


def list_datasets() -> list[str]:
    """Registered names plus the built-in name patterns."""
    return sorted(_REGISTRY) + list(_BUILTIN_NAMES)


def name_for_percentage(name: str, percentage: float) -> str:
    """Name of the labeled fraction of a training set: ("coco_2017_train", 5) -> "..._train_5".

    100 % keeps the name; 250 (the published code) and 0.4 both give ``<name>_250``.
    """
    suffix = percentage_suffix(percentage)
    return name if suffix == "100" else f"{name}_{suffix}"


def _call(fn: Callable[..., Any], options: dict) -> Any:
    """Call fn with the options it accepts."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**options)
    return fn(**{k: v for k, v in options.items() if k in params})


def _need(path: Path, what: str, hint: str = "") -> Path:
    if not path.exists():
        raise DataError("not found", file=path, expected=what + (f"; {hint}" if hint else ""))
    return path


def _coco(root: Path, name: str, opts: dict) -> tuple[list[dict], dict]:
    m = re.fullmatch(r"coco_2017_(train|val)(?:_(\d+))?", name)
    split, suffix = m.group(1), m.group(2)
    images = _need(root / "coco" / f"{split}2017", f"the COCO {split}2017 image folder")
    if suffix is None:
        js = root / "coco" / "annotations" / f"instances_{split}2017.json"
        _need(js, f"the COCO {split} annotations")
    else:
        full = root / "coco" / "annotations" / "instances_train2017.json"
        js = root / "coco" / "annotations" / f"instances_train2017_{suffix}.json"
        _need(
            js,
            f"the labeled-fraction file for suffix {suffix}",
            f"make it with: gdseg split coco --json {full} --percentages "
            f"{_suffix_to_percentage(suffix)} --seed {opts.get('split_seed', 0)}",
        )
    return load_coco_instances(
        js, images, name, opts["filter_empty"], opts["skip_bad"], opts["check_images"]
    )


def _suffix_to_percentage(suffix: str) -> str:
    """Inverse of percentage_suffix for the command hint (250 -> 0.4)."""
    s = int(suffix)
    return str(s) if s <= 100 else f"{100 / s:g}"


def _coco_unlabeled(root: Path, name: str, opts: dict) -> tuple[list[dict], dict]:
    if name == "coco_2017_train_unlabeled":
        js = _need(
            root / "coco" / "annotations" / "instances_train2017.json", "the COCO train json"
        )
        return load_unlabeled_from_json(js, root / "coco" / "train2017", skip_bad=opts["skip_bad"])
    folder = root / "coco" / "unlabeled2017"
    published = root / "coco_unlabel" / "coco_unlabel_train.json"
    if not folder.is_dir() and published.is_file():
        return load_unlabeled_from_json(
            published, root / "coco_unlabel" / "images", skip_bad=opts["skip_bad"]
        )
    _need(folder, "the COCO unlabeled2017 image folder")
    return load_image_folder(folder, skip_bad=opts["skip_bad"])


def _cityscapes(root: Path, name: str, opts: dict) -> tuple[list[dict], dict]:
    m = re.fullmatch(r"cityscapes_fine_instance_seg_(train|val)(?:_(\d+|unlabeled))?", name)
    split, part = m.group(1), m.group(2)
    city = root / "cityscapes"
    if part == "unlabeled":
        return load_image_folder(
            _need(city / "leftImg8bit" / "train", "Cityscapes leftImg8bit/train")
        )
    image_list = None
    image_dir, gt_dir = city / "leftImg8bit" / split, city / "gtFine" / split
    if part is not None:
        image_list = city / "splits" / f"train_{part}.txt"
        published = (city / "leftImg8bit" / f"train_{part}", city / "gtFine" / f"train_{part}")
        if not image_list.is_file() and published[0].is_dir():
            image_dir, gt_dir, image_list = published[0], published[1], None
        else:
            _need(
                image_list,
                f"the {part} % Cityscapes split list",
                f"make it with: gdseg split cityscapes --root {city} --percentages {part} "
                f"--seed {opts.get('split_seed', 0)}",
            )
    _need(image_dir, "Cityscapes images (<city>/*_leftImg8bit.png)")
    _need(gt_dir, "Cityscapes annotations (<city>/*_gtFine_instanceIds.png)")
    return load_cityscapes_instances(
        image_dir, gt_dir, image_list, opts["filter_empty"], opts["skip_bad"]
    )


def _synthetic(name: str, opts: dict) -> tuple[list[dict], dict]:
    m = re.fullmatch(r"synthetic_(train|val)(?:_(\d+|unlabeled))?", name)
    split, part = m.group(1), m.group(2)
    p = {**SYNTHETIC_DEFAULTS, **(opts.get("synthetic") or {})}
    js, images = make_synthetic_coco(
        root=p["root"],
        num_images=p["num_train"] if split == "train" else p["num_val"],
        image_size=p["image_size"],
        seed=p["seed"],
        num_classes=p["num_classes"],
        max_instances=p["max_instances"],
        split=split,
        style=p["style"],
        object_size=tuple(p["object_size"]),
    )
    if part == "unlabeled":
        return load_unlabeled_from_json(js, images)
    if part is not None:
        seed = int(opts.get("split_seed", 0))
        split_js = Path(js).parent / f"splits_seed{seed}" / f"annotations_{part}.json"
        if not split_js.is_file():
            split_coco(js, [float(_suffix_to_percentage(part))], seed, split_js.parent)
        js = str(split_js)
    return load_coco_instances(
        js, images, name, opts["filter_empty"], opts["skip_bad"], opts["check_images"]
    )


def get_dataset(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    filter_empty: bool = True,
    skip_bad: bool = False,
    check_images: bool = True,
    split_seed: int = 0,
    synthetic: dict | None = None,
) -> tuple[list[dict], dict]:
    """Records and metadata of a registered or built-in dataset.

    Args:
        name: dataset name (see the module docstring).
        root: datasets root (default: see :func:`dataset_root`).
        filter_empty: drop labeled images without non-crowd annotations.
        skip_bad: skip and count bad records instead of raising.
        check_images: check image files up front (labeled COCO-format sets).
        split_seed: seed named in hints and used for synthetic label fractions.
        synthetic: overrides of :data:`SYNTHETIC_DEFAULTS`.

    Raises:
        KeyError: unknown name (the message lists the known ones).
        DataError: missing or bad files, naming the path and what was expected.
    """
    opts = {
        "filter_empty": filter_empty,
        "skip_bad": skip_bad,
        "check_images": check_images,
        "split_seed": split_seed,
        "synthetic": synthetic,
    }
    if name in _REGISTRY:
        fn, static = _REGISTRY[name]
        out = _call(fn, opts)
        records, meta = out if isinstance(out, tuple) else (out, {})
        return records, {**static, **meta}
    base = dataset_root(root)
    if re.fullmatch(r"coco_2017_(train|val)|coco_2017_train_\d+", name):
        return _coco(base, name, opts)
    if name in ("coco_2017_unlabel", "coco_2017_unlabel_train", "coco_2017_train_unlabeled"):
        return _coco_unlabeled(base, name, opts)
    if re.fullmatch(r"cityscapes_fine_instance_seg_(train(_\d+|_unlabeled)?|val)", name):
        return _cityscapes(base, name, opts)
    if re.fullmatch(r"synthetic_(train(_\d+|_unlabeled)?|val)", name):
        return _synthetic(name, opts)
    raise KeyError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())}")


def _class_metadata(classes: list[str], ids: list[int], evaluator_type: str) -> dict:
    return {
        "thing_classes": list(classes),
        "thing_dataset_id_to_contiguous_id": {cid: k for k, cid in enumerate(ids)},
        "thing_contiguous_id_to_dataset_id": {k: cid for k, cid in enumerate(ids)},
        "evaluator_type": evaluator_type,
    }


def get_metadata(name: str, synthetic: dict | None = None) -> dict:
    """Class metadata of a dataset, without loading its records where possible."""
    if name in _REGISTRY and "thing_classes" in _REGISTRY[name][1]:
        return dict(_REGISTRY[name][1])
    if name.startswith("coco_2017_"):
        return _class_metadata(COCO_THING_CLASSES, COCO_CATEGORY_IDS, "coco")
    if name.startswith("cityscapes_"):
        return cityscapes_metadata()
    if name.startswith("synthetic_"):
        k = {**SYNTHETIC_DEFAULTS, **(synthetic or {})}["num_classes"]
        return _class_metadata(list(SHAPES[:k]), list(range(1, k + 1)), "coco")
    return get_dataset(name, check_images=False)[1]


# ---------------------------------------------------------------------------------------------
# From a config (the only functions here that read one)
# ---------------------------------------------------------------------------------------------


def _cfg_options(cfg: Any) -> dict:
    syn = cfg.DATASETS.SYNTHETIC
    return {
        "root": cfg.DATASETS.ROOT or None,
        "filter_empty": bool(cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS),
        "skip_bad": bool(cfg.DATALOADER.SKIP_BAD_RECORDS),
        "split_seed": int(cfg.SSL.SPLIT_SEED),
        "synthetic": {
            "num_train": int(syn.NUM_TRAIN),
            "num_val": int(syn.NUM_VAL),
            "image_size": int(syn.IMAGE_SIZE),
            "seed": int(syn.SEED),
            "num_classes": int(syn.NUM_CLASSES),
            "max_instances": int(syn.MAX_INSTANCES),
            "style": str(syn.STYLE),
            "object_size": tuple(float(v) for v in syn.OBJECT_SIZE),
            "root": syn.CACHE_DIR or None,
        },
    }


def _check_split_seed(meta: dict, seed: int, name: str) -> None:
    """A fraction file made with another seed than SSL.SPLIT_SEED is refused."""
    made = meta.get("split") or {}
    if "seed" in made and int(made["seed"]) != seed:
        raise DataError(
            f"labeled-fraction file was made with seed {made['seed']}",
            file=meta.get("json_file"),
            record=name,
            expected=f"seed {seed} (SSL.SPLIT_SEED); re-run gdseg split with --seed {seed}",
        )


def _concat(parts: list[tuple[str, list[dict], dict]]) -> tuple[list[dict], dict]:
    """Join datasets that share their classes; metadata of the first (+ totals)."""
    records, meta = [], dict(parts[0][2])
    for name, recs, m in parts:
        if m.get("thing_classes", meta.get("thing_classes")) != meta.get("thing_classes"):
            raise ValueError(f"dataset {name} has other classes than {parts[0][0]}")
        records.extend(recs)
    meta["name"] = "+".join(name for name, _, _ in parts)
    meta["num_skipped"] = sum(m.get("num_skipped", 0) for _, _, m in parts)
    return records, meta


def build_labeled_dataset(cfg: Any) -> tuple[list[dict], dict]:
    """Labeled training records: DATASETS.TRAIN_JSON (+ image root) or DATASETS.TRAIN names,
    reduced to the SSL.PERCENTAGE fraction (file ``<stem>_<suffix>.json`` / ``<name>_<suffix>``).
    """
    opts = _cfg_options(cfg)
    pct = float(cfg.SSL.PERCENTAGE)
    if cfg.DATASETS.TRAIN_JSON:
        js = Path(cfg.DATASETS.TRAIN_JSON)
        suffix = percentage_suffix(pct)
        if suffix != "100":
            full, js = js, js.with_name(f"{js.stem}_{suffix}.json")
            _need(
                js,
                f"the {normalize(pct)} % labeled fraction of {full}",
                f"make it with: gdseg split coco --json {full} --percentages {normalize(pct):g} "
                f"--seed {opts['split_seed']}",
            )
        records, meta = load_coco_instances(
            js,
            cfg.DATASETS.TRAIN_IMAGE_ROOT or js.parent,
            str(js),
            opts["filter_empty"],
            opts["skip_bad"],
        )
        _check_split_seed(meta, opts["split_seed"], str(js))
        return records, {**meta, "name": str(js)}
    parts = []
    for name in cfg.DATASETS.TRAIN:
        name = name_for_percentage(name, pct)
        recs, meta = get_dataset(name, **opts)
        _check_split_seed(meta, opts["split_seed"], name)
        parts.append((name, recs, meta))
    return _concat(parts)


def build_unlabeled_dataset(cfg: Any) -> tuple[list[dict], dict]:
    """Unlabeled records: DATASETS.UNLABELED_JSON / UNLABELED_IMAGE_ROOT, DATASETS.UNLABELED
    names, or by default all training images (labeled ones included, as published).
    """
    opts = _cfg_options(cfg)
    ds = cfg.DATASETS
    if ds.UNLABELED_JSON:
        root = ds.UNLABELED_IMAGE_ROOT or Path(ds.UNLABELED_JSON).parent
        return load_unlabeled_from_json(ds.UNLABELED_JSON, root, skip_bad=opts["skip_bad"])
    if ds.UNLABELED_IMAGE_ROOT:
        return load_image_folder(ds.UNLABELED_IMAGE_ROOT, skip_bad=opts["skip_bad"])
    if ds.UNLABELED:
        return _concat([(n, *get_dataset(n, **opts)) for n in ds.UNLABELED])
    if ds.TRAIN_JSON:
        root = ds.TRAIN_IMAGE_ROOT or Path(ds.TRAIN_JSON).parent
        return load_unlabeled_from_json(ds.TRAIN_JSON, root, skip_bad=opts["skip_bad"])
    parts = []
    for name in ds.TRAIN:
        unlabeled = {"coco_2017_train": "coco_2017_train_unlabeled"}.get(name, f"{name}_unlabeled")
        if name in _REGISTRY:  # a user's registered set: its own images, labels dropped
            recs, meta = get_dataset(name, **{**opts, "filter_empty": False})
            parts.append((name, as_unlabeled(recs), meta))
        else:
            parts.append((unlabeled, *get_dataset(unlabeled, **opts)))
    return _concat(parts)


def build_test_datasets(cfg: Any) -> list[tuple[str, list[dict], dict]]:
    """(name, records, metadata) per evaluation set: DATASETS.TEST_JSON or DATASETS.TEST.

    Images without annotations are kept (they count for evaluation).
    """
    opts = {**_cfg_options(cfg), "filter_empty": False}
    if cfg.DATASETS.TEST_JSON:
        js = cfg.DATASETS.TEST_JSON
        root = cfg.DATASETS.TEST_IMAGE_ROOT or Path(js).parent
        recs, meta = load_coco_instances(js, root, js, False, opts["skip_bad"])
        return [(str(js), recs, meta)]
    return [(name, *get_dataset(name, **opts)) for name in cfg.DATASETS.TEST]
