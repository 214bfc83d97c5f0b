"""Bad input never passes silently: errors name file + record; odd image modes are converted."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from gdseg.data.coco import load_coco_instances
from gdseg.data.validation import DataError, read_image, read_image_size

H, W = 40, 60


def _write_dataset(tmp_path, anns, images=None, n_images=2):
    img_dir = tmp_path / "img"
    img_dir.mkdir(exist_ok=True)
    if images is None:
        images = []
        for i in range(1, n_images + 1):
            Image.new("RGB", (W, H), (i * 40, 0, 0)).save(img_dir / f"{i}.png")
            images.append({"id": i, "file_name": f"{i}.png", "height": H, "width": W})
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}
    js = tmp_path / "ann.json"
    js.write_text(json.dumps(data))
    return js, img_dir


def _good(ann_id=1, image_id=1):
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
            "segmentation": [[5, 5, 30, 5, 30, 25, 5, 25]], "bbox": [5, 5, 25, 20]}  # fmt: skip


BAD_ANNOTATIONS = {
    "polygon with 2 points": ({"segmentation": [[5, 5, 30, 5]]}, "at least 3 points"),
    "odd coordinates": ({"segmentation": [[5, 5, 30, 5, 30]]}, "at least 3 points"),
    "empty polygon list": ({"segmentation": []}, "empty polygon list"),
    "zero-area polygon": ({"segmentation": [[5, 5, 10, 5, 20, 5]]}, "mask is empty"),
    "polygon out of bounds": (
        {"segmentation": [[5, 5, 300, 5, 300, 25, 5, 25]]},
        "outside the image",
    ),
    "bbox out of bounds": ({"bbox": [50, 30, 40, 40]}, "outside the image"),
    "bbox zero size": ({"bbox": [5, 5, 0, 10]}, "zero or negative size"),
    "RLE of another size": ({"segmentation": {"size": [10, 10], "counts": [100]}}, "RLE size"),
    "RLE counts wrong total": ({"segmentation": {"size": [H, W], "counts": [5, 5]}}, "sum to"),
    "empty RLE": ({"segmentation": {"size": [H, W], "counts": [H * W]}}, "mask is empty"),
    "unknown category": ({"category_id": 99}, "unknown category_id 99"),
    "no segmentation": ({"segmentation": None}, "no segmentation"),
}


@pytest.mark.parametrize("case", sorted(BAD_ANNOTATIONS))
def test_bad_annotation_names_file_and_record(tmp_path, case):
    change, needle = BAD_ANNOTATIONS[case]
    bad = {**_good(ann_id=7, image_id=2), **change}
    js, img_dir = _write_dataset(tmp_path, [_good(), bad])
    with pytest.raises(DataError) as exc:
        load_coco_instances(js, img_dir)
    msg = str(exc.value)
    assert str(js) in msg and "annotation id 7" in msg and "image id 2" in msg, msg
    assert needle in msg, msg


def test_unknown_image_id(tmp_path):
    js, img_dir = _write_dataset(tmp_path, [_good(), _good(ann_id=3, image_id=42)])
    with pytest.raises(DataError, match=r"annotation id 3.*unknown image_id 42"):
        load_coco_instances(js, img_dir)


def test_missing_unreadable_and_wrong_size_images(tmp_path):
    js, img_dir = _write_dataset(tmp_path, [_good(image_id=1)], n_images=1)
    (img_dir / "1.png").unlink()
    with pytest.raises(DataError, match="image file not found") as exc:
        load_coco_instances(js, img_dir)
    assert str(img_dir / "1.png") in str(exc.value) and "image id 1" in str(exc.value)

    (img_dir / "1.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match="cannot read image") as exc:
        load_coco_instances(js, img_dir)
    assert "image id 1" in str(exc.value)

    Image.new("RGB", (W + 1, H)).save(img_dir / "1.png")
    with pytest.raises(DataError, match=f"image is {H}x{W + 1}.*expected {H}x{W}"):
        load_coco_instances(js, img_dir)


def test_malformed_json(tmp_path):
    js = tmp_path / "broken.json"
    js.write_text('{"images": [')
    with pytest.raises(DataError, match="not valid JSON"):
        load_coco_instances(js, tmp_path)
    js.write_text('{"annotations": []}')
    with pytest.raises(DataError, match='no "images" list'):
        load_coco_instances(js, tmp_path)


def test_duplicate_ids_refused(tmp_path):
    js, img_dir = _write_dataset(tmp_path, [_good(1, 1), _good(1, 2)])
    with pytest.raises(DataError, match="duplicate annotation id 1"):
        load_coco_instances(js, img_dir)


def test_skip_bad_counts_and_reports(tmp_path, caplog):
    anns = [
        _good(1, 1),
        {**_good(2, 1), "segmentation": [[1, 1, 2, 2]]},
        {**_good(3, 2), "category_id": 5},
        {**_good(4, 3)},  # image 3 is missing on disk
        _good(5, 99),  # unknown image
        _good(6, 2),
    ]
    js, img_dir = _write_dataset(tmp_path, anns, n_images=3)
    (img_dir / "3.png").unlink()
    with caplog.at_level(logging.WARNING, logger="gdseg.data"):
        records, meta = load_coco_instances(js, img_dir, skip_bad=True)
    assert meta["num_skipped"] == 4
    assert len(meta["skipped"]) == 4
    assert [r["image_id"] for r in records] == [1, 2]
    assert [[a["id"] for a in r["annotations"]] for r in records] == [[1], [6]]
    assert "Skipped 4 bad record(s)" in caplog.text


# ---------------------------------------------------------------------------------------------
# Image modes
# ---------------------------------------------------------------------------------------------


def _pattern(h=30, w=50):
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("orientation,rot", [(6, -1), (8, 1), (3, 2)])
def test_exif_rotation_applied(tmp_path, orientation, rot):
    arr = _pattern()
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rot.png"  # lossless, so pixels can be compared exactly
    Image.fromarray(arr).save(path, exif=exif)
    out = read_image(path)
    expected = np.rot90(arr, k=rot)  # k=-1: clockwise
    np.testing.assert_array_equal(out, expected)
    assert read_image_size(path) == expected.shape[:2]


def test_exif_rotated_jpeg_size_mismatch_mentions_exif(tmp_path):
    arr = _pattern(32, 48)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "1.jpg", exif=exif, quality=95)
    img = {"id": 1, "file_name": "1.jpg", "height": 32, "width": 48}  # raw, un-rotated size
    js, _ = _write_dataset(tmp_path, [_good()], images=[img])
    with pytest.raises(DataError, match="EXIF"):
        load_coco_instances(js, tmp_path)
    img.update(height=48, width=32)  # the displayed size is right
    js, _ = _write_dataset(tmp_path, [_good()], images=[img])
    records, _ = load_coco_instances(js, tmp_path)
    assert read_image(records[0]["file_name"], expected_hw=(48, 32)).shape == (48, 32, 3)


def test_grayscale_rgba_palette_and_16bit(tmp_path):
    gray = np.arange(30 * 40, dtype=np.uint8).reshape(30, 40)
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)

    rgba = np.dstack([_pattern(30, 40), np.full((30, 40), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgba[..., :3])
    Image.fromarray(rgba[..., [0, 3]], "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png")[..., 1], rgba[..., 0])

    pal = Image.fromarray(_pattern(30, 40)).convert("P")
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), np.asarray(pal.convert("RGB")))

    deep = (np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    out = read_image(tmp_path / "d.png")
    np.testing.assert_array_equal(out[..., 0], np.rint(deep / 257.0).astype(np.uint8))
    assert out[..., 0].max() > 200  # not clipped to 255 everywhere, not crushed to black
    assert (out[..., 0] < out[..., 0].max()).mean() > 0.9


def test_bgr_and_expected_size(tmp_path):
    arr = _pattern()
    Image.fromarray(arr).save(tmp_path / "x.png")
    np.testing.assert_array_equal(read_image(tmp_path / "x.png", "BGR"), arr[..., ::-1])
    with pytest.raises(DataError, match=r"x.png, image id 5: image is 30x50"):
        read_image(tmp_path / "x.png", record="image id 5", expected_hw=(50, 30))
    with pytest.raises(DataError, match="image file not found"):
        read_image(tmp_path / "nope.png", record="image id 5")
