"""Cityscapes instances from leftImg8bit/ + gtFine/*_instanceIds.png (fabricated 2 images)."""

import logging

import numpy as np
import pytest
from PIL import Image

from gdseg.data.cityscapes import cityscapes_metadata, load_cityscapes_instances
from gdseg.data.coco import decode_mask
from gdseg.data.validation import DataError

pytest.importorskip("cityscapesscripts")

H, W = 32, 64
NAMES = {"aachen": "aachen_000000_000019", "bremen": "bremen_000003_000019"}


def _gt(kind):
    gt = np.zeros((H, W), np.uint16)
    gt[:, :] = 7  # road: not a thing class
    if kind == 0:
        gt[2:10, 2:20] = 26001  # car, instance 1
        gt[12:20, 2:20] = 26002  # car, instance 2
        gt[20:30, 30:40] = 24000  # person, instance 0
        gt[0:5, 50:60] = 26  # a group of cars: crowd
        gt[25:30, 0:5] = 29001  # caravan: ignored in evaluation
    else:
        gt[5:15, 5:15] = 33005  # bicycle
    return gt


def make_cityscapes(root):
    for split in ("train", "val"):
        for k, (city, stem) in enumerate(NAMES.items()):
            img_dir = root / "leftImg8bit" / split / city
            gt_dir = root / "gtFine" / split / city
            img_dir.mkdir(parents=True)
            gt_dir.mkdir(parents=True)
            Image.new("RGB", (W, H), (k * 100, 50, 50)).save(img_dir / f"{stem}_leftImg8bit.png")
            Image.fromarray(_gt(k)).save(gt_dir / f"{stem}_gtFine_instanceIds.png")
    return root


def test_metadata_from_label_table():
    meta = cityscapes_metadata()
    assert meta["thing_classes"] == [
        "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"
    ]  # fmt: skip
    assert meta["thing_dataset_id_to_contiguous_id"] == {
        24: 0, 25: 1, 26: 2, 27: 3, 28: 4, 31: 5, 32: 6, 33: 7
    }  # fmt: skip
    assert meta["evaluator_type"] == "cityscapes"


def test_instances_masks_and_crowd(tmp_path):
    root = make_cityscapes(tmp_path)
    records, meta = load_cityscapes_instances(
        root / "leftImg8bit" / "train", root / "gtFine" / "train"
    )
    assert [r["image_id"] for r in records] == [0, 1]
    r0 = records[0]
    assert r0["file_name"].endswith("aachen/aachen_000000_000019_leftImg8bit.png")
    assert (r0["height"], r0["width"]) == (H, W)
    gt = _gt(0)
    kinds = sorted((a["category_id"], a["iscrowd"]) for a in r0["annotations"])
    assert kinds == [(0, 0), (2, 0), (2, 0), (2, 1)]  # road and caravan left out
    for a in r0["annotations"]:
        uid = a["id"] - r0["image_id"] * 100000
        np.testing.assert_array_equal(decode_mask(a, H, W), (gt == uid).astype(np.uint8))
        assert a["iscrowd"] == int(uid < 1000)
        assert (
            a["category_id"]
            == meta["thing_dataset_id_to_contiguous_id"][uid // 1000 if uid >= 1000 else uid]
        )
        assert isinstance(a["segmentation"]["counts"], str)
    assert sorted(a["id"] for a in r0["annotations"]) == [26, 24000, 26001, 26002]
    assert records[1]["annotations"][0]["category_id"] == 7
    assert records[1]["annotations"][0]["bbox"] == [5.0, 5.0, 10.0, 10.0]


def test_image_list_subsets_keep_ids(tmp_path):
    root = make_cityscapes(tmp_path)
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\nbremen/bremen_000003_000019_leftImg8bit.png\n")
    args = (root / "leftImg8bit" / "train", root / "gtFine" / "train")
    records, _ = load_cityscapes_instances(*args, image_list=lst)
    assert [r["image_id"] for r in records] == [1]
    lst.write_text("bremen_000003_000019_gtFine_instanceIds.png\n")  # published list format
    assert [r["image_id"] for r in load_cityscapes_instances(*args, image_list=lst)[0]] == [1]
    lst.write_text("ulm_000000_000019_leftImg8bit.png\n")
    with pytest.raises(DataError, match="not found, e.g. ulm_000000_000019"):
        load_cityscapes_instances(*args, image_list=lst)


def test_missing_annotation_named_and_skippable(tmp_path, caplog):
    root = make_cityscapes(tmp_path)
    missing = root / "gtFine" / "train" / "bremen" / "bremen_000003_000019_gtFine_instanceIds.png"
    missing.unlink()
    args = (root / "leftImg8bit" / "train", root / "gtFine" / "train")
    with pytest.raises(DataError, match="annotation file not found") as exc:
        load_cityscapes_instances(*args)
    assert str(missing) in str(exc.value) and "bremen_000003_000019" in str(exc.value)
    with caplog.at_level(logging.WARNING, logger="gdseg.data"):
        records, meta = load_cityscapes_instances(*args, skip_bad=True)
    assert len(records) == 1 and meta["num_skipped"] == 1


def test_size_mismatch_between_image_and_annotation(tmp_path):
    root = make_cityscapes(tmp_path)
    img = root / "leftImg8bit" / "val" / "aachen" / "aachen_000000_000019_leftImg8bit.png"
    Image.new("RGB", (W * 2, H)).save(img)
    with pytest.raises(DataError, match=f"annotation is {H}x{W}"):
        load_cityscapes_instances(root / "leftImg8bit" / "val", root / "gtFine" / "val")
