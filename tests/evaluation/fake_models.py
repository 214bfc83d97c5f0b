"""A model with the Mask2Former output contract whose predictions are known exactly (helper).

Query ``k < K`` predicts class k with the mask of the pixels whose colour is ``COLORS[k]``; the
last query predicts no-object. Masks are made at 1/4 resolution like Mask2Former's, with edges
on the 4-pixel grid surviving the upsampling exactly.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


class ColorQueryModel(nn.Module):
    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.scale = nn.Parameter(torch.tensor(20.0))  # a parameter, so .to()/device work
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> dict:
        self.calls += 1
        b, _, h, w = x.shape
        k = self.num_classes
        rgb = x * self.std + self.mean
        masks = []
        for c in range(k):
            color = torch.tensor(COLORS[c], dtype=x.dtype).view(1, 3, 1, 1)
            inside = ((rgb - color).abs().amax(1, keepdim=True) < 30).float()
            masks.append(F.avg_pool2d(inside, 4))
        masks.append(torch.zeros(b, 1, h // 4, w // 4))
        pred_masks = self.scale * 2 * (torch.cat(masks, 1) - 0.5)  # [B, K+1, H/4, W/4]
        logits = torch.full((k + 1, k + 1), -10.0)
        logits[torch.arange(k + 1), torch.arange(k + 1)] = 10.0  # query k -> class k, last: none
        pred_logits = logits.unsqueeze(0).expand(b, -1, -1).clone()
        return {"pred_logits": pred_logits, "pred_masks": pred_masks, "aux_outputs": []}


def color_image(height: int, width: int, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """uint8 [H, W, 3] grey image with box i (y0, x0, y1, x1) filled with COLORS[i]."""
    img = np.full((height, width, 3), 90, np.uint8)
    for i, (y0, x0, y1, x1) in enumerate(boxes):
        img[y0:y1, x0:x1] = COLORS[i]
    return img
