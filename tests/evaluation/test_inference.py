"""inference_on_dataset: original-size masks, loaders and records, eval mode, 2 gloo ranks."""

from __future__ import annotations

import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from gdseg.evaluation.coco import COCOEvaluator
from gdseg.evaluation.inference import inference_on_dataset, predictions_to_coco_results
from tests.evaluation.fake_models import MEAN, STD, ColorQueryModel, color_image

CATEGORY_IDS = (5, 17)  # json ids of the two colours (non-contiguous)
H, W = 96, 128


def _dataset(tmp_path, n: int = 3) -> tuple[list[dict], dict]:
    """Images with a red (class 0) and a green (class 1) box, records and COCO json."""
    rng = np.random.default_rng(0)
    records, images, anns = [], [], []
    for i in range(n):
        y0, x0 = 4 * int(rng.integers(0, 6)), 4 * int(rng.integers(0, 8))
        boxes = [(y0, x0, y0 + 32, x0 + 40), (52, 60, 92, 120)]
        path = tmp_path / f"img_{i}.png"
        Image.fromarray(color_image(H, W, boxes)).save(path)
        image_id = 100 + i
        record_anns = []
        for c, (a, b, cc, d) in enumerate(boxes):
            poly = [b, a, d, a, d, cc, b, cc]
            rle = mask_util.merge(mask_util.frPyObjects([poly], H, W))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": CATEGORY_IDS[c],
                    "segmentation": [poly],
                    "area": float(mask_util.area(rle)),
                    "bbox": [b, a, d - b, cc - a],
                    "iscrowd": 0,
                }
            )
            record_anns.append({"category_id": c, "segmentation": [poly], "iscrowd": 0})
        images.append({"id": image_id, "file_name": path.name, "height": H, "width": W})
        records.append(
            {
                "file_name": str(path),
                "image_id": image_id,
                "height": H,
                "width": W,
                "annotations": record_anns,
            }
        )
    gt = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": c, "name": f"color_{c}"} for c in CATEGORY_IDS],
    }
    return records, gt


def _metadata(json_file=None) -> dict:
    return {
        "thing_classes": ["red", "green"],
        "thing_dataset_id_to_contiguous_id": {c: i for i, c in enumerate(CATEGORY_IDS)},
        "json_file": json_file,
    }


KW = {"pixel_mean": MEAN, "pixel_std": STD, "size_divisibility": 32}


def test_exact_predictions_give_ap_100(tmp_path):
    records, gt = _dataset(tmp_path)
    model = ColorQueryModel().train()
    preds = inference_on_dataset(model, records, min_size=0, max_size=0, **KW)
    assert model.training  # mode restored
    assert [p["image_id"] for p in preds] == [r["image_id"] for r in records]
    for p in preds:
        assert (p["height"], p["width"]) == (H, W)
        top = int(np.argmax(p["scores"]))
        mask = mask_util.decode(p["rles"][top])
        assert mask.shape == (H, W)
        assert p["labels"][top] in (0, 1)
    results = predictions_to_coco_results(preds, _metadata())
    assert {r["category_id"] for r in results} <= set(CATEGORY_IDS)
    metrics = COCOEvaluator("colors", _metadata(), records=records).evaluate(preds)
    assert metrics["segm"]["AP"] == pytest.approx(100.0)


def test_resized_and_padded_inputs_come_back_at_original_size(tmp_path):
    records, _ = _dataset(tmp_path, n=1)
    # shorter side 60 -> 60x80 input, padded to 64x96: masks must map back to 96x128
    (p,) = inference_on_dataset(ColorQueryModel(), records, min_size=60, max_size=1000, **KW)
    gt = np.array(Image.open(records[0]["file_name"]))[..., 0] > 200  # the red box
    i = p["labels"].index(0)
    pred = mask_util.decode(p["rles"][i]).astype(bool)
    assert pred.shape == gt.shape
    iou = (pred & gt).sum() / (pred | gt).sum()
    assert iou > 0.9


def test_loader_batches_equal_records(tmp_path):
    records, _ = _dataset(tmp_path, n=2)
    batch = [
        {
            "image": torch.from_numpy(np.array(Image.open(r["file_name"]))).permute(2, 0, 1),
            "image_id": r["image_id"],
            "file_name": r["file_name"],
            "height": H,
            "width": W,
        }
        for r in records
    ]
    from_loader = inference_on_dataset(ColorQueryModel(), [batch], **KW)  # one batch of 2
    from_records = inference_on_dataset(ColorQueryModel(), records, min_size=0, **KW)
    assert from_loader == from_records


def test_score_threshold_and_top_k(tmp_path):
    records, _ = _dataset(tmp_path, n=1)
    (all_,) = inference_on_dataset(ColorQueryModel(), records, min_size=0, **KW)
    assert len(all_["scores"]) == 6  # Q x K = 3 x 2 pairs
    (top,) = inference_on_dataset(ColorQueryModel(), records, min_size=0, num_detections=2, **KW)
    assert len(top["scores"]) == 2
    (conf,) = inference_on_dataset(ColorQueryModel(), records, min_size=0, score_thresh=0.5, **KW)
    assert sorted(conf["labels"]) == [0, 1] and min(conf["scores"]) >= 0.5


def _worker(rank: int, world: int, init_file: str, records: list, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = ColorQueryModel()
        preds = inference_on_dataset(model, records, min_size=0, **KW)
        torch.save({"preds": preds, "calls": model.calls}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_shard_and_gather_to_rank_0(tmp_path):
    records, _ = _dataset(tmp_path, n=3)
    expected = inference_on_dataset(ColorQueryModel(), records, min_size=0, **KW)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), records, str(tmp_path)), nprocs=2)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert (r0["calls"], r1["calls"]) == (2, 1)  # each rank ran its own shard only
    assert r1["preds"] == []
    key = lambda p: p["image_id"]  # noqa: E731
    assert sorted(r0["preds"], key=key) == sorted(expected, key=key)


def test_tiny_real_model_end_to_end(tmp_path):
    """Random tiny Mask2Former: inference + COCO evaluation run and give the six numbers."""
    from gdseg.config import get_cfg
    from gdseg.model_zoo import get_config_file
    from gdseg.modeling import build_model

    torch.manual_seed(0)
    cfg = get_cfg()
    cfg.merge_from_file(get_config_file("demo/tiny_instant.yaml"))
    records, gt = _dataset(tmp_path, n=2)
    (tmp_path / "gt.json").write_text(__import__("json").dumps(gt))
    preds = inference_on_dataset(
        build_model(cfg), records, min_size=64, max_size=64, num_detections=20, **KW
    )
    assert all(len(p["scores"]) == 20 for p in preds)
    metadata = {**_metadata(str(tmp_path / "gt.json")), "thing_classes": ["a", "b", "c", "d", "e"]}
    metadata["thing_dataset_id_to_contiguous_id"] = {5: 0, 17: 1, 30: 2, 31: 3, 32: 4}
    out = tmp_path / "eval"
    metrics = COCOEvaluator("colors", metadata, str(out)).evaluate(preds)
    assert set(metrics["segm"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert 0.0 <= metrics["segm"]["AP"] <= 100.0
    assert (out / "metrics.json").exists() and (out / "coco_instances_results.json").exists()


def test_batched_test_loader_gives_the_batch_1_predictions(tmp_path):
    """TEST.IMS_PER_BATCH > 1 (same-size images): the predictions of batch 1, in order."""
    from gdseg.config import get_cfg
    from gdseg.data.loader import build_test_loader
    from gdseg.model_zoo import get_config_file
    from gdseg.modeling import build_model

    torch.manual_seed(0)
    cfg = get_cfg()
    cfg.merge_from_file(get_config_file("demo/tiny_instant.yaml"))
    model = build_model(cfg)
    records, _ = _dataset(tmp_path, n=5)
    kw = {**KW, "num_detections": 10}
    cfg.TEST.IMS_PER_BATCH = 1
    single = inference_on_dataset(model, build_test_loader(cfg, records), **kw)
    cfg.TEST.IMS_PER_BATCH = 3
    loader = build_test_loader(cfg, records)
    assert [len(b) for b in loader] == [3, 2]
    batched = inference_on_dataset(model, loader, **kw)
    assert [p["image_id"] for p in batched] == [r["image_id"] for r in records]
    for a, b in zip(single, batched):
        assert torch.equal(torch.as_tensor(a["labels"]), torch.as_tensor(b["labels"]))
        torch.testing.assert_close(
            torch.as_tensor(a["scores"]), torch.as_tensor(b["scores"]), rtol=1e-4, atol=1e-5
        )
        # mask pixels may only flip where a logit sits at the threshold
        agree = [
            (mask_util.decode(x) == mask_util.decode(y)).mean()
            for x, y in zip(a["rles"], b["rles"])
        ]
        assert min(agree) > 0.999
    cfg.TEST.IMS_PER_BATCH = 0
    with pytest.raises(ValueError, match="TEST.IMS_PER_BATCH"):
        build_test_loader(cfg, records)
