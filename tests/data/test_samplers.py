"""Samplers: seeded epochs, disjoint ranks, exact resume, repeat-factor sampling, shards."""

import itertools
import math

import pytest
import torch

from gdseg.data.samplers import (
    InferenceSampler,
    RepeatFactorTrainingSampler,
    TrainingSampler,
    mix_seed,
    repeat_factors_from_category_frequency,
)


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_training_sampler_epochs_are_seeded_permutations():
    a = _take(TrainingSampler(10, seed=3), 30)
    assert a == _take(TrainingSampler(10, seed=3), 30)
    assert a != _take(TrainingSampler(10, seed=4), 30)
    for epoch in range(3):
        assert sorted(a[epoch * 10 : (epoch + 1) * 10]) == list(range(10))
    assert a[:10] != a[10:20]  # a new order every epoch


@pytest.mark.parametrize("size", [10, 11])
def test_ranks_see_disjoint_images_within_an_epoch(size):
    world = 2
    streams = [
        _take(TrainingSampler(size, seed=0, rank=r, world_size=world), 20) for r in range(world)
    ]
    per_rank = size // world
    seen = [set(s[:per_rank]) for s in streams]
    assert not seen[0] & seen[1]
    assert len(seen[0]) == len(seen[1]) == per_rank
    # Interleaving the ranks gives back the single-process stream.
    single = _take(TrainingSampler(size, seed=0), 40)
    assert [x for pair in zip(*streams) for x in pair] == single


def test_start_resumes_the_same_stream():
    full = _take(TrainingSampler(7, seed=1, rank=1, world_size=3), 25)
    assert _take(TrainingSampler(7, seed=1, rank=1, world_size=3, start=9), 16) == full[9:]
    rfs = RepeatFactorTrainingSampler(torch.tensor([1.0, 2.5, 1.3, 4.0]), seed=2)
    full = _take(rfs, 60)
    resumed = RepeatFactorTrainingSampler(torch.tensor([1.0, 2.5, 1.3, 4.0]), seed=2, start=37)
    assert _take(resumed, 23) == full[37:]


def test_positions_are_unique_across_ranks():
    positions = set()
    for rank in range(3):
        sampler = TrainingSampler(5, seed=0, rank=rank, world_size=3)
        positions |= {p for _, p in itertools.islice(sampler.iter_with_positions(), 10)}
    assert positions == set(range(30))


def _records(cat_lists):
    return [
        {"image_id": i, "annotations": [{"category_id": c, "iscrowd": 0} for c in cats]}
        for i, cats in enumerate(cat_lists)
    ]


def test_repeat_factors_follow_lvis_formula():
    # Category 0 in all 10 images, category 1 in one image, category 2 only as a crowd region.
    cats = [[0]] * 9 + [[0, 1]]
    records = _records(cats)
    records[0]["annotations"].append({"category_id": 2, "iscrowd": 1})
    records.append({"image_id": 10, "annotations": []})
    factors = repeat_factors_from_category_frequency(records, threshold=0.5)
    n = 11
    common = max(1.0, math.sqrt(0.5 / (10 / n)))
    rare = math.sqrt(0.5 / (1 / n))
    expected = [common] * 9 + [rare, 1.0]
    assert torch.allclose(factors, torch.tensor(expected, dtype=torch.float64))
    assert common == 1.0 and rare > 2.0
    with pytest.raises(ValueError):
        repeat_factors_from_category_frequency(records, threshold=0.0)


def test_repeat_factor_sampler_repeats_rare_images_deterministically():
    records = _records([[0]] * 19 + [[0, 1]])
    factors = repeat_factors_from_category_frequency(records, threshold=0.3)
    rare = math.sqrt(0.3 * 20)  # category 1 is in 1 of 20 images
    assert math.isclose(float(factors[-1]), rare) and float(factors[0]) == 1.0
    sampler = RepeatFactorTrainingSampler(factors, seed=5)
    counts = sum(torch.bincount(sampler.epoch_indices(e), minlength=20) for e in range(400))
    assert counts[:19].tolist() == [400] * 19  # factor 1: exactly once per epoch
    assert abs(float(counts[19]) / 400 - rare) < 0.1  # ~2.45 times per epoch on average
    stream = _take(sampler, 300)
    assert stream == _take(RepeatFactorTrainingSampler(factors, seed=5), 300)
    assert stream != _take(RepeatFactorTrainingSampler(factors, seed=6), 300)


def test_repeat_factor_stochastic_rounding():
    factors = torch.tensor([1.0, 1.5])
    sampler = RepeatFactorTrainingSampler(factors, seed=0)
    lengths = [sampler.epoch_length(e) for e in range(400)]
    assert set(lengths) == {2, 3}
    assert 0.4 < (sum(lengths) / 400 - 2) < 0.6  # 1.5 -> 1 or 2 copies, 2 on average half the time


def test_inference_sampler_shards_cover_everything_once():
    for size, world in [(10, 3), (2, 4), (7, 1)]:
        shards = [list(InferenceSampler(size, r, world)) for r in range(world)]
        assert [i for s in shards for i in s] == list(range(size))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        assert [len(InferenceSampler(size, r, world)) for r in range(world)] == list(
            map(len, shards)
        )


def test_mix_seed_separates_neighbours():
    seeds = {mix_seed(0, i) for i in range(1000)} | {mix_seed(1, i) for i in range(1000)}
    assert len(seeds) == 2000 and all(0 <= s < 2**63 for s in seeds)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="rank"):
        TrainingSampler(5, rank=2, world_size=2)
    with pytest.raises(ValueError, match="empty"):
        TrainingSampler(0)
    with pytest.raises(ValueError):
        RepeatFactorTrainingSampler(torch.tensor([0.0, 0.0]))
