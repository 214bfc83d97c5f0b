import torch
import torch.nn.functional as F

from gdseg.modeling.postprocess import instance_inference


def direct(pred_logits, pred_masks, image_size, output_size, k):
    """Published inference: resize every mask, then top-k over (query, class) pairs."""
    masks = F.interpolate(pred_masks[None], scale_factor=4, mode="bilinear", align_corners=False)
    masks = masks[:, :, : image_size[0], : image_size[1]]
    masks = F.interpolate(masks, size=output_size, mode="bilinear", align_corners=False)[0]
    scores = F.softmax(pred_logits, -1)[:, :-1]
    K = scores.shape[1]
    top, idx = scores.flatten().topk(k)
    labels, query = idx % K, idx // K
    m = masks[query]
    binary = (m > 0).float()
    mask_score = (m.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    return labels, top * mask_score, m > 0


def _sort(labels, scores, masks):
    order = scores.argsort(descending=True)
    return labels[order], scores[order], masks[order]


def test_matches_published_inference():
    torch.manual_seed(0)
    logits, masks = torch.randn(10, 5) * 3, torch.randn(10, 8, 12) * 4
    out = instance_inference(
        logits, masks, image_size=(30, 40), output_size=(45, 61), num_detections=12
    )
    labels, scores, binary = _sort(*direct(logits, masks, (30, 40), (45, 61), 12))
    assert out["masks"].shape == (12, 45, 61) and out["masks"].dtype == torch.bool
    assert out["labels"].dtype == torch.long
    torch.testing.assert_close(out["scores"], scores)
    assert torch.equal(out["labels"], labels)
    assert torch.equal(out["masks"], binary)
    assert (out["scores"][:-1] >= out["scores"][1:]).all()


def test_threshold_and_small_problems():
    torch.manual_seed(0)
    logits, masks = torch.randn(3, 3), torch.randn(3, 4, 4) * 4
    out = instance_inference(logits, masks, (16, 16), (16, 16), num_detections=100)
    assert len(out["scores"]) == 6  # only Q * K pairs exist
    kept = instance_inference(logits, masks, (16, 16), (16, 16), score_threshold=0.2)
    assert torch.equal(kept["scores"], out["scores"][out["scores"] >= 0.2])


def test_empty_mask_scores_zero():
    logits = torch.tensor([[5.0, -5.0]])
    out = instance_inference(logits, torch.full((1, 4, 4), -3.0), (16, 16), (16, 16))
    assert out["masks"].sum() == 0 and out["scores"].item() == 0.0
