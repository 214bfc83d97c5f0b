"""Instance inference of Mask2Former: top-k (query, class) pairs scored by class and mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["instance_inference"]


def instance_inference(
    pred_logits: Tensor,
    pred_masks: Tensor,
    image_size: tuple[int, int],
    output_size: tuple[int, int],
    num_detections: int = 100,
    score_threshold: float = 0.0,
    padded_size: tuple[int, int] | None = None,
) -> dict[str, Tensor]:
    """Detections of one image, as published Mask2Former instance inference.

    Class probabilities are the softmax over all K+1 logits with the no-object column
    dropped; the ``num_detections`` best (query, class) pairs are kept; mask logits are
    upsampled to the padded input (bilinear), cropped to ``image_size`` and resized to
    ``output_size``; a mask is ``logit > 0`` and the final score is the class probability times
    the mean mask probability inside the mask.

    Args:
        pred_logits: ``[Q, K+1]`` class logits.
        pred_masks: ``[Q, h, w]`` mask logits (stride 4 of the padded input).
        image_size: ``(height, width)`` of the image as fed to the network, before padding.
        output_size: ``(height, width)`` of the result (the original image).
        num_detections: pairs kept before thresholding (``TEST.DETECTIONS_PER_IMAGE``).
        score_threshold: drop detections whose final score is below this.
        padded_size: padded input size; ``4 * (h, w)`` when None.

    Returns:
        ``{"labels": Long[N], "scores": float[N], "masks": bool[N, H, W]}``, sorted by
        decreasing score (N <= num_detections).
    """
    Q, K1 = pred_logits.shape
    num_classes = K1 - 1
    scores = F.softmax(pred_logits.float(), dim=-1)[:, :-1]
    k = min(num_detections, scores.numel())
    top_scores, top_index = scores.flatten().topk(k, sorted=False)
    labels = top_index % num_classes
    query = torch.div(top_index, num_classes, rounding_mode="floor")

    # resize only the masks of the selected queries, each once
    unique_query, inverse = torch.unique(query, return_inverse=True)
    masks = pred_masks[unique_query].float()[None]
    if padded_size is None:
        padded_size = (pred_masks.shape[-2] * 4, pred_masks.shape[-1] * 4)
    masks = F.interpolate(masks, size=tuple(padded_size), mode="bilinear", align_corners=False)
    masks = masks[:, :, : image_size[0], : image_size[1]]
    masks = F.interpolate(masks, size=tuple(output_size), mode="bilinear", align_corners=False)[0]

    binary = masks > 0
    mask_scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    final = top_scores * mask_scores[inverse]
    order = final.argsort(descending=True)
    if score_threshold > 0:
        order = order[final[order] >= score_threshold]
    return {"labels": labels[order], "scores": final[order], "masks": binary[inverse[order]]}
