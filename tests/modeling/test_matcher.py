"""Hungarian matcher and point sampling: equal to grid_sample, to a dense cost, to transformers."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from gdseg.modeling.matcher import HungarianMatcher, pairwise_mask_costs
from gdseg.modeling.point_sampling import (
    importance_sample_points,
    point_sample,
    sample_masks_at_points,
)


def _grid_sample(masks: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Reference: masks [R, H, W], coords [R, P, 2] -> [R, P]."""
    grid = (2 * coords - 1).unsqueeze(2)
    return F.grid_sample(masks.float().unsqueeze(1), grid, align_corners=False)[:, 0, :, 0]


def _random_targets(sizes, num_classes, height, width):
    targets = []
    for n in sizes:
        masks = torch.zeros(n, height, width, dtype=torch.bool)
        for i in range(n):
            y0 = int(torch.randint(0, height // 2, (1,)))
            x0 = int(torch.randint(0, width // 2, (1,)))
            dy = int(torch.randint(1, height // 2 + 1, (1,)))
            dx = int(torch.randint(1, width // 2 + 1, (1,)))
            masks[i, y0 : y0 + dy, x0 : x0 + dx] = True
        targets.append({"labels": torch.randint(0, num_classes, (n,)), "masks": masks})
    return targets


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.float32])
def test_sample_masks_at_points_equals_grid_sample(dtype):
    torch.manual_seed(0)
    masks = torch.rand(4, 19, 27)
    masks = (masks > 0.5).to(dtype) if dtype != torch.float32 else masks
    # Shared points, all masks.
    coords = torch.rand(200, 2)
    coords[:4] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.999, 0.001]])
    expected = _grid_sample(masks, coords.expand(4, -1, -1))
    torch.testing.assert_close(sample_masks_at_points(masks, coords), expected, atol=1e-5, rtol=0)
    # Per-row points and mask index.
    index = torch.tensor([3, 0, 0, 2, 1])
    coords = torch.rand(5, 150, 2)
    expected = _grid_sample(masks[index], coords)
    got = sample_masks_at_points(masks, coords, index)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # Shared points with a mask index.
    got = sample_masks_at_points(masks, coords[0], index)
    torch.testing.assert_close(
        got, _grid_sample(masks[index], coords[0].expand(5, -1, -1)), atol=1e-5, rtol=0
    )


def test_importance_sample_points_picks_uncertain_points():
    torch.manual_seed(0)
    # Logit 0 (most uncertain) on the left half, large on the right half.
    logits = torch.full((3, 1, 8, 8), 10.0)
    logits[..., :4] = 0.0
    coords = importance_sample_points(logits, 64, 3.0, 0.75)
    assert coords.shape == (3, 64, 2)
    assert (coords >= 0).all() and (coords < 1).all()
    uncertain = coords[:, :48]
    # Every importance-sampled point lies where the sampled logit is smallest in magnitude.
    values = point_sample(logits, uncertain).abs()
    assert values.max() < 10.0


def test_pairwise_costs_equal_direct_formula():
    torch.manual_seed(0)
    pred = torch.randn(7, 50) * 3
    target = torch.rand(3, 50)
    bce, dice = pairwise_mask_costs(pred.t(), target)
    for q, n in itertools.product(range(7), range(3)):
        ref_bce = F.binary_cross_entropy_with_logits(pred[q], target[n])
        prob = pred[q].sigmoid()
        ref_dice = 1 - (2 * (prob * target[n]).sum() + 1) / (prob.sum() + target[n].sum() + 1)
        torch.testing.assert_close(bce[q, n], ref_bce, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dice[q, n], ref_dice, atol=1e-6, rtol=1e-5)


def test_matcher_on_pixel_centres_is_optimal_for_dense_cost():
    """With one point per pixel centre, the mask costs are the dense full-image costs, and
    the assignment must be the brute-force optimum of the dense cost."""
    torch.manual_seed(0)
    batch, queries, classes, h, w = 2, 4, 3, 6, 5
    outputs = {
        "pred_logits": torch.randn(batch, queries, classes + 1),
        "pred_masks": torch.randn(batch, queries, h, w) * 2,
    }
    targets = _random_targets([3, 2], classes, h, w)
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    centres = torch.stack((xs, ys), -1).reshape(1, -1, 2).expand(batch, -1, -1)
    matcher = HungarianMatcher(2.0, 5.0, 5.0, num_points=h * w)
    matches = matcher.match_layers([outputs], targets, point_coords=centres)[0]
    for b, (rows, cols) in enumerate(matches):
        target = targets[b]
        prob = outputs["pred_logits"][b].softmax(-1)
        pred = outputs["pred_masks"][b].flatten(1)
        tgt = target["masks"].flatten(1).float()
        bce, dice = pairwise_mask_costs(pred.t(), tgt)
        cost = 2 * -prob[:, target["labels"]] + 5 * bce + 5 * dice
        n = len(target["labels"])
        best = min(
            sum(cost[q, j] for j, q in enumerate(perm))
            for perm in itertools.permutations(range(queries), n)
        )
        assert len(rows) == n and rows.tolist() == sorted(rows.tolist())
        assert torch.isclose(cost[rows, cols].sum(), best, atol=1e-5)


def test_matcher_fewer_queries_than_targets_and_empty_images():
    torch.manual_seed(0)
    outputs = {"pred_logits": torch.randn(3, 2, 5), "pred_masks": torch.randn(3, 2, 8, 8)}
    targets = _random_targets([4, 0, 1], 4, 32, 32)
    matches = HungarianMatcher(num_points=64)(outputs, targets)
    assert [len(r) for r, _ in matches] == [2, 0, 1]
    rows, cols = matches[0]
    assert len(set(cols.tolist())) == 2 and cols.max() < 4
    assert matches[1][0].dtype == torch.int64
    no_targets = [
        {
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, 32, 32, dtype=torch.bool),
        }
    ] * 3
    assert all(len(r) == 0 for r, _ in HungarianMatcher(num_points=64)(outputs, no_targets))


def test_matcher_survives_non_finite_predictions():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 3)
    logits[0, 1] = float("nan")
    outputs = {"pred_logits": logits, "pred_masks": torch.randn(1, 4, 8, 8)}
    rows, cols = HungarianMatcher(num_points=32)(outputs, _random_targets([2], 2, 8, 8))[0]
    assert 1 not in rows.tolist() and len(rows) == 2


def test_matcher_rejects_all_zero_costs():
    with pytest.raises(ValueError, match="all 0"):
        HungarianMatcher(0, 0, 0)


def test_matcher_indices_equal_transformers(monkeypatch):
    modeling = pytest.importorskip("transformers.models.mask2former.modeling_mask2former")
    torch.manual_seed(0)
    batch, queries, classes, num_points = 2, 15, 7, 500
    layers = [
        {
            "pred_logits": torch.randn(batch, queries, classes + 1),
            "pred_masks": torch.randn(batch, queries, 12, 16) * 3,
        }
        for _ in range(3)
    ]
    targets = _random_targets([4, 6], classes, 48, 64)
    points = torch.rand(batch, num_points, 2)
    ours = HungarianMatcher(2.0, 5.0, 5.0, num_points).match_layers(layers, targets, points)

    calls = itertools.count()

    def fixed_rand(*size, **kwargs):  # the reference draws (1, P, 2) once per image
        assert tuple(size) == (1, num_points, 2)
        return points[next(calls) % batch].unsqueeze(0).clone()

    monkeypatch.setattr(torch, "rand", fixed_rand)
    reference = modeling.Mask2FormerHungarianMatcher(2.0, 5.0, 5.0, num_points)
    for layer, ours_layer in zip(layers, ours):
        theirs = reference(
            layer["pred_masks"],
            layer["pred_logits"],
            [t["masks"].float() for t in targets],
            [t["labels"] for t in targets],
        )
        for (r1, c1), (r2, c2) in zip(ours_layer, theirs):
            assert torch.equal(r1, r2) and torch.equal(c1, c2)


@pytest.mark.parametrize("chunk_logits", [1, 2 * 400 * 12, 1 << 22])  # 1, 2 or all layers
def test_factored_matching_equals_matching_full_masks(chunk_logits, monkeypatch):
    """mask_embed + mask_features (no full-resolution masks) give the assignment of the
    ``pred_masks = mask_embed @ mask_features`` they stand for, on every layer, whatever the
    number of layers costed at once."""
    monkeypatch.setattr("gdseg.modeling.matcher._MAX_CHUNK_LOGITS", chunk_logits)
    torch.manual_seed(0)
    batch, queries, channels, classes, num_points = 2, 12, 8, 5, 400
    features = torch.randn(batch, channels, 12, 16)
    layers = []
    for _ in range(4):
        embed = torch.randn(batch, queries, channels)
        layers.append(
            {
                "pred_logits": torch.randn(batch, queries, classes + 1),
                "mask_embed": embed,
                "pred_masks": torch.einsum("bqc,bchw->bqhw", embed, features),
            }
        )
    targets = _random_targets([3, 5], classes, 48, 64)
    points = torch.rand(batch, num_points, 2)
    matcher = HungarianMatcher(2.0, 5.0, 5.0, num_points)
    full = matcher.match_layers(layers, targets, points)
    factors_only = [{k: v for k, v in o.items() if k != "pred_masks"} for o in layers]
    factored = matcher.match_layers(factors_only, targets, points, mask_features=features)
    for full_layer, factored_layer in zip(full, factored):
        for (r1, c1), (r2, c2) in zip(full_layer, factored_layer):
            assert torch.equal(r1, r2) and torch.equal(c1, c2)
    # and the assignments are not trivial: another feature map changes them
    other = matcher.match_layers(factors_only, targets, points, mask_features=-features)
    assert any(not torch.equal(a[1], b[1]) for fl, ol in zip(full, other) for a, b in zip(fl, ol))
