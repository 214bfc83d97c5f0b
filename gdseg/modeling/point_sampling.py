"""Point sampling used by the matcher and the criterion.

Masks are compared on a few thousand points instead of every pixel (PointRend / Mask2Former).
All coordinates are normalized ``(x, y)`` in ``[0, 1]`` over the whole (padded) frame, so a
prediction at 1/4 resolution and a target at full or 1/4 resolution are sampled at the same
physical location. Sampling is bilinear with ``align_corners=False`` and zero padding, i.e.
exactly ``F.grid_sample(input, 2 * coords - 1, align_corners=False)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "bilinear_weights",
    "importance_sample_points",
    "point_sample",
    "sample_masks_at_points",
    "uniform_points",
]


def uniform_points(num: int, num_points: int, device: torch.device | str) -> Tensor:
    """Uniformly random normalized coordinates.

    Returns:
        ``[num, num_points, 2]`` float32 ``(x, y)`` in ``[0, 1)``.
    """
    return torch.rand((num, num_points, 2), device=device)


def point_sample(input: Tensor, coords: Tensor) -> Tensor:
    """Bilinearly sample feature maps at normalized points (differentiable).

    Args:
        input: ``[N, C, H, W]`` float.
        coords: ``[N, P, 2]`` normalized ``(x, y)``.

    Returns:
        ``[N, C, P]``.
    """
    grid = (2.0 * coords - 1.0).unsqueeze(2)  # [N, P, 1, 2]
    return F.grid_sample(input, grid, mode="bilinear", align_corners=False).squeeze(3)


def bilinear_weights(coords: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Flat pixel indices and weights of the 4 bilinear neighbours of each point.

    ``(maps.flatten(-2)[..., index] * weight).sum(-1)`` equals ``grid_sample(maps, 2 * coords
    - 1, align_corners=False)``; neighbours outside the map get weight 0 (zero padding) and a
    clamped, valid index. Use with ``F.embedding_bag(index, table, per_sample_weights=weight,
    mode="sum")`` to sample many maps at the same points in one fused gather.

    Args:
        coords: ``[P, 2]`` normalized ``(x, y)``.

    Returns:
        ``(index, weight)``: int64 and float32, each ``[P, 4]``.
    """
    # grid_sample's unnormalization (align_corners=False); results agree with it to float
    # rounding of the weights.
    grid = 2.0 * coords.float() - 1.0
    ix = (grid[:, 0] + 1.0) * (width / 2.0) - 0.5
    iy = (grid[:, 1] + 1.0) * (height / 2.0) - 0.5
    x0f = ix.floor()
    y0f = iy.floor()
    wx1 = ix - x0f
    wy1 = iy - y0f
    wx0 = x0f + 1.0 - ix
    wy0 = y0f + 1.0 - iy
    x0 = x0f.long()
    y0 = y0f.long()
    indices, weights = [], []
    for dy, wy in ((0, wy0), (1, wy1)):
        for dx, wx in ((0, wx0), (1, wx1)):
            x = x0 + dx
            y = y0 + dy
            inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
            indices.append(y.clamp(0, height - 1) * width + x.clamp(0, width - 1))
            weights.append(wy * wx * inside)
    return torch.stack(indices, 1), torch.stack(weights, 1)


def sample_masks_at_points(
    masks: Tensor, coords: Tensor, mask_index: Tensor | None = None
) -> Tensor:
    """Bilinearly sample target masks of any dtype at normalized points, without gradient.

    Equal (to float rounding) to ``grid_sample(masks.float(), 2 * coords - 1,
    align_corners=False)``, but only the 4 neighbours of each point are read and converted to
    float, so a full-resolution bool mask is never copied to float. Coordinates are clamped to
    ``[0, 1]`` (points outside the frame are outside the contract).

    Args:
        masks: ``[N, H, W]`` bool, uint8 or float (any resolution).
        coords: ``[P, 2]`` points shared by every returned row, or ``[R, P, 2]`` per-row points.
        mask_index: ``[R]`` int64, which mask each row samples (required with ``[R, P, 2]``
            coords); with shared ``[P, 2]`` coords, default all ``N`` masks in order.

    Returns:
        ``[R, P]`` float32 (``R = N`` for shared coords without ``mask_index``).
    """
    num, height, width = masks.shape
    data = masks.view(torch.uint8) if masks.dtype == torch.bool else masks
    # A one-pixel zero border plays grid_sample's zero padding: with coords in [0, 1] every
    # neighbour is inside the padded plane, so no bounds test or clamp per corner is needed.
    padded = F.pad(data, (1, 1, 1, 1))
    row_len = width + 2
    plane = (height + 2) * row_len
    c = coords.float().clamp(0.0, 1.0)
    # align_corners=False: pixel centres at i + 0.5; +1 for the border.
    ix = c[..., 0] * width + 0.5
    iy = c[..., 1] * height + 0.5
    x0 = ix.floor()
    y0 = iy.floor()
    wx = ix - x0
    wy = iy - y0
    base = y0.long() * row_len + x0.long()
    if coords.dim() == 2:
        rows = padded.reshape(num, plane)
        if mask_index is not None:
            rows = rows[mask_index]

        def corner(offset: int) -> Tensor:
            return rows[:, base + offset].float()

        wx, wy = wx.unsqueeze(0), wy.unsqueeze(0)
    else:
        if mask_index is None:
            raise ValueError("sample_masks_at_points: per-row coords [R, P, 2] need mask_index [R]")
        flat = padded.reshape(-1)
        base = base + (mask_index * plane).unsqueeze(1)

        def corner(offset: int) -> Tensor:
            return flat.take(base + offset).float()

    top = torch.lerp(corner(0), corner(1), wx)
    bottom = torch.lerp(corner(row_len), corner(row_len + 1), wx)
    return torch.lerp(top, bottom, wy)


@torch.no_grad()
def importance_sample_points(
    logits: Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
) -> Tensor:
    """Points where the mask logit is most uncertain, plus uniform ones (Mask2Former).

    ``num_points * oversample_ratio`` uniform candidates are drawn per mask; the
    ``importance_sample_ratio * num_points`` with the highest uncertainty ``-|logit|`` are kept
    and the rest are filled with fresh uniform points. Random draws, in order:
    ``rand(N, int(num_points * oversample_ratio), 2)`` then ``rand(N, num_random, 2)``.

    Args:
        logits: ``[N, 1, H, W]`` mask logits.

    Returns:
        ``[N, num_points, 2]`` normalized coordinates.
    """
    num = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    candidates = uniform_points(num, num_sampled, logits.device)
    certainty = point_sample(logits, candidates)[:, 0].abs()  # [N, num_sampled]
    # The most uncertain points are those with the smallest |logit|. Only the set matters
    # (losses sum over points), so an unsorted selection is enough; on the CPU numpy's
    # introselect is several times faster than torch.topk for k in the thousands.
    if num_uncertain == 0:
        top = torch.empty(num, 0, dtype=torch.int64, device=logits.device)
    elif certainty.device.type == "cpu":
        order = np.argpartition(certainty.numpy(), num_uncertain - 1, axis=1)
        top = torch.from_numpy(order[:, :num_uncertain])
    else:
        top = certainty.topk(num_uncertain, dim=1, largest=False, sorted=False).indices
    coords = candidates.gather(1, top.unsqueeze(2).expand(-1, -1, 2))
    if num_random > 0:
        coords = torch.cat((coords, uniform_points(num, num_random, logits.device)), dim=1)
    return coords
