"""COCO mask AP: equal to pycocotools' COCOeval, both backends, crowd, empty results, files."""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from gdseg.evaluation.coco import (
    BACKENDS,
    METRICS,
    COCOEvaluator,
    add_evaluate_args,
    coco_gt_from_records,
    eval_output_dir,
    evaluate_cli_main,
    evaluate_coco_results,
    evaluate_main,
)
from gdseg.evaluation.inference import predictions_to_coco_results
from tests.evaluation.coco_synth import (
    CATEGORY_IDS,
    ann_to_mask,
    det,
    make_coco_gt,
    perturb_results,
)


@pytest.fixture
def coco_gt() -> dict:
    return make_coco_gt()


def reference_cocoeval(gt: dict, results: list[dict]) -> list[float]:
    """Plain pycocotools, as a user would run it (results without bbox, see coco.py)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        dets = [{k: v for k, v in r.items() if k != "bbox"} for r in copy.deepcopy(results)]
        e = COCOeval(coco_gt, coco_gt.loadRes(dets), "segm")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return [float(v) * 100 for v in e.stats[:6]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluate_main_equals_cocoeval(tmp_path, backend, seed):
    gt = make_coco_gt(seed, num_images=8)
    results = perturb_results(gt, seed)
    assert any(a["iscrowd"] for a in gt["annotations"])
    gt_file, res_file, out = tmp_path / "gt.json", tmp_path / "res.json", tmp_path / "m.json"
    gt_file.write_text(json.dumps(gt))
    res_file.write_text(json.dumps(results))  # with bbox fields: they must be ignored
    metrics = evaluate_main(str(gt_file), str(res_file), str(out), backend=backend)
    expected = reference_cocoeval(gt, results)
    assert list(metrics["segm"]) == list(METRICS)
    for name, ours, ref in zip(METRICS, metrics["segm"].values(), expected):
        assert ours == pytest.approx(ref, abs=1e-4), name
    assert 5 < metrics["segm"]["AP"] < 95  # the perturbation leaves something to measure
    assert json.loads(out.read_text()) == metrics


def test_perfect_results_give_100(coco_gt):
    perfect = []
    for ann in coco_gt["annotations"]:
        if not ann["iscrowd"]:
            img = next(i for i in coco_gt["images"] if i["id"] == ann["image_id"])
            mask = ann_to_mask(ann, img["height"], img["width"])
            perfect.append(det(ann["image_id"], ann["category_id"], mask, 1.0))
    for backend in BACKENDS:
        segm = evaluate_coco_results(coco_gt, perfect, backend=backend)["segm"]
        assert all(v == pytest.approx(100.0) for v in segm.values()), segm


@pytest.mark.parametrize("backend", BACKENDS)
def test_detections_on_crowd_regions_are_not_false_positives(coco_gt, backend):
    results = perturb_results(coco_gt, 3)
    on_crowd = []
    for ann in coco_gt["annotations"]:
        if ann["iscrowd"]:
            img = next(i for i in coco_gt["images"] if i["id"] == ann["image_id"])
            mask = ann_to_mask(ann, img["height"], img["width"])
            on_crowd.append(det(ann["image_id"], ann["category_id"], mask, 0.99))
    base = evaluate_coco_results(coco_gt, results, backend=backend)["segm"]
    with_crowd_hits = evaluate_coco_results(coco_gt, results + on_crowd, backend=backend)["segm"]
    assert with_crowd_hits == pytest.approx(base)
    # the same detections as ordinary objects would be false positives with top scores
    not_crowd = copy.deepcopy(coco_gt)
    for ann in not_crowd["annotations"]:
        ann["iscrowd"] = 0
    lowered = evaluate_coco_results(not_crowd, results + on_crowd, backend=backend)["segm"]
    assert lowered["AP"] != pytest.approx(base["AP"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_results_give_zeros(tmp_path, coco_gt, backend):
    gt_file, res_file = tmp_path / "gt.json", tmp_path / "res.json"
    gt_file.write_text(json.dumps(coco_gt))
    res_file.write_text("[]")
    metrics = evaluate_main(str(gt_file), str(res_file), backend=backend)
    assert metrics == {"segm": dict.fromkeys(METRICS, 0.0)}


def test_missing_area_range_is_nan_and_null(tmp_path):
    gt = make_coco_gt(0, num_images=2)
    gt["annotations"] = [a for a in gt["annotations"] if a["area"] >= 96**2 or a["iscrowd"]]
    results = perturb_results(gt, 0)
    out = tmp_path / "m.json"
    metrics = evaluate_main_from_dict(tmp_path, gt, results, out)
    assert math.isnan(metrics["segm"]["APs"])
    assert json.loads(out.read_text())["segm"]["APs"] is None


def evaluate_main_from_dict(tmp_path, gt, results, out):
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(results))
    return evaluate_main(str(tmp_path / "gt.json"), str(tmp_path / "res.json"), str(out))


def test_results_for_unknown_images_are_rejected(coco_gt):
    bad = perturb_results(coco_gt, 0)[:1]
    bad[0]["image_id"] = 123456789
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate_coco_results(coco_gt, bad)


def _metadata(gt: dict, json_file: str | None) -> dict:
    return {
        "thing_classes": [c["name"] for c in gt["categories"]],
        "thing_dataset_id_to_contiguous_id": {str(c): i for i, c in enumerate(CATEGORY_IDS)},
        "json_file": json_file,
        "evaluator_type": "coco",
    }


def _per_image_predictions(gt: dict, results: list[dict]) -> list[dict]:
    """COCO results -> the per-image prediction dicts of gdseg.evaluation.inference."""
    contiguous = {c: i for i, c in enumerate(CATEGORY_IDS)}
    preds = []
    for img in gt["images"]:
        mine = [r for r in results if r["image_id"] == img["id"]]
        preds.append(
            {
                "image_id": img["id"],
                "file_name": img["file_name"],
                "height": img["height"],
                "width": img["width"],
                "labels": [contiguous[r["category_id"]] for r in mine],
                "scores": [r["score"] for r in mine],
                "rles": [r["segmentation"] for r in mine],
                "bboxes": [r["bbox"] for r in mine],
            }
        )
    return preds


def _records(gt: dict) -> list[dict]:
    contiguous = {c: i for i, c in enumerate(CATEGORY_IDS)}
    return [
        {
            "file_name": img["file_name"],
            "image_id": img["id"],
            "height": img["height"],
            "width": img["width"],
            "annotations": [
                {
                    "category_id": contiguous[a["category_id"]],
                    "segmentation": a["segmentation"],
                    "bbox": a["bbox"],
                    "iscrowd": a["iscrowd"],
                    "id": a["id"],
                }
                for a in gt["annotations"]
                if a["image_id"] == img["id"]
            ],
        }
        for img in gt["images"]
    ]


def test_predictions_map_back_to_json_category_ids(coco_gt):
    results = perturb_results(coco_gt, 1)
    preds = _per_image_predictions(coco_gt, results)
    back = predictions_to_coco_results(preds, _metadata(coco_gt, None))
    key = lambda r: (r["image_id"], r["score"], r["category_id"])  # noqa: E731
    assert sorted(map(key, back)) == sorted(map(key, results))
    assert {r["category_id"] for r in back} <= set(CATEGORY_IDS)


def test_eval_output_dir_of_a_json_path_stays_inside_output(tmp_path):
    # DATASETS.TEST_JSON names the dataset by its (absolute) path: never write beside it.
    out = eval_output_dir(str(tmp_path / "out"), "teacher", "/data/mine/annotations/val.json")
    assert out == str(tmp_path / "out" / "eval" / "teacher" / "val")
    assert eval_output_dir("o", "student", "coco_2017_val") == os.path.join(
        "o", "eval", "student", "coco_2017_val"
    )


def test_coco_evaluator_writes_files_and_matches(tmp_path, coco_gt):
    results = perturb_results(coco_gt, 2)
    preds = _per_image_predictions(coco_gt, results)
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(coco_gt))
    out = eval_output_dir(str(tmp_path / "output"), "student", "my_val")
    metrics = COCOEvaluator("my_val", _metadata(coco_gt, str(gt_file)), out).evaluate(preds)
    expected = reference_cocoeval(coco_gt, results)
    assert list(metrics["segm"].values()) == pytest.approx(expected, abs=1e-4)
    folder = tmp_path / "output" / "eval" / "student" / "my_val"
    assert json.loads((folder / "metrics.json").read_text()) == metrics
    written = json.loads((folder / "coco_instances_results.json").read_text())
    assert len(written) == len(results)
    # without a json file, the ground truth is rebuilt from the records: same numbers
    from_records = COCOEvaluator("my_val", _metadata(coco_gt, None), records=_records(coco_gt))
    assert from_records.evaluate(preds)["segm"] == pytest.approx(metrics["segm"])
    # a subset of images is evaluated as that subset
    subset = COCOEvaluator("my_val", _metadata(coco_gt, str(gt_file))).evaluate(preds[:2])
    ids = {p["image_id"] for p in preds[:2]}
    sub_gt = {
        **coco_gt,
        "images": [i for i in coco_gt["images"] if i["id"] in ids],
        "annotations": [a for a in coco_gt["annotations"] if a["image_id"] in ids],
    }
    sub_res = [r for r in results if r["image_id"] in ids]
    assert list(subset["segm"].values()) == pytest.approx(
        reference_cocoeval(sub_gt, sub_res), abs=1e-4, nan_ok=True
    )


def test_coco_gt_from_records_keeps_crowd_and_ids(coco_gt):
    rebuilt = coco_gt_from_records(_records(coco_gt), _metadata(coco_gt, None))
    assert [c["id"] for c in rebuilt["categories"]] == list(CATEGORY_IDS)
    assert sum(a["iscrowd"] for a in rebuilt["annotations"]) == sum(
        a["iscrowd"] for a in coco_gt["annotations"]
    )
    assert min(a["id"] for a in rebuilt["annotations"]) == 1


def test_evaluate_cli(tmp_path, coco_gt, capsys):
    (tmp_path / "gt.json").write_text(json.dumps(coco_gt))
    (tmp_path / "res.json").write_text(json.dumps(perturb_results(coco_gt, 0)))
    parser = argparse.ArgumentParser()
    add_evaluate_args(parser)
    args = parser.parse_args(
        [
            "--annotations",
            str(tmp_path / "gt.json"),
            "--results",
            str(tmp_path / "res.json"),
            "--out",
            str(tmp_path / "m.json"),
        ]
    )
    assert evaluate_cli_main(args) == 0
    assert "AP50" in capsys.readouterr().out
    assert set(json.loads((tmp_path / "m.json").read_text())["segm"]) == set(METRICS)
