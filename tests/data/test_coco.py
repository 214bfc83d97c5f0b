"""COCO-format loading: masks equal pycocotools' annToMask, ids, crowd, empty images."""

import contextlib
import io
import json

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image
from pycocotools.coco import COCO

from gdseg.data.coco import decode_mask, load_coco_instances

H, W = 48, 64


def _rle_of(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _uncompressed(mask: np.ndarray) -> dict:
    """Column-major run lengths starting with zeros, as COCO crowd annotations store them."""
    flat = mask.astype(np.uint8).flatten(order="F")
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    return {"size": [mask.shape[0], mask.shape[1]], "counts": counts}


def _box(y0, y1, x0, x1):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def make_mixed_coco(tmp_path):
    """4 images: polygons (multi-part, fractional), compressed/uncompressed RLE, crowd-only,
    no annotations; json category ids unsorted with gaps."""
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    images = []
    for i in range(1, 5):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(img_dir / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "height": H, "width": W})
    ring = _box(5, 40, 5, 40) & ~_box(15, 30, 15, 30)
    anns = [
        # image 1: polygons, one with two parts and fractional coordinates
        {"id": 1, "image_id": 1, "category_id": 7, "iscrowd": 0, "bbox": [2, 3, 20, 15],
         "segmentation": [[2.5, 3.2, 22.1, 3.0, 21.7, 18.4, 2.0, 17.9]]},
        {"id": 2, "image_id": 1, "category_id": 3, "iscrowd": 0, "bbox": [30, 5, 34, 40],
         "segmentation": [[30, 5, 45.5, 10, 38, 25.5], [50, 30, 63.9, 30, 63.9, 44.9, 50, 44]]},
        # image 2: compressed RLE (str counts), uncompressed RLE non-crowd, crowd uncompressed
        {"id": 3, "image_id": 2, "category_id": 11, "iscrowd": 0, "segmentation": _rle_of(ring)},
        {"id": 4, "image_id": 2, "category_id": 3, "iscrowd": 0,
         "segmentation": _uncompressed(_box(40, 48, 50, 64)), "bbox": [50, 40, 14, 8]},
        {"id": 5, "image_id": 2, "category_id": 7, "iscrowd": 1,
         "segmentation": _uncompressed(_box(0, 10, 45, 60)), "bbox": [45, 0, 15, 10]},
        # image 3: only a crowd region (compressed RLE)
        {"id": 6, "image_id": 3, "category_id": 3, "iscrowd": 1, "segmentation": _rle_of(ring)},
    ]  # fmt: skip
    cats = [{"id": 11, "name": "eleven"}, {"id": 3, "name": "three"}, {"id": 7, "name": "seven"}]
    data = {"images": images, "annotations": anns, "categories": cats, "info": {}}
    js = tmp_path / "instances.json"
    js.write_text(json.dumps(data))
    return js, img_dir


def test_masks_equal_pycocotools_annToMask(tmp_path):
    js, img_dir = make_mixed_coco(tmp_path)
    records, meta = load_coco_instances(js, img_dir, filter_empty=False)
    with contextlib.redirect_stdout(io.StringIO()):
        api = COCO(str(js))
    checked = 0
    kinds = set()
    for r in records:
        for a in r["annotations"]:
            ref = api.annToMask(api.anns[a["id"]])
            ours = decode_mask(a, r["height"], r["width"])
            assert ours.dtype == np.uint8 and ours.shape == (H, W)
            np.testing.assert_array_equal(ours, ref)
            assert ref.sum() > 0
            segm = a["segmentation"]
            kinds.add("poly" if isinstance(segm, list) else type(segm["counts"]).__name__)
            checked += 1
    assert checked == 6
    assert kinds == {"poly", "str", "list"}
    assert meta["num_skipped"] == 0


def test_category_ids_contiguous_sorted_by_json_id(tmp_path):
    js, img_dir = make_mixed_coco(tmp_path)
    records, meta = load_coco_instances(js, img_dir)
    assert meta["thing_classes"] == ["three", "seven", "eleven"]
    assert meta["thing_dataset_id_to_contiguous_id"] == {3: 0, 7: 1, 11: 2}
    assert meta["thing_contiguous_id_to_dataset_id"] == {0: 3, 1: 7, 2: 11}
    by_id = {a["id"]: a for r in records for a in r["annotations"]}
    assert by_id[1]["category_id"] == 1 and by_id[3]["category_id"] == 2
    assert meta["evaluator_type"] == "coco"


def test_crowd_kept_and_empty_images_filtered(tmp_path):
    js, img_dir = make_mixed_coco(tmp_path)
    records, _ = load_coco_instances(js, img_dir, filter_empty=True)
    # image 3 has only a crowd region, image 4 has nothing: both dropped
    assert [r["image_id"] for r in records] == [1, 2]
    crowd = [a for r in records for a in r["annotations"] if a["iscrowd"]]
    assert [a["id"] for a in crowd] == [5]
    records, _ = load_coco_instances(js, img_dir, filter_empty=False)
    assert [r["image_id"] for r in records] == [1, 2, 3, 4]
    assert records[2]["annotations"][0]["iscrowd"] == 1


def test_record_format(tmp_path):
    js, img_dir = make_mixed_coco(tmp_path)
    records, meta = load_coco_instances(js, img_dir)
    r = records[1]
    assert r["file_name"] == str((img_dir / "2.png").resolve())
    assert (r["height"], r["width"]) == (H, W)
    ring = next(a for a in r["annotations"] if a["id"] == 3)
    # no bbox in the json: computed from the mask
    assert ring["bbox"] == [5.0, 5.0, 35.0, 35.0]
    assert set(ring) == {"category_id", "segmentation", "bbox", "iscrowd", "id"}
    assert meta["json_file"] == str(js.resolve()) and meta["image_root"] == str(img_dir.resolve())


def test_sizes_taken_from_files_when_json_has_none(tmp_path):
    js, img_dir = make_mixed_coco(tmp_path)
    data = json.loads(js.read_text())
    for img in data["images"]:
        del img["height"], img["width"]
    js.write_text(json.dumps(data))
    records, _ = load_coco_instances(js, img_dir)
    assert all((r["height"], r["width"]) == (H, W) for r in records)


def test_decode_mask_accepts_bytes_counts():
    m = _box(3, 9, 4, 20)
    rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
    np.testing.assert_array_equal(decode_mask({"segmentation": rle}, H, W), m)


def test_annotations_without_ids_are_numbered(tmp_path):
    js, img_dir = make_mixed_coco(tmp_path)
    data = json.loads(js.read_text())
    for a in data["annotations"]:
        del a["id"]
    js.write_text(json.dumps(data))
    records, _ = load_coco_instances(js, img_dir, filter_empty=False)
    ids = sorted(a["id"] for r in records for a in r["annotations"])
    assert ids == [1, 2, 3, 4, 5, 6]
