"""Teacher predictions -> pseudo-label targets for the student (SPEC §2, step 4).

The thresholds are arguments (``SSL.CLASS_THRESHOLD``, ``SSL.MASK_THRESHOLD``,
``SSL.MIN_MASK_AREA`` in the config) rather than literals, so they can be tuned and tested.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def make_pseudo_labels(
    pred_logits: torch.Tensor,
    pred_masks: torch.Tensor,
    class_threshold: float = 0.7,
    mask_threshold: float = 0.5,
    min_mask_area: float = 5.0,
) -> list[dict[str, torch.Tensor]]:
    """Filter the teacher's final-layer queries into per-image targets.

    A query is kept when (1) its argmax class is not no-object (the last logit), (2) its
    maximum softmax probability is above ``class_threshold``, and (3) the sum of its sigmoid
    mask probabilities is above ``min_mask_area`` (in pixels of ``pred_masks``' resolution).
    The kept mask is ``sigmoid(mask logit) > mask_threshold``. An image may keep nothing:
    it then gets empty targets, which push every student query to no-object.

    Args:
        pred_logits: class logits ``[B, Q, K+1]`` (last = no-object).
        pred_masks: mask logits ``[B, Q, h, w]`` (1/4 of the padded input).
        class_threshold: minimum class probability (strict ``>``).
        mask_threshold: binarization threshold of the sigmoid mask probability (strict ``>``).
        min_mask_area: masks whose probability mass is ``<=`` this are dropped.

    Returns:
        One dict per image: ``labels`` LongTensor ``[N]`` and ``masks`` BoolTensor
        ``[N, h, w]`` (N may be 0), on the input device.
    """
    if pred_logits.dim() != 3 or pred_masks.dim() != 4:
        raise ValueError(
            "make_pseudo_labels expects pred_logits [B,Q,K+1] and pred_masks [B,Q,h,w]; got "
            f"{tuple(pred_logits.shape)} and {tuple(pred_masks.shape)}."
        )
    num_classes = pred_logits.shape[-1] - 1
    probs = pred_logits.float().softmax(-1)
    scores, labels = probs.max(-1)  # [B, Q]
    mask_probs = pred_masks.float().sigmoid()  # [B, Q, h, w]
    areas = mask_probs.sum(dim=(-2, -1))  # [B, Q]
    keep = (labels != num_classes) & (scores > class_threshold) & (areas > min_mask_area)
    targets = []
    for b in range(pred_logits.shape[0]):
        k = keep[b]
        targets.append({"labels": labels[b][k], "masks": mask_probs[b][k] > mask_threshold})
    return targets
