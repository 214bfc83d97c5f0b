"""Datasets (COCO-format, Cityscapes, image folders, synthetic shapes), splits and checks.

Dataset loaders return ``(records, metadata)``; the record format is in the team contract.
Transforms, samplers and loaders live in :mod:`gdseg.data.transforms`, :mod:`.samplers`,
:mod:`.loader`.
"""

from .catalog import (
    build_labeled_dataset,
    build_test_datasets,
    build_unlabeled_dataset,
    dataset_root,
    get_dataset,
    get_metadata,
    list_datasets,
    name_for_percentage,
    register,
    register_coco_instances,
    register_image_folder,
)
from .cityscapes import load_cityscapes_instances
from .coco import decode_mask, load_coco_instances
from .folder import as_unlabeled, load_image_folder, load_unlabeled_from_json
from .splits import normalize_percentage, percentage_suffix, split_cityscapes, split_coco
from .synthetic import make_synthetic_coco
from .validation import DataError, read_image

__all__ = [
    "DataError",
    "as_unlabeled",
    "build_labeled_dataset",
    "build_test_datasets",
    "build_unlabeled_dataset",
    "dataset_root",
    "decode_mask",
    "get_dataset",
    "get_metadata",
    "list_datasets",
    "load_cityscapes_instances",
    "load_coco_instances",
    "load_image_folder",
    "load_unlabeled_from_json",
    "make_synthetic_coco",
    "name_for_percentage",
    "normalize_percentage",
    "percentage_suffix",
    "read_image",
    "register",
    "register_coco_instances",
    "register_image_folder",
    "split_cityscapes",
    "split_coco",
]
