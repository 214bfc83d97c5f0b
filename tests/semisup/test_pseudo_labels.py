import pytest
import torch

from gdseg.semisup.pseudo_labels import make_pseudo_labels

K = 3  # classes; logit index K is no-object
H = W = 8


def _outputs(queries):
    """queries: list of (class index, class prob, mask logit map [H, W]) for one image."""
    logits = torch.full((1, len(queries), K + 1), -20.0)
    masks = torch.empty(1, len(queries), H, W)
    for q, (cls, prob, mask) in enumerate(queries):
        # Two-way split of the probability mass: `prob` on cls, the rest on one other logit.
        other = (cls + 1) % (K + 1)
        logits[0, q, cls] = torch.logit(torch.tensor(prob)).item()
        logits[0, q, other] = 0.0
        masks[0, q] = mask
    return logits, masks


def _square(side, inside=10.0, outside=-10.0):
    m = torch.full((H, W), outside)
    m[:side, :side] = inside
    return m


def test_keeps_confident_query_with_binary_mask():
    logits, masks = _outputs([(1, 0.9, _square(4))])
    (t,) = make_pseudo_labels(logits, masks, 0.7, 0.5, 5.0)
    assert t["labels"].tolist() == [1]
    assert t["masks"].dtype == torch.bool
    assert t["masks"].shape == (1, H, W)
    assert t["masks"][0].sum() == 16 and t["masks"][0, :4, :4].all()


def test_class_threshold_is_strict_and_an_argument():
    logits, masks = _outputs([(0, 0.65, _square(4)), (2, 0.75, _square(4))])
    (t,) = make_pseudo_labels(logits, masks, class_threshold=0.7)
    assert t["labels"].tolist() == [2]
    (t,) = make_pseudo_labels(logits, masks, class_threshold=0.6)
    assert t["labels"].tolist() == [0, 2]
    (t,) = make_pseudo_labels(logits, masks, class_threshold=0.8)
    assert t["labels"].numel() == 0


def test_no_object_argmax_is_dropped_even_when_confident():
    logits, masks = _outputs([(K, 0.99, _square(4))])
    (t,) = make_pseudo_labels(logits, masks, class_threshold=0.0)
    assert t["labels"].numel() == 0


def test_mask_threshold_binarizes_probabilities():
    m = torch.zeros(H, W)
    m[:2] = torch.logit(torch.tensor(0.6))  # 16 pixels at p = 0.6
    m[2:4] = torch.logit(torch.tensor(0.4))  # 16 pixels at p = 0.4
    m[4:] = -20.0
    logits, masks = _outputs([(0, 0.9, m)])
    (t,) = make_pseudo_labels(logits, masks, 0.7, mask_threshold=0.5, min_mask_area=1.0)
    assert t["masks"].sum() == 16
    (t,) = make_pseudo_labels(logits, masks, 0.7, mask_threshold=0.3, min_mask_area=1.0)
    assert t["masks"].sum() == 32


def test_min_mask_area_uses_probability_mass_and_is_inclusive():
    # 6 pixels at p ~= 1 and the rest at p ~= 0: a mass of 6 is kept above 5, dropped at 6.
    m = torch.full((H, W), -30.0)
    m.view(-1)[:6] = 30.0
    logits, masks = _outputs([(0, 0.9, m)])
    (kept,) = make_pseudo_labels(logits, masks, 0.7, 0.5, min_mask_area=5.0)
    assert kept["labels"].numel() == 1
    (dropped,) = make_pseudo_labels(logits, masks, 0.7, 0.5, min_mask_area=6.0)
    assert dropped["labels"].numel() == 0
    # Soft masks: mass counts probabilities, not binarized pixels (64 px at 0.1 = 6.4).
    soft = torch.full((H, W), torch.logit(torch.tensor(0.1)).item())
    logits, masks = _outputs([(0, 0.9, soft)])
    (t,) = make_pseudo_labels(logits, masks, 0.7, 0.5, min_mask_area=6.0)
    assert t["labels"].numel() == 1 and t["masks"].sum() == 0


def test_images_may_end_with_no_labels():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, K + 1)
    logits[..., K] += 50.0  # every query says no-object
    masks = torch.randn(3, 5, H, W)
    targets = make_pseudo_labels(logits, masks)
    assert len(targets) == 3
    for t in targets:
        assert t["labels"].shape == (0,) and t["labels"].dtype == torch.long
        assert t["masks"].shape == (0, H, W) and t["masks"].dtype == torch.bool


def test_mixed_batch_and_half_precision_inputs():
    l1, m1 = _outputs([(1, 0.9, _square(4)), (2, 0.5, _square(4))])
    l2, m2 = _outputs([(0, 0.9, _square(1)), (2, 0.95, _square(3))])
    targets = make_pseudo_labels(torch.cat([l1, l2]).bfloat16(), torch.cat([m1, m2]).half())
    assert [t["labels"].tolist() for t in targets] == [[1], [2]]


def test_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="pred_logits"):
        make_pseudo_labels(torch.zeros(2, 4), torch.zeros(2, 4, 8, 8))
