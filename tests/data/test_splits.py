"""gdseg split: sizes int(p*N/100), content, determinism, nesting, refusal; suffixes."""

import json
import math
import random
from pathlib import Path

import pytest

from gdseg.data.splits import (
    normalize_percentage,
    percentage_suffix,
    read_image_list,
    split_cityscapes,
    split_coco,
)
from gdseg.data.validation import DataError

N = 300
PERCENTAGES = [0.4, 1, 2, 5, 10, 30]


def _coco_json(path, n=N, shuffle_seed=None):
    images = [
        {"id": 1000 + 7 * i, "file_name": f"{i:06d}.jpg", "height": 20, "width": 30}
        for i in range(n)
    ]
    anns = []
    for img in images:
        for k in range(img["id"] % 3):  # 0, 1 or 2 annotations per image
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": 1 + k,
                         "bbox": [1, 1, 5, 5], "iscrowd": 0,
                         "segmentation": [[1, 1, 6, 1, 6, 6]]})  # fmt: skip
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(images)
        random.Random(shuffle_seed).shuffle(anns)
    data = {
        "info": {"description": "test"},
        "licenses": [{"id": 1, "name": "x"}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "images": images,
        "annotations": anns,
    }
    path.write_text(json.dumps(data))
    return data


def _ids(path):
    return {img["id"] for img in json.loads(Path(path).read_text())["images"]}


def test_suffix_and_normalization():
    assert percentage_suffix(0.4) == "250"
    assert percentage_suffix(250) == "250"
    assert percentage_suffix(0.5) == "200"
    assert percentage_suffix(0.1) == "1000"
    assert percentage_suffix(5) == "5" and percentage_suffix(5.0) == "5"
    assert percentage_suffix(100) == "100"
    assert normalize_percentage(250) == 0.4
    assert normalize_percentage(1000) == 0.1
    assert normalize_percentage(5) == 5.0
    for bad in (0, -1, float("nan"), "5", True):
        with pytest.raises(ValueError):
            normalize_percentage(bad)


def test_sizes_content_and_record(tmp_path):
    src = tmp_path / "instances_train2017.json"
    data = _coco_json(src)
    out = split_coco(src, PERCENTAGES, seed=0, out_dir=tmp_path / "out")
    assert set(out) == set(PERCENTAGES)
    by_image = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for p, path in out.items():
        assert path.endswith(f"instances_train2017_{percentage_suffix(p)}.json")
        sub = json.loads(Path(path).read_text())
        assert len(sub["images"]) == int(p * N / 100)
        ids = {img["id"] for img in sub["images"]}
        expected_anns = [a for a in data["annotations"] if a["image_id"] in ids]
        assert sub["annotations"] == expected_anns  # all of them, nothing else, same order
        for key in ("categories", "info", "licenses"):
            assert sub[key] == data[key]
        rec = sub["gdseg_split"]
        assert rec["seed"] == 0 and rec["percentage"] == p
        assert rec["source_num_images"] == N and rec["num_images"] == len(ids)
        assert set(rec["image_ids"]) == ids


def test_same_seed_same_split_and_nesting(tmp_path):
    src = tmp_path / "train.json"
    _coco_json(src)
    a = split_coco(src, PERCENTAGES, seed=3, out_dir=tmp_path / "a")
    b = split_coco(src, [10, 1], seed=3, out_dir=tmp_path / "b")  # another call, other order
    c = split_coco(src, [10], seed=4, out_dir=tmp_path / "c")
    assert _ids(a[10]) == _ids(b[10]) and _ids(a[1]) == _ids(b[1])
    assert _ids(a[10]) != _ids(c[10])
    sets = [_ids(a[p]) for p in PERCENTAGES]
    for small, big in zip(sets, sets[1:]):
        assert small < big


def test_split_does_not_depend_on_json_order(tmp_path):
    _coco_json(tmp_path / "x.json")
    _coco_json(tmp_path / "y.json", shuffle_seed=1)
    a = split_coco(tmp_path / "x.json", [5], seed=0, out_dir=tmp_path / "a")
    b = split_coco(tmp_path / "y.json", [5], seed=0, out_dir=tmp_path / "b")
    assert _ids(a[5]) == _ids(b[5])


def test_published_code_250_equals_0_4(tmp_path):
    src = tmp_path / "t.json"
    _coco_json(src)
    a = split_coco(src, [250], seed=0, out_dir=tmp_path / "a")
    b = split_coco(src, [0.4], seed=0, out_dir=tmp_path / "b")
    assert a[250].endswith("t_250.json")
    assert _ids(a[250]) == _ids(b[0.4]) and len(_ids(a[250])) == 1


def test_zero_image_fraction_refused_and_nothing_written(tmp_path):
    src = tmp_path / "small.json"
    _coco_json(src, n=50)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"0\.4 % of the 50 images .* selects 0 images") as exc:
        split_coco(src, [10, 0.4], seed=0, out_dir=out)
    assert f"at least {math.ceil(100 / 0.4)} images" in str(exc.value)
    assert not out.exists()


@pytest.mark.parametrize(
    "content,needle",
    [
        ('{"images": [{"id": 1,', "not valid JSON"),
        ("[1, 2]", "top level is a list"),
        ('{"annotations": []}', 'no "images" list'),
        ('{"images": [], "annotations": []}', "lists no images"),
        ('{"images": [{"file_name": "a.jpg"}]}', "has id None"),
        ('{"images": [{"id": 1}, {"id": 1}]}', "duplicate image ids"),
    ],
)
def test_malformed_json_refused(tmp_path, content, needle):
    src = tmp_path / "bad.json"
    src.write_text(content)
    with pytest.raises(DataError, match=needle) as exc:
        split_coco(src, [50], seed=0)
    assert str(src) in str(exc.value)


def test_bad_percentages_refused(tmp_path):
    src = tmp_path / "t.json"
    _coco_json(src)
    with pytest.raises(ValueError, match="whole number"):
        split_coco(src, [2.5], seed=0)
    with pytest.raises(ValueError, match="positive"):
        split_coco(src, [0], seed=0)


def _fake_cityscapes(root, n_per_city=10):
    for city in ("aachen", "bremen", "zurich"):
        d = root / "leftImg8bit" / "train" / city
        d.mkdir(parents=True)
        for k in range(n_per_city):
            (d / f"{city}_{k:06d}_000019_leftImg8bit.png").write_bytes(b"")


def test_split_cityscapes_lists(tmp_path):
    _fake_cityscapes(tmp_path)
    out = split_cityscapes(tmp_path, [10, 20, 50], seed=0)
    lists = {p: read_image_list(path) for p, path in out.items()}
    for p, entries in lists.items():
        assert out[p] == str(tmp_path / "splits" / f"train_{p}.txt")
        assert len(entries) == int(p * 30 / 100)
        assert all((tmp_path / "leftImg8bit" / "train" / e).is_file() for e in entries)
    assert set(lists[10]) < set(lists[20]) < set(lists[50])
    again = split_cityscapes(tmp_path, [20], seed=0, out_dir=tmp_path / "again")
    assert read_image_list(again[20]) == lists[20]
    header = Path(out[10]).read_text().splitlines()[0]
    assert header.startswith("#") and "seed=0" in header and "percentage=10" in header
    with pytest.raises(ValueError, match="selects 0 images"):
        split_cityscapes(tmp_path, [1], seed=0)
    with pytest.raises(DataError, match="folder not found"):
        split_cityscapes(tmp_path / "nowhere", [10], seed=0)
