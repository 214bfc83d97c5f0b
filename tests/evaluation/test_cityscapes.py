"""Cityscapes AP through cityscapesscripts on a fabricated two-image Cityscapes folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("cityscapesscripts")

from gdseg.evaluation.cityscapes import CityscapesInstanceEvaluator, gt_file_for_image
from gdseg.evaluation.inference import encode_masks

CLASSES = ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
H, W = 64, 128


def _fabricate(root) -> list[tuple[str, np.ndarray]]:
    """Two images with person/car instances, a car group and road; returns (image, ids)."""
    out = []
    for frame in (19, 42):
        ids = np.zeros((H, W), np.int32)
        ids[40:, :] = 7  # road: a semantic label without instances
        ids[5:25, 5:25] = 24000  # person (400 px)
        ids[10:40, 40:80] = 26000  # car (1200 px)
        ids[30:60, 90:120] = 26001 if frame == 19 else 26  # a car, or a car group (ignored)
        stem = f"frankfurt_000000_{frame:06d}"
        img_dir = root / "leftImg8bit" / "val" / "frankfurt"
        gt_dir = root / "gtFine" / "val" / "frankfurt"
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        image = img_dir / f"{stem}_leftImg8bit.png"
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(image)
        Image.fromarray(ids.astype(np.uint16)).save(gt_dir / f"{stem}_gtFine_instanceIds.png")
        out.append((str(image), ids))
    return out


def _prediction(image: str, ids: np.ndarray, drop: int = 0) -> dict:
    """Perfect predictions for every instance (id >= 1000) except the first ``drop``."""
    inst = [v for v in np.unique(ids) if v >= 1000][drop:]
    masks = torch.from_numpy(np.stack([ids == v for v in inst]))
    labels = [CLASSES.index({24: "person", 26: "car"}[int(v) // 1000]) for v in inst]
    rles = encode_masks(masks)
    return {
        "image_id": image,
        "file_name": image,
        "height": H,
        "width": W,
        "labels": labels,
        "scores": [0.9] * len(labels),
        "rles": rles,
        "bboxes": [[0, 0, 1, 1]] * len(labels),
    }


def test_gt_file_for_image(tmp_path):
    image = str(tmp_path / "leftImg8bit/val/ulm/ulm_000001_000019_leftImg8bit.png")
    expected = str(tmp_path / "gtFine/val/ulm/ulm_000001_000019_gtFine_instanceIds.png")
    assert gt_file_for_image(image) == expected
    assert gt_file_for_image(image, "/g") == "/g/ulm/ulm_000001_000019_gtFine_instanceIds.png"
    with pytest.raises(ValueError, match="leftImg8bit"):
        gt_file_for_image("/x/y/ulm_000001_000019.png")


def test_perfect_predictions_give_100(tmp_path):
    images = _fabricate(tmp_path / "cityscapes")
    out = tmp_path / "eval"
    evaluator = CityscapesInstanceEvaluator("cs_val", {"thing_classes": CLASSES}, str(out))
    metrics = evaluator.evaluate([_prediction(img, ids) for img, ids in images])
    assert metrics["segm"]["AP"] == pytest.approx(100.0)
    assert metrics["segm"]["AP50"] == pytest.approx(100.0)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    details = json.loads((out / "cityscapes_results.json").read_text())
    assert details["averages"]["classes"]["car"]["ap"] == pytest.approx(1.0)
    assert details["averages"]["classes"]["bus"]["ap"] is None  # no ground truth: NaN -> null


def test_missed_and_wrong_predictions_lower_ap(tmp_path):
    images = _fabricate(tmp_path / "cityscapes")
    preds = [_prediction(img, ids, drop=1) for img, ids in images]  # persons missed
    evaluator = CityscapesInstanceEvaluator("cs_val", {"thing_classes": CLASSES})
    metrics = evaluator.evaluate(preds)
    # person AP 0, car AP 100 -> mean over the two classes with ground truth
    assert metrics["segm"]["AP"] == pytest.approx(50.0)
    empty = [dict(p, labels=[], scores=[], rles=[], bboxes=[]) for p in preds]
    assert evaluator.evaluate(empty)["segm"]["AP"] == pytest.approx(0.0)


def test_rejects_non_cityscapes_classes():
    with pytest.raises(ValueError, match="Cityscapes label names"):
        CityscapesInstanceEvaluator("x", {"thing_classes": ["cat"]})


def test_missing_ground_truth_is_reported(tmp_path):
    img = str(tmp_path / "leftImg8bit/val/a/a_000000_000001_leftImg8bit.png")
    pred = {"file_name": img, "labels": [], "scores": [], "rles": []}
    with pytest.raises(FileNotFoundError, match="ground-truth"):
        CityscapesInstanceEvaluator("x", {"thing_classes": CLASSES}).evaluate([pred])


def test_with_the_cityscapes_loader(tmp_path):
    """Records and metadata of gdseg.data.cityscapes -> perfect predictions -> AP 100."""
    from gdseg.data.cityscapes import load_cityscapes_instances

    root = tmp_path / "cityscapes"
    _fabricate(root)
    records, metadata = load_cityscapes_instances(
        root / "leftImg8bit" / "val", root / "gtFine" / "val", filter_empty=False
    )
    preds = []
    for r in records:
        anns = [a for a in r["annotations"] if not a["iscrowd"]]
        preds.append(
            {
                "image_id": r["image_id"],
                "file_name": r["file_name"],
                "height": r["height"],
                "width": r["width"],
                "labels": [a["category_id"] for a in anns],
                "scores": [0.8] * len(anns),
                "rles": [a["segmentation"] for a in anns],
                "bboxes": [a["bbox"] for a in anns],
            }
        )
    metrics = CityscapesInstanceEvaluator("cs", metadata).evaluate(preds)
    assert metrics["segm"] == pytest.approx({"AP": 100.0, "AP50": 100.0})
