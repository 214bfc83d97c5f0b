"""gdseg predict: COCO results that pycocotools loads, category names, overlays, thresholds."""

from __future__ import annotations

import argparse
import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

import gdseg.predict as predict_module
from gdseg.config import get_cfg
from gdseg.predict import add_predict_args, collect_inputs, predict, predict_main
from tests.evaluation.fake_models import ColorQueryModel, color_image


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    paths = []
    for i, (h, w) in enumerate([(96, 128), (64, 64), (80, 100)]):
        img = color_image(h, w, [(8, 8, 40, 48), (44 if h > 64 else 40, 8, h - 4, 60)])
        path = folder / ("sub" if i == 2 else "") / f"photo_{i}.{'jpg' if i == 1 else 'png'}"
        Image.fromarray(img).save(path, **({"quality": 100} if i == 1 else {}))
        paths.append(path)
    (folder / "notes.txt").write_text("not an image")
    return folder, paths


@pytest.fixture
def fake_checkpoint(tmp_path, monkeypatch):
    """A checkpoint as the trainer writes it, for the colour model (build_model patched)."""
    cfg = get_cfg()
    cfg.merge_from_list(
        ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "2", "INPUT.MIN_SIZE_TEST", "0", "MODEL.DEVICE", "cpu"]
    )
    monkeypatch.setattr(predict_module, "_build_model", lambda cfg: ColorQueryModel(2))
    path = tmp_path / "model_final.pth"
    torch.save(
        {
            "model": ColorQueryModel(2).state_dict(),
            "config": cfg.dump(),
            "metadata": {
                "thing_classes": ["red thing", "green thing"],
                "thing_dataset_id_to_contiguous_id": {7: 0, 42: 1},
            },
        },
        path,
    )
    return path


def test_collect_inputs(images, tmp_path):
    folder, paths = images
    assert collect_inputs([str(folder)]) == sorted(str(p) for p in paths)
    globbed = collect_inputs([str(folder / "*.png"), str(paths[0])])
    assert globbed == [str(paths[0])]  # repeats dropped
    with pytest.raises(FileNotFoundError, match="no image"):
        collect_inputs([str(tmp_path / "nothing*.jpg")])


def test_predict_writes_loadable_coco_results_and_overlays(images, fake_checkpoint, tmp_path):
    folder, paths = images
    out = tmp_path / "out"
    summary = predict(str(fake_checkpoint), [str(folder)], str(out))
    assert summary["num_images"] == 3
    preds = json.loads((out / "predictions.json").read_text())
    # default threshold 0.5: exactly the red and the green box of each image
    assert summary["num_detections"] == len(preds) == 6
    assert {p["category_name"] for p in preds} == {"red thing", "green thing"}
    assert {p["category_id"] for p in preds} == {7, 42}  # the training json's ids
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(out / "images.json"))
        res = coco.loadRes(str(out / "predictions.json"))
    assert len(res.getAnnIds()) == 6
    assert {im["file_name"] for im in coco.dataset["images"]} == {str(p) for p in paths}
    for ann in res.dataset["annotations"]:
        img = coco.imgs[ann["image_id"]]
        mask = res.annToMask(ann)
        assert mask.shape == (img["height"], img["width"])
        color = np.array(Image.open(img["file_name"]).convert("RGB"))[mask.astype(bool)]
        channel = 0 if ann["category_name"] == "red thing" else 1
        assert np.median(color[:, channel]) > 200  # the mask sits on its colour
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert overlays == ["photo_0.png", "photo_1.png", "photo_2.png"]
    original = np.array(Image.open(paths[0]))
    drawn = np.array(Image.open(out / "overlays" / "photo_0.png"))
    assert drawn.shape == original.shape and (drawn != original).any()


def test_thresholds_are_settable(images, fake_checkpoint, tmp_path):
    folder, _ = images
    everything = predict(
        str(fake_checkpoint), [str(folder)], str(tmp_path / "a"), score_thresh=0.0, overlays=False
    )
    assert everything["num_detections"] == 3 * 6  # all Q x K pairs: 3 queries x 2 classes
    assert not (tmp_path / "a" / "overlays").exists()
    one = predict(str(fake_checkpoint), [str(folder)], str(tmp_path / "b"), max_detections=1)
    preds = json.loads((tmp_path / "b" / "predictions.json").read_text())
    assert one["num_detections"] == 3 and len({p["image_id"] for p in preds}) == 3


def test_predict_cli(images, fake_checkpoint, tmp_path, capsys):
    folder, paths = images
    parser = argparse.ArgumentParser()
    add_predict_args(parser)
    out = tmp_path / "cli"
    args = parser.parse_args(
        [str(paths[0]), "--weights", str(fake_checkpoint), "--out", str(out), "--device", "cpu"]
    )
    assert predict_main(args) == 0
    assert "2 detections on 1 images" in capsys.readouterr().out
    assert (out / "overlays" / "photo_0.png").exists()


def test_missing_class_names_fall_back(images, fake_checkpoint, tmp_path):
    folder, paths = images
    ckpt = torch.load(fake_checkpoint, weights_only=True)
    del ckpt["metadata"]
    bare = tmp_path / "bare.pth"
    torch.save(ckpt, bare)
    predict(str(bare), [str(paths[0])], str(tmp_path / "o"), overlays=False)
    preds = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert {(p["category_id"], p["category_name"]) for p in preds} == {
        (0, "class_0"),
        (1, "class_1"),
    }


def test_predict_with_a_tiny_real_model(images, tmp_path):
    """The real network (random weights) through a checkpoint as the trainer saves it."""
    from gdseg.model_zoo import get_config_file
    from gdseg.modeling import build_model

    torch.manual_seed(0)
    cfg = get_cfg()
    cfg.merge_from_file(get_config_file("demo/tiny_instant.yaml"))
    ckpt = tmp_path / "tiny.pth"
    torch.save({"model": build_model(cfg).state_dict(), "config": cfg.dump()}, ckpt)
    folder, paths = images
    out = tmp_path / "out"
    k = 7
    summary = predict(
        str(ckpt), [str(folder)], str(out), score_thresh=0.0, max_detections=k, device="cpu"
    )
    assert summary["num_detections"] == 3 * k
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(out / "images.json"))
        res = coco.loadRes(str(out / "predictions.json"))
    assert len(res.getAnnIds()) == 3 * k
    names = {c["name"] for c in coco.dataset["categories"]}
    assert names == {f"class_{i}" for i in range(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)}
    for img in coco.dataset["images"]:  # masks at the original size, not the test size
        ann = res.loadAnns(res.getAnnIds(imgIds=img["id"]))[0]
        assert res.annToMask(ann).shape == (img["height"], img["width"])
    assert len(list((out / "overlays").iterdir())) == 3


def test_teacher_weights(images, fake_checkpoint, tmp_path):
    folder, paths = images
    with pytest.raises(KeyError, match="teacher"):
        predict(str(fake_checkpoint), [str(paths[0])], str(tmp_path / "t"), use_teacher=True)
    ckpt = torch.load(fake_checkpoint, weights_only=True)
    teacher = ColorQueryModel(2)
    with torch.no_grad():
        teacher.scale.fill_(-20.0)  # inverted masks: everything but the coloured boxes
    ckpt["teacher"] = teacher.state_dict()
    both = tmp_path / "both.pth"
    torch.save(ckpt, both)
    for use_teacher, name in ((False, "s"), (True, "t")):
        predict(str(both), [str(paths[0])], str(tmp_path / name), use_teacher=use_teacher)
    student = json.loads((tmp_path / "s" / "predictions.json").read_text())
    from_teacher = json.loads((tmp_path / "t" / "predictions.json").read_text())
    assert student[0]["segmentation"] != from_teacher[0]["segmentation"]
