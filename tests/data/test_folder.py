"""Unlabeled images from a folder, a COCO json, or labeled records."""

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from gdseg.data.folder import as_unlabeled, load_image_folder, load_unlabeled_from_json
from gdseg.data.validation import DataError


def _tree(root):
    files = ["b/z.JPG", "a.png", "b/c/y.jpeg", "d.bmp", "e.webp", "b/a.png"]
    for rel in files:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "bmp": "BMP", "webp": "WEBP"}
        Image.new("RGB", (24, 16), (10, 20, 30)).save(p, fmt[rel.rsplit(".", 1)[1].lower()])
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".hidden" / "x.png")
    return sorted(files)


def test_folder_recursive_sorted_deterministic(tmp_path):
    expected = _tree(tmp_path)
    records, meta = load_image_folder(tmp_path)
    rel = [Path(r["file_name"]).relative_to(tmp_path).as_posix() for r in records]
    assert rel == expected
    assert [r["image_id"] for r in records] == list(range(len(expected)))
    assert load_image_folder(tmp_path)[0] == records
    assert "annotations" not in records[0] and "height" not in records[0]
    assert meta["num_skipped"] == 0 and meta["image_root"] == str(tmp_path)


def test_folder_check_images_sizes_and_skip(tmp_path, caplog):
    _tree(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="broken.png.*cannot read image"):
        load_image_folder(tmp_path, check_images=True)
    with caplog.at_level(logging.WARNING, logger="gdseg.data"):
        records, meta = load_image_folder(tmp_path, check_images=True, skip_bad=True)
    assert meta["num_skipped"] == 1 and len(records) == 6
    assert all((r["height"], r["width"]) == (16, 24) for r in records)
    assert "Skipped 1 bad record" in caplog.text


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(DataError, match="no images found"):
        load_image_folder(tmp_path)
    with pytest.raises(DataError, match="folder not found"):
        load_image_folder(tmp_path / "nope")


def test_unlabeled_from_json_ignores_annotations(tmp_path):
    for i in (1, 2):
        Image.new("RGB", (24, 16)).save(tmp_path / f"{i}.jpg")
    data = {
        "images": [
            {"id": 5, "file_name": "2.jpg", "height": 16, "width": 24},
            {"id": 3, "file_name": "1.jpg"},
        ],
        "annotations": [{"id": 1, "image_id": 5, "category_id": 1, "segmentation": []}],
        "categories": [],
    }
    js = tmp_path / "unl.json"
    js.write_text(json.dumps(data))
    records, meta = load_unlabeled_from_json(js, tmp_path)
    assert [r["image_id"] for r in records] == [5, 3]
    assert records[0] == {"file_name": str(tmp_path / "2.jpg"), "image_id": 5, "height": 16,
                          "width": 24}  # fmt: skip
    assert "annotations" not in records[1]
    records, _ = load_unlabeled_from_json(js, tmp_path, check_images=True)
    assert (records[1]["height"], records[1]["width"]) == (16, 24)
    (tmp_path / "1.jpg").unlink()
    with pytest.raises(DataError, match="image id 3"):
        load_unlabeled_from_json(js, tmp_path, check_images=True)


def test_as_unlabeled_drops_labels():
    recs = [{"file_name": "/a.jpg", "image_id": 1, "height": 2, "width": 3, "annotations": [1]}]
    assert as_unlabeled(recs) == [{"file_name": "/a.jpg", "image_id": 1, "height": 2, "width": 3}]
    assert "annotations" in recs[0]
