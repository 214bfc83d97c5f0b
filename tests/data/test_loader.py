"""Mappers and loaders: output format, crowd handling, disjoint ranks, exact resume."""

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from gdseg.config import get_cfg
from gdseg.data.loader import (
    InfiniteLoader,
    build_test_loader,
    build_train_loader,
    build_unlabeled_loader,
)
from gdseg.data.mapper import InstanceMapper
from gdseg.data.samplers import TrainingSampler
from gdseg.data.validation import DataError

H, W = 40, 48


def _box_polygon(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """12 small PNGs, each with two boxes (polygon + uncompressed RLE) and one crowd region."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    out = []
    for i in range(12):
        image = rng.integers(0, 60, (H, W, 3), dtype=np.uint8)
        x0, y0 = int(rng.integers(0, 20)), int(rng.integers(0, 15))
        image[y0 : y0 + 15, x0 : x0 + 20] = (220, 40 + 10 * i, 40)
        path = root / f"img_{i}.png"
        Image.fromarray(image).save(path)
        rle_mask = np.zeros((H, W), np.uint8, order="F")
        rle_mask[25:35, 30:44] = 1
        rle = mask_util.encode(rle_mask)
        uncompressed = {"size": [H, W], "counts": _uncompressed_counts(rle_mask)}
        crowd = {**rle, "counts": rle["counts"].decode()}
        anns = [
            {"id": 3 * i, "category_id": i % 3, "iscrowd": 0, "bbox": [x0, y0, 20, 15],
             "segmentation": _box_polygon(x0, y0, x0 + 20, y0 + 15)},
            {"id": 3 * i + 1, "category_id": 3, "iscrowd": 0, "bbox": [30, 25, 14, 10],
             "segmentation": uncompressed},
            {"id": 3 * i + 2, "category_id": 4, "iscrowd": 1, "bbox": [30, 25, 14, 10],
             "segmentation": crowd},
        ]  # fmt: skip
        out.append({"file_name": str(path), "image_id": 100 + i, "height": H, "width": W,
                    "annotations": anns})  # fmt: skip
    return out


def _uncompressed_counts(mask):
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return counts


def _cfg(num_workers=0, batch=4, image_size=32):
    cfg = get_cfg()
    cfg.SEED = 42
    cfg.INPUT.IMAGE_SIZE = image_size
    cfg.SOLVER.IMS_PER_BATCH = batch
    cfg.DATALOADER.NUM_WORKERS = num_workers
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 20, 100
    return cfg


def test_labeled_mapper_output(records):
    mapper = InstanceMapper(v2.Identity())
    record = records[0]
    out = mapper(record, seed=0)
    assert set(out) == {"image", "instances", "image_id", "file_name", "height", "width"}
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, H, W)
    assert (out["height"], out["width"], out["image_id"]) == (H, W, 100)
    labels, masks = out["instances"]["labels"], out["instances"]["masks"]
    assert labels.dtype == torch.long and labels.tolist() == [
        0,
        3,
    ]  # the crowd region is not a target
    assert masks.dtype == torch.bool and masks.shape == (2, H, W)
    for ann, mask in zip(record["annotations"][:2], masks):
        rle = mask_util.frPyObjects(ann["segmentation"], H, W)
        expected = mask_util.decode(mask_util.merge(rle) if isinstance(rle, list) else rle)
        assert np.array_equal(mask.numpy(), expected.astype(bool))


def test_labeled_loader_batches_and_drops_cropped_instances(records):
    loader = build_train_loader(_cfg(batch=4, image_size=24), records, rank=0, world_size=2)
    batches = [b for _, b in zip(range(6), loader)]
    assert all(len(b) == 2 for b in batches)  # global batch 4 over 2 processes
    counts = set()
    for batch in batches:
        for d in batch:
            assert d["image"].shape == (3, 24, 24)
            masks = d["instances"]["masks"]
            assert masks.shape[1:] == (24, 24) and len(masks) == len(d["instances"]["labels"])
            assert bool(masks.flatten(1).any(1).all())  # no empty instance survives
            assert 4 not in d["instances"]["labels"].tolist()
            counts.add(len(masks))
    assert loader.state_dict()["num_samples"] == 12


def test_global_batch_must_divide(records):
    with pytest.raises(ValueError, match="IMS_PER_BATCH"):
        build_train_loader(_cfg(batch=3), records, rank=0, world_size=2)


def test_ranks_see_disjoint_images_within_an_epoch(records):
    cfg = _cfg(batch=4)
    ids = []
    for rank in range(2):
        loader = build_train_loader(cfg, records, rank=rank, world_size=2)
        it = iter(loader)
        ids.append([d["image_id"] for _ in range(3) for d in next(it)])  # 6 = half an epoch
    assert not set(ids[0]) & set(ids[1])
    assert set(ids[0]) | set(ids[1]) == {r["image_id"] for r in records}


def _flatten(batches, keys):
    tensors = []
    for batch in batches:
        for d in batch:
            for key in keys:
                value = d
                for part in key.split("."):
                    value = value[part]
                tensors.append(value)
    return tensors


def _assert_resumes_exactly(make_loader, keys):
    reference = make_loader()
    it = iter(reference)
    first = [next(it) for _ in range(2)]
    state = reference.state_dict()
    expected = [next(it) for _ in range(3)]
    del it

    resumed = make_loader()
    resumed.load_state_dict(state)
    it = iter(resumed)
    got = [next(it) for _ in range(3)]
    del it
    for a, b in zip(_flatten(expected, keys), _flatten(got, keys), strict=True):
        assert torch.equal(a, b)
    # Not trivially equal: other positions give other images and augmentations.
    assert any(
        a.shape != b.shape or not torch.equal(a, b)
        for a, b in zip(_flatten(first, keys), _flatten(expected[:2], keys))
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_labeled_loader_resumes_exactly(records, num_workers):
    cfg = _cfg(num_workers=num_workers, batch=2)
    cfg.DATALOADER.SAMPLER_TRAIN = "RepeatFactorTrainingSampler"
    cfg.DATALOADER.REPEAT_THRESHOLD = 0.5
    _assert_resumes_exactly(
        lambda: build_train_loader(cfg, records, rank=1, world_size=2),
        ["image", "instances.masks", "instances.labels"],
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_unlabeled_loader_resumes_exactly(records, num_workers):
    cfg = _cfg(num_workers=num_workers, batch=2)
    _assert_resumes_exactly(
        lambda: build_unlabeled_loader(cfg, records, rank=0, world_size=1),
        ["image_weak", "image_strong"],
    )


def test_worker_processes_do_not_change_batches(records):
    """Same seed: the same tensors with or without workers (masks travel bit-packed)."""
    batches = []
    for num_workers in (0, 2):
        loader = build_train_loader(_cfg(num_workers=num_workers), records, rank=0, world_size=1)
        it = iter(loader)
        batches.append([next(it) for _ in range(2)])
        del it
    keys = ["image", "instances.masks", "instances.labels"]
    for a, b in zip(_flatten(batches[0], keys), _flatten(batches[1], keys), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_restored_state_brings_its_seed(records):
    """A run with a random seed (SEED -1) resumes its own stream: the seed is in the state."""
    cfg = _cfg(batch=2)
    cfg.DATALOADER.SAMPLER_TRAIN = "RepeatFactorTrainingSampler"
    cfg.DATALOADER.REPEAT_THRESHOLD = 0.5
    original = build_train_loader(cfg, records, rank=0, world_size=1, seed=1)
    it = iter(original)
    for _ in range(7):
        next(it)
    state = original.state_dict()
    expected = next(it)
    other = build_train_loader(cfg, records, rank=0, world_size=1, seed=2)
    next(iter(other))  # builds the other seed's epoch cache first
    other.load_state_dict(state)
    got = next(iter(other))
    keys = ["image", "instances.masks"]
    for a, b in zip(_flatten([expected], keys), _flatten([got], keys), strict=True):
        assert torch.equal(a, b)


def test_unlabeled_loader_output(records):
    cfg = _cfg(batch=4)
    cfg.SSL.IMS_PER_BATCH_UNLABELED = 2
    batch = next(iter(build_unlabeled_loader(cfg, records, rank=0, world_size=1)))
    assert len(batch) == 2
    for d in batch:
        assert d["image_weak"].shape == d["image_strong"].shape == (3, 32, 32)
        assert d["image_weak"].dtype == d["image_strong"].dtype == torch.uint8
        assert "instances" not in d


def test_same_seed_same_stream_other_seed_other_stream(records):
    def first_batch(seed):
        return next(iter(build_train_loader(_cfg(), records, rank=0, world_size=1, seed=seed)))

    a, b, c = first_batch(1), first_batch(1), first_batch(2)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert any(
        x["image_id"] != y["image_id"] or not torch.equal(x["image"], y["image"])
        for x, y in zip(a, c)
    )


def test_restoring_invalidates_old_iterators(records):
    loader = InfiniteLoader(records, InstanceMapper(v2.Identity()), TrainingSampler(12), 2)
    it = iter(loader)
    next(it)
    loader.load_state_dict({"num_samples": 0})
    with pytest.raises(RuntimeError, match="stale"):
        next(it)
    assert loader.state_dict()["num_samples"] == 0


def test_unreadable_image_raises_or_is_skipped(records, tmp_path):
    broken = dict(records[0], file_name=str(tmp_path / "missing.png"), image_id=999)
    bad_records = [broken, *records[1:4]]
    cfg = _cfg(batch=1)
    cfg.DATALOADER.SAMPLER_TRAIN = "TrainingSampler"

    def ids(loader, n=8):
        it = iter(loader)
        return [d["image_id"] for _ in range(n) for d in next(it)]

    with pytest.raises(DataError, match="missing.png"):
        ids(build_train_loader(cfg, bad_records, rank=0, world_size=1))
    cfg.DATALOADER.SKIP_BAD_RECORDS = True
    seen = ids(build_train_loader(cfg, bad_records, rank=0, world_size=1))
    assert 999 not in seen and len(seen) == 8


def test_test_loader_is_ordered_sharded_and_resized(records):
    cfg = _cfg()
    ids = []
    for rank in range(2):
        loader = build_test_loader(cfg, records[:5], rank=rank, world_size=2)
        for batch in loader:
            assert len(batch) == 1
            d = batch[0]
            assert d["image"].shape == (3, 20, 24)  # shorter side 20
            assert (d["height"], d["width"]) == (H, W)
            ids.append(d["image_id"])
    assert ids == [r["image_id"] for r in records[:5]]
