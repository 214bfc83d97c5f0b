"""Dataset registry: built-in names under the datasets root, user datasets, synthetic sets."""

import json

import numpy as np
import pytest
from PIL import Image

from gdseg.config import get_cfg
from gdseg.data import catalog
from gdseg.data.catalog import (
    build_labeled_dataset,
    build_test_datasets,
    build_unlabeled_dataset,
    dataset_root,
    get_dataset,
    get_metadata,
    name_for_percentage,
    register,
    register_coco_instances,
)
from gdseg.data.splits import split_coco
from gdseg.data.validation import DataError

N = 20


def _write_coco(image_dir, js, n=N, empty_every=5):
    image_dir.mkdir(parents=True, exist_ok=True)
    js.parent.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(1, n + 1):
        Image.new("RGB", (32, 24), (i, 0, 0)).save(image_dir / f"{i:04d}.jpg")
        images.append({"id": i, "file_name": f"{i:04d}.jpg", "height": 24, "width": 32})
        if i % empty_every:
            anns.append({"id": i, "image_id": i, "category_id": 1, "iscrowd": 0,
                         "bbox": [2, 2, 10, 10], "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]})  # fmt: skip
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    js.write_text(json.dumps(data))


@pytest.fixture
def coco_root(tmp_path, monkeypatch):
    root = tmp_path / "datasets"
    for split in ("train", "val"):
        _write_coco(root / "coco" / f"{split}2017",
                    root / "coco" / "annotations" / f"instances_{split}2017.json")  # fmt: skip
    monkeypatch.setenv("GDSEG_DATASETS", str(root))
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    return root


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(catalog, "_REGISTRY", {})


def test_dataset_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("GDSEG_DATASETS", raising=False)
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    assert str(dataset_root()) == "datasets"
    monkeypatch.setenv("DETECTRON2_DATASETS", "/d2")
    assert str(dataset_root()) == "/d2"
    monkeypatch.setenv("GDSEG_DATASETS", "/gd")
    assert str(dataset_root()) == "/gd"
    assert dataset_root(tmp_path) == tmp_path


def test_builtin_coco_names(coco_root):
    records, meta = get_dataset("coco_2017_train")
    assert len(records) == N - N // 5  # images without annotations dropped
    assert meta["thing_classes"] == ["thing"]
    val, _ = get_dataset("coco_2017_val", filter_empty=False)
    assert len(val) == N
    unl, _ = get_dataset("coco_2017_train_unlabeled")
    assert len(unl) == N and "annotations" not in unl[0]


def test_fraction_missing_then_split(coco_root):
    with pytest.raises(DataError) as exc:
        get_dataset("coco_2017_train_10")
    msg = str(exc.value)
    assert "instances_train2017_10.json" in msg and "gdseg split coco" in msg
    assert "--percentages 10" in msg
    with pytest.raises(DataError, match="--percentages 0.4 "):
        get_dataset("coco_2017_train_250")
    split_coco(coco_root / "coco/annotations/instances_train2017.json", [50], seed=0)
    records, meta = get_dataset("coco_2017_train_50", filter_empty=False)
    assert len(records) == int(50 * N / 100)
    assert meta["split"]["seed"] == 0 and "image_ids" not in meta["split"]


def test_name_for_percentage():
    assert name_for_percentage("coco_2017_train", 5) == "coco_2017_train_5"
    assert name_for_percentage("coco_2017_train", 0.4) == "coco_2017_train_250"
    assert name_for_percentage("coco_2017_train", 250) == "coco_2017_train_250"
    assert name_for_percentage("coco_2017_train", 100) == "coco_2017_train"


def test_coco_unlabeled_folder(coco_root):
    with pytest.raises(DataError, match="unlabeled2017"):
        get_dataset("coco_2017_unlabel")
    folder = coco_root / "coco" / "unlabeled2017"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(folder / f"{i}.jpg")
    records, _ = get_dataset("coco_2017_unlabel")
    assert len(records) == 3


def test_cityscapes_names(tmp_path, monkeypatch):
    pytest.importorskip("cityscapesscripts")
    from gdseg.data.splits import split_cityscapes

    for split in ("train", "val"):
        for city in ("aachen", "bremen"):
            stem = f"{city}_000000_000019"
            img = tmp_path / "cityscapes" / "leftImg8bit" / split / city
            gt = tmp_path / "cityscapes" / "gtFine" / split / city
            img.mkdir(parents=True)
            gt.mkdir(parents=True)
            Image.new("RGB", (16, 8)).save(img / f"{stem}_leftImg8bit.png")
            ids = np.full((8, 16), 26001, np.uint16)  # one car filling the image
            Image.fromarray(ids).save(gt / f"{stem}_gtFine_instanceIds.png")
    monkeypatch.setenv("GDSEG_DATASETS", str(tmp_path))
    train, meta = get_dataset("cityscapes_fine_instance_seg_train")
    assert len(train) == 2 and meta["evaluator_type"] == "cityscapes"
    assert len(get_dataset("cityscapes_fine_instance_seg_val")[0]) == 2
    with pytest.raises(DataError, match="gdseg split cityscapes"):
        get_dataset("cityscapes_fine_instance_seg_train_50")
    split_cityscapes(tmp_path / "cityscapes", [50], seed=0)
    assert len(get_dataset("cityscapes_fine_instance_seg_train_50")[0]) == 1
    assert len(get_dataset("cityscapes_fine_instance_seg_train_unlabeled")[0]) == 2


def test_register_and_user_datasets(tmp_path, clean_registry):
    _write_coco(tmp_path / "imgs", tmp_path / "mine.json")
    register_coco_instances("mine", tmp_path / "mine.json", tmp_path / "imgs")
    records, meta = get_dataset("mine", filter_empty=False)
    assert len(records) == N and meta["thing_classes"] == ["thing"]
    with pytest.raises(ValueError, match="already registered"):
        register_coco_instances("mine", tmp_path / "mine.json", tmp_path / "imgs")
    register("plain", lambda: [{"file_name": "x", "image_id": 0}], {"thing_classes": ["a"]})
    assert get_dataset("plain") == ([{"file_name": "x", "image_id": 0}], {"thing_classes": ["a"]})
    assert get_metadata("plain") == {"thing_classes": ["a"]}
    with pytest.raises(KeyError, match="unknown dataset 'nope'.*coco_2017_train"):
        get_dataset("nope")


def test_metadata_without_files():
    meta = get_metadata("coco_2017_val")
    assert len(meta["thing_classes"]) == 80 and meta["thing_classes"][0] == "person"
    assert meta["thing_dataset_id_to_contiguous_id"][90] == 79
    assert get_metadata("synthetic_train")["thing_classes"][:2] == ["circle", "square"]


def test_synthetic_names(tmp_path):
    syn = {"root": tmp_path, "num_train": 20, "num_val": 6, "image_size": 64}
    train, meta = get_dataset("synthetic_train", synthetic=syn, filter_empty=False)
    val, _ = get_dataset("synthetic_val", synthetic=syn, filter_empty=False)
    assert (len(train), len(val)) == (20, 6)
    assert {r["file_name"] for r in train}.isdisjoint({r["file_name"] for r in val})
    part, pmeta = get_dataset("synthetic_train_10", synthetic=syn, filter_empty=False)
    assert len(part) == 2 and pmeta["split"]["seed"] == 0
    unl, _ = get_dataset("synthetic_train_unlabeled", synthetic=syn)
    assert len(unl) == 20 and "annotations" not in unl[0]
    assert meta["thing_classes"] == get_metadata("synthetic_train")["thing_classes"]


def test_build_from_config_user_json(tmp_path):
    _write_coco(tmp_path / "imgs", tmp_path / "train.json")
    _write_coco(tmp_path / "vimgs", tmp_path / "val.json", n=4)
    folder = tmp_path / "unl"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    cfg = get_cfg()
    cfg.merge_from_list(["DATASETS.TRAIN_JSON", str(tmp_path / "train.json"),
                         "DATASETS.TRAIN_IMAGE_ROOT", str(tmp_path / "imgs"),
                         "DATASETS.TEST_JSON", str(tmp_path / "val.json"),
                         "DATASETS.TEST_IMAGE_ROOT", str(tmp_path / "vimgs"),
                         "SSL.PERCENTAGE", "50"])  # fmt: skip
    with pytest.raises(DataError, match="train_50.json.*gdseg split coco"):
        build_labeled_dataset(cfg)
    split_coco(tmp_path / "train.json", [50], seed=1)
    with pytest.raises(DataError, match="made with seed 1"):
        build_labeled_dataset(cfg)  # SSL.SPLIT_SEED is 0
    cfg.merge_from_list(["SSL.SPLIT_SEED", "1"])
    records, _ = build_labeled_dataset(cfg)
    assert 0 < len(records) <= N // 2
    unl, _ = build_unlabeled_dataset(cfg)
    assert len(unl) == N  # default: all training images
    cfg.merge_from_list(["DATASETS.UNLABELED_IMAGE_ROOT", str(folder)])
    assert len(build_unlabeled_dataset(cfg)[0]) == 1
    ((name, test, _),) = build_test_datasets(cfg)
    assert len(test) == 4 and name.endswith("val.json")


def test_build_from_config_builtin_names(coco_root):
    cfg = get_cfg()
    cfg.merge_from_list(["SSL.PERCENTAGE", "250"])
    with pytest.raises(DataError, match="instances_train2017_250.json"):
        build_labeled_dataset(cfg)
    cfg.merge_from_list(["SSL.PERCENTAGE", "100"])
    records, meta = build_labeled_dataset(cfg)
    assert len(records) == N - N // 5 and meta["name"] == "coco_2017_train"
    assert len(build_unlabeled_dataset(cfg)[0]) == N
