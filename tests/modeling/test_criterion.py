"""SetCriterion: parity with transformers, direct dense losses, edge cases, config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gdseg.modeling.criterion as criterion_module
import gdseg.modeling.point_sampling as point_sampling
from gdseg.modeling.criterion import SetCriterion, average_num_masks, build_criterion
from gdseg.modeling.matcher import HungarianMatcher

WEIGHTS = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}


def _criterion(num_classes, num_points=64, **kwargs):
    matcher = HungarianMatcher(2.0, 5.0, 5.0, num_points)
    return SetCriterion(num_classes, matcher, WEIGHTS, 0.1, num_points=num_points, **kwargs)


def _outputs(batch, queries, classes, h, w, layers=3, requires_grad=False):
    preds = [
        {
            "pred_logits": torch.randn(batch, queries, classes + 1, requires_grad=requires_grad),
            "pred_masks": (torch.randn(batch, queries, h, w) * 3).requires_grad_(requires_grad),
        }
        for _ in range(layers)
    ]
    return {**preds[-1], "aux_outputs": preds[:-1]}, preds


def _blob_targets(sizes, classes, height, width):
    """Rectangles on a coarse 1/4 grid, so nearest upsampling by 4 is exact."""
    targets = []
    for n in sizes:
        small = torch.zeros(n, height // 4, width // 4, dtype=torch.bool)
        for i in range(n):
            y0, x0 = (int(v) for v in torch.randint(0, height // 8, (2,)))
            dy, dx = (int(v) for v in torch.randint(2, height // 8, (2,)))
            small[i, y0 : y0 + dy, x0 : x0 + dx] = True
        targets.append({"labels": torch.randint(0, classes, (n,)), "masks": small})
    return targets


def _upsample(targets, factor=4):
    return [
        {
            "labels": t["labels"],
            "masks": t["masks"].repeat_interleave(factor, 1).repeat_interleave(factor, 2),
        }
        for t in targets
    ]


def _fixed_points(monkeypatch, num_points):
    """Make every uniform draw return the same fixed points (independent of call order)."""
    base = torch.rand(num_points * 4, 2)

    def fake(num, points, device):
        return base[:points].to(device).expand(num, -1, -1).clone()

    monkeypatch.setattr(point_sampling, "uniform_points", fake)
    monkeypatch.setattr("gdseg.modeling.matcher.uniform_points", fake)


def test_loss_keys_weights_and_state_dict():
    torch.manual_seed(0)
    outputs, _ = _outputs(2, 5, 3, 8, 8, layers=4)
    targets = _blob_targets([2, 1], 3, 32, 32)
    criterion = _criterion(3)
    losses = criterion(outputs, targets)
    expected = {f"{k}{s}" for k in WEIGHTS for s in ["", "_0", "_1", "_2"]}
    assert set(losses) == expected
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    assert "empty_weight" not in criterion.state_dict()
    assert criterion.empty_weight.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.1])
    single = _criterion(3, deep_supervision=False)(outputs, targets)
    assert set(single) == set(WEIGHTS)
    # Returned values are weighted: halving a weight halves the loss.
    half = SetCriterion(
        3, HungarianMatcher(2.0, 5.0, 5.0, 64), {**WEIGHTS, "loss_ce": 1.0}, 0.1, num_points=64
    )
    torch.testing.assert_close(half(outputs, targets)["loss_ce"], losses["loss_ce"] / 2)


def test_equal_to_dense_losses_on_pixel_centres(monkeypatch):
    """All points at pixel centres (no importance sampling) = losses over every pixel."""
    torch.manual_seed(0)
    h, w, classes = 6, 8, 4
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    centres = torch.stack((xs, ys), -1).reshape(-1, 2)
    fake = lambda num, points, device: centres.expand(num, -1, -1).clone()  # noqa: E731
    monkeypatch.setattr(point_sampling, "uniform_points", fake)
    monkeypatch.setattr("gdseg.modeling.matcher.uniform_points", fake)
    outputs, _ = _outputs(2, 5, classes, h, w, layers=1)
    targets = [
        {"labels": t["labels"], "masks": t["masks"][:, :h, :w]}
        for t in _blob_targets([3, 2], classes, 4 * h, 4 * w)
    ]
    criterion = _criterion(classes, num_points=h * w, importance_sample_ratio=0.0)
    losses = criterion(outputs, targets)
    (rows0, cols0), (rows1, cols1) = criterion.matcher(outputs, targets)
    num_masks = 5.0
    target_classes = torch.full((2, 5), classes)
    bce, dice = 0.0, 0.0
    for b, (rows, cols) in enumerate([(rows0, cols0), (rows1, cols1)]):
        target_classes[b, rows] = targets[b]["labels"][cols]
        pred = outputs["pred_masks"][b, rows].flatten(1)
        tgt = targets[b]["masks"][cols].flatten(1).float()
        bce += F.binary_cross_entropy_with_logits(pred, tgt, reduction="none").mean(1).sum()
        prob = pred.sigmoid()
        dice += (1 - (2 * (prob * tgt).sum(1) + 1) / (prob.sum(1) + tgt.sum(1) + 1)).sum()
    ce = F.cross_entropy(
        outputs["pred_logits"].transpose(1, 2), target_classes, weight=criterion.empty_weight
    )
    torch.testing.assert_close(losses["loss_ce"], 2.0 * ce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses["loss_mask"], 5.0 * bce / num_masks, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses["loss_dice"], 5.0 * dice / num_masks, atol=1e-5, rtol=1e-5)


def test_parity_with_transformers(monkeypatch):
    modeling = pytest.importorskip("transformers.models.mask2former.modeling_mask2former")
    from transformers import Mask2FormerConfig

    torch.manual_seed(0)
    batch, queries, classes, layers, points = 2, 12, 6, 4, 300
    outputs, preds = _outputs(batch, queries, classes, 16, 20, layers=layers)
    targets = _blob_targets([3, 5], classes, 64, 80)
    targets = _upsample(targets)  # full resolution, 4x the predictions
    rows = 8  # matched masks per layer: min(Q, 3) + min(Q, 5)
    num_sampled, num_random = 3 * points, points - int(0.75 * points)
    match_points = torch.rand(batch, points, 2)
    candidates = torch.rand(layers, rows, num_sampled, 2)  # our layer order: aux..., final
    randoms = torch.rand(layers, rows, num_random, 2)
    real_rand = torch.rand

    class FixedRand:
        """Serve the same points to both implementations, each in its own call order."""

        def __init__(self, layer_order):
            self.order, self.calls = layer_order, {"match": 0, "cand": 0, "rand": 0}

        def next(self, kind, table):
            i = self.calls[kind]
            self.calls[kind] += 1
            return table[self.order[i]].clone()

        def __call__(self, *size, **kwargs):
            size = tuple(size[0]) if len(size) == 1 else tuple(size)
            if size == (1, points, 2):  # transformers' matcher, per image
                i = self.calls["match"]
                self.calls["match"] += 1
                return match_points[i % batch : i % batch + 1].clone()
            if size == (rows, num_sampled, 2):  # transformers, per layer
                return self.next("cand", candidates)
            if size == (rows, num_random, 2):
                return self.next("rand", randoms)
            table = {  # ours: all images / all layers at once
                (batch, points, 2): match_points,
                (layers * rows, num_sampled, 2): candidates.flatten(0, 1),
                (layers * rows, num_random, 2): randoms.flatten(0, 1),
            }
            return table[size].clone()

    config = Mask2FormerConfig(
        num_labels=classes,
        no_object_weight=0.1,
        class_weight=2.0,
        mask_weight=5.0,
        dice_weight=5.0,
        train_num_points=points,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
    )
    reference = modeling.Mask2FormerLoss(config, {})
    monkeypatch.setattr(torch, "rand", FixedRand([layers - 1, *range(layers - 1)]))
    theirs = reference(
        preds[-1]["pred_masks"],
        preds[-1]["pred_logits"],
        [t["masks"].float() for t in targets],
        [t["labels"] for t in targets],
        [
            {"masks_queries_logits": p["pred_masks"], "class_queries_logits": p["pred_logits"]}
            for p in preds[:-1]
        ],
    )
    monkeypatch.setattr(torch, "rand", FixedRand(list(range(layers))))
    ours = _criterion(classes, num_points=points)(outputs, targets)
    monkeypatch.setattr(torch, "rand", real_rand)
    assert len(ours) == len(theirs) == 3 * layers
    names = {"loss_ce": "loss_cross_entropy", "loss_mask": "loss_mask", "loss_dice": "loss_dice"}
    for key, value in ours.items():
        name = next(n for n in names if key.startswith(n))
        ref = theirs[names[name] + key[len(name) :]] * WEIGHTS[name]
        assert abs(value.item() - ref.item()) < 1e-4, (key, value.item(), ref.item())


def test_zero_targets_push_every_query_to_no_object():
    torch.manual_seed(0)
    classes = 3
    outputs, preds = _outputs(2, 5, classes, 8, 8, layers=2, requires_grad=True)
    empty = {
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, 32, 32, dtype=torch.bool),
    }
    losses = _criterion(classes)(outputs, [empty, empty])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_ce"] > 0 and losses["loss_ce_0"] > 0
    for key in ("loss_mask", "loss_dice", "loss_mask_0", "loss_dice_0"):
        assert losses[key] == 0
    sum(losses.values()).backward()
    grad = preds[-1]["pred_logits"].grad
    # Descending the gradient raises every no-object logit and lowers every class logit.
    assert (grad[..., classes] < 0).all() and (grad[..., :classes] > 0).all()
    assert preds[-1]["pred_masks"].grad is not None
    assert preds[-1]["pred_masks"].grad.abs().sum() == 0


def test_one_image_without_targets_is_finite():
    torch.manual_seed(0)
    outputs, _ = _outputs(2, 5, 3, 8, 8)
    targets = _blob_targets([2, 0], 3, 32, 32)
    losses = _criterion(3)(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"] > 0


def test_bool_and_float_masks_give_equal_losses():
    torch.manual_seed(0)
    outputs, _ = _outputs(2, 6, 4, 8, 8)
    targets = _blob_targets([3, 2], 4, 32, 32)
    floats = [{"labels": t["labels"], "masks": t["masks"].float()} for t in targets]
    criterion = _criterion(4)
    torch.manual_seed(1)
    a = criterion(outputs, targets)
    torch.manual_seed(1)
    b = criterion(outputs, floats)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-6)


def test_quarter_and_full_resolution_targets_give_close_losses():
    torch.manual_seed(0)
    outputs, _ = _outputs(2, 6, 4, 16, 16)
    quarter = _blob_targets([3, 2], 4, 64, 64)  # 16x16 masks
    full = _upsample(quarter)  # 64x64, nearest
    criterion = _criterion(4, num_points=1024)
    torch.manual_seed(1)
    a = criterion(outputs, quarter)
    torch.manual_seed(1)
    b = criterion(outputs, full)
    for key in a:
        # Same points; only bilinear interpolation across mask edges differs.
        torch.testing.assert_close(a[key], b[key], rtol=0.01, atol=0.01)


def test_gradients_reach_every_layer():
    torch.manual_seed(0)
    outputs, preds = _outputs(2, 5, 3, 8, 8, layers=3, requires_grad=True)
    losses = _criterion(3)(outputs, _blob_targets([2, 3], 3, 32, 32))
    sum(losses.values()).backward()
    for p in preds:
        assert p["pred_logits"].grad.abs().sum() > 0
        assert p["pred_masks"].grad.abs().sum() > 0


def test_chunked_layers_equal_one_chunk(monkeypatch):
    torch.manual_seed(0)
    _fixed_points(monkeypatch, 64)
    outputs, _ = _outputs(2, 5, 3, 8, 8, layers=4)
    targets = _blob_targets([2, 3], 3, 32, 32)
    one = _criterion(3)(outputs, targets)
    chunked = _criterion(3, max_candidates_per_chunk=192 * 6)(outputs, targets)  # ~1 layer each
    for key in one:
        torch.testing.assert_close(one[key], chunked[key])


def _factored_outputs(batch, queries, classes, dim, h, w, layers):
    """Predictions with ``pred_masks = mask_embed @ mask_features``, as Mask2Former returns."""
    features = torch.randn(batch, dim, h, w, requires_grad=True)
    embeds = [torch.randn(batch, queries, dim, requires_grad=True) for _ in range(layers)]
    logits = [torch.randn(batch, queries, classes + 1, requires_grad=True) for _ in range(layers)]
    preds = [
        {
            "pred_logits": lg,
            "pred_masks": torch.einsum("bqc,bchw->bqhw", e, features),
            "mask_embed": e,
        }
        for lg, e in zip(logits, embeds)
    ]
    leaves = [features, *embeds, *logits]
    return {**preds[-1], "mask_features": features, "aux_outputs": preds[:-1]}, leaves


@pytest.mark.parametrize("sizes", [[2, 3], [0, 3], [0, 0]])
def test_masks_from_factors_equal_masks_from_pred_masks(sizes, monkeypatch):
    """The factored path (matched masks recomputed from embeddings and mask features) gives
    the losses and gradients of the path through the full ``pred_masks``."""
    calls = []
    factored_fn = criterion_module._masks_from_factors
    monkeypatch.setattr(
        criterion_module, "_masks_from_factors", lambda *a: calls.append(1) or factored_fn(*a)
    )
    torch.manual_seed(0)
    outputs, leaves = _factored_outputs(2, 6, 3, 4, 8, 8, layers=3)
    plain = {
        **{k: v for k, v in outputs.items() if k not in ("mask_embed", "mask_features")},
        "aux_outputs": [{k: v for k, v in o.items() if k != "mask_embed"} for o in outputs["aux_outputs"]],
    }  # fmt: skip
    targets = _blob_targets(sizes, 3, 32, 32)
    criterion = _criterion(3)
    results = []
    for out in (outputs, plain):
        torch.manual_seed(1)
        losses = criterion(out, targets)
        grads = torch.autograd.grad(sum(losses.values()), leaves, allow_unused=True)
        results.append((losses, grads))
    (factored, g1), (ref, g2) = results
    assert len(calls) == (1 if sum(sizes) else 0)  # only the first run took the factored path
    assert factored.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(factored[key], ref[key], rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g2):
        b = torch.zeros_like(a) if b is None else b
        a = torch.zeros_like(b) if a is None else a
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_float32_under_autocast():
    torch.manual_seed(0)
    outputs, preds = _outputs(1, 5, 3, 8, 8, layers=2)
    targets = _blob_targets([2], 3, 32, 32)
    half = [{k: v.bfloat16() for k, v in p.items()} for p in preds]
    criterion = _criterion(3)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = criterion({**half[-1], "aux_outputs": half[:-1]}, targets)
    torch.manual_seed(1)
    ref = criterion(
        {
            **{k: v.float() for k, v in half[-1].items()},
            "aux_outputs": [{k: v.float() for k, v in p.items()} for p in half[:-1]],
        },
        targets,
    )
    for key in ref:
        assert low[key].dtype == torch.float32
        torch.testing.assert_close(low[key], ref[key])


def test_average_num_masks_without_distributed():
    assert not torch.distributed.is_initialized()
    assert average_num_masks(7) == 7.0
    assert average_num_masks(0) == 1.0
    assert average_num_masks(0.5, "cpu") == 1.0


def test_build_criterion_from_config():
    from gdseg.config import get_cfg

    cfg = get_cfg()
    criterion = build_criterion(cfg)
    assert criterion.num_classes == cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    assert criterion.num_points == 12544 and criterion.matcher.num_points == 12544
    assert (criterion.matcher.cost_class, criterion.matcher.cost_mask) == (2.0, 5.0)
    assert criterion.empty_weight[-1].item() == pytest.approx(0.1)
    assert len(criterion.weight_dict) == 3 * cfg.MODEL.MASK_FORMER.DEC_LAYERS
    cfg.merge_from_list(["MODEL.MASK_FORMER.DEEP_SUPERVISION", "False"])
    assert not build_criterion(cfg).deep_supervision


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown losses"):
        _criterion(3, losses=("labels", "boxes"))
    with pytest.raises(ValueError, match="oversample_ratio"):
        _criterion(3, oversample_ratio=0.5)


def _average_worker(rank: int, world: int, init_file: str, results) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        results[rank] = average_num_masks([3, 0][rank])
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_average_num_masks_across_two_processes(tmp_path):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_average_worker, args=(2, str(tmp_path / "init"), results), nprocs=2)
        assert dict(results) == {0: 1.5, 1: 1.5}
