"""Synthetic shapes: real COCO files, deterministic per seed, cached, loadable."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gdseg.data.coco import decode_mask, load_coco_instances
from gdseg.data.synthetic import SHAPES, make_synthetic_coco

KW = {"num_images": 12, "image_size": 64, "num_classes": 5}


def _pixels(image_dir):
    return [np.asarray(Image.open(p)) for p in sorted(Path(image_dir).iterdir())]


def test_deterministic_for_a_seed(tmp_path):
    js1, im1 = make_synthetic_coco(tmp_path / "a", seed=3, **KW)
    js2, im2 = make_synthetic_coco(tmp_path / "b", seed=3, **KW)
    assert Path(js1).read_text() == Path(js2).read_text()
    for x, y in zip(_pixels(im1), _pixels(im2), strict=True):
        np.testing.assert_array_equal(x, y)
    js3, _ = make_synthetic_coco(tmp_path / "a", seed=4, **KW)
    assert js3 != js1 and Path(js3).read_text() != Path(js1).read_text()
    val, _ = make_synthetic_coco(tmp_path / "a", seed=3, split="val", **KW)
    assert (
        json.loads(Path(val).read_text())["annotations"]
        != json.loads(Path(js1).read_text())["annotations"]
    )


def test_cache_reused_and_atomic(tmp_path):
    js, im = make_synthetic_coco(tmp_path, seed=0, **KW)
    stamp = Path(js).stat().st_mtime_ns
    assert make_synthetic_coco(tmp_path, seed=0, **KW) == (js, im)
    assert Path(js).stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    # an interrupted copy (no completion marker) is regenerated, not trusted
    (Path(js).parent / ".complete").unlink()
    Path(js).write_text("{")
    js2, _ = make_synthetic_coco(tmp_path, seed=0, **KW)
    assert js2 == js and json.loads(Path(js).read_text())["images"]


def test_loadable_and_varied(tmp_path):
    js, im = make_synthetic_coco(tmp_path, seed=0, num_images=40, image_size=64, num_classes=6)
    records, meta = load_coco_instances(js, im, filter_empty=False)
    assert meta["num_skipped"] == 0 and len(records) == 40
    assert meta["thing_classes"] == list(SHAPES[:6])
    anns = [a for r in records for a in r["annotations"]]
    assert {a["category_id"] for a in anns} == set(range(6))
    assert len({len(r["annotations"]) for r in records}) >= 3  # instance counts vary
    kinds = {type(a["segmentation"]).__name__ for a in anns}
    assert kinds == {"list", "dict"}  # polygons and RLE
    for r in records[:5]:  # every labeled pixel is inside the image, masks are disjoint
        masks = np.stack([decode_mask(a, r["height"], r["width"]) for a in r["annotations"]])
        assert masks.sum(0).max() <= 1 and (masks.sum((1, 2)) >= 20).all()
        assert Image.open(r["file_name"]).size == (64, 64)


def test_colour_does_not_give_the_class(tmp_path):
    js, im = make_synthetic_coco(tmp_path, seed=1, num_images=60, image_size=64, num_classes=3)
    records, _ = load_coco_instances(js, im)
    means = {k: [] for k in range(3)}
    for r in records:
        img = np.asarray(Image.open(r["file_name"]).convert("RGB"), dtype=np.float64)
        for a in r["annotations"]:
            m = decode_mask(a, 64, 64).astype(bool)
            means[a["category_id"]].append(img[m].mean(0))
    centers = np.stack([np.mean(v, 0) for v in means.values()])
    spread = np.mean([np.std(v, 0).mean() for v in means.values()])
    # class-mean colours are close compared with the colour spread inside a class
    assert np.abs(centers[:, None] - centers[None]).max() < spread


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_coco("/nonexistent", num_classes=7)
    with pytest.raises(ValueError, match="image_format"):
        make_synthetic_coco("/nonexistent", image_format="gif")
    with pytest.raises(ValueError, match="style"):
        make_synthetic_coco("/nonexistent", style="fancy")
    with pytest.raises(ValueError, match="object_size"):
        make_synthetic_coco("/nonexistent", object_size=(0.3, 0.1))


def test_plain_style_and_object_size(tmp_path):
    textured, _ = make_synthetic_coco(tmp_path, seed=0, **KW)
    js, im = make_synthetic_coco(tmp_path, seed=0, style="plain", object_size=(0.2, 0.3), **KW)
    assert js != textured  # own cache folder; the textured default keeps its folder
    records, _ = load_coco_instances(js, im)
    small, _ = load_coco_instances(*make_synthetic_coco(tmp_path, seed=0, **KW))
    mean_area = [
        np.mean([decode_mask(a, 64, 64).sum() for r in rs for a in r["annotations"]])
        for rs in (records, small)
    ]
    assert mean_area[0] > 1.5 * mean_area[1]  # radius 0.2-0.3 of the side vs 0.08-0.22

    # plain: every shape is one flat colour (plus faint noise and JPEG ringing at its edges)
    def colour_spread(recs):
        out = []
        for r in recs:
            img = np.asarray(Image.open(r["file_name"]).convert("RGB"), dtype=np.float64)
            for a in r["annotations"]:
                out.append(img[decode_mask(a, 64, 64).astype(bool)].std(0).mean())
        return np.median(out)

    assert colour_spread(records) < 0.6 * colour_spread(small)
