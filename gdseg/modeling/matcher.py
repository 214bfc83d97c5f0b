"""Hungarian matching between predicted queries and target masks (Mask2Former)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .linear import linear
from .point_sampling import bilinear_weights, sample_masks_at_points, uniform_points

__all__ = ["HungarianMatcher", "pairwise_mask_costs"]

Indices = list[tuple[Tensor, Tensor]]


def pairwise_mask_costs(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Sigmoid-BCE and dice cost between every prediction and every target, on points.

    Uses ``BCE(x, t) = softplus(x) - t * x`` (valid for soft targets too), so the BCE cost is
    one matmul instead of two.

    Args:
        pred: ``[P, M]`` mask logits of ``M`` predictions at ``P`` points (points first: the
            layout that gathering many maps at shared points produces).
        target: ``[N, P]`` target values in ``[0, 1]`` at the same points.

    Returns:
        ``(cost_bce, cost_dice)``, each ``[M, N]``.
    """
    num_points = pred.shape[0]
    cost_bce = (F.softplus(pred).sum(0) - target @ pred) / num_points  # [N, M]
    prob = pred.sigmoid()
    numerator = 2.0 * (target @ prob)
    denominator = prob.sum(0) + target.sum(1, keepdim=True)
    cost_dice = 1.0 - (numerator + 1.0) / (denominator + 1.0)
    return cost_bce.t(), cost_dice.t()


# Layers are costed in chunks of at most this many point logits (16 MB in float32), which
# bounds the temporaries of a chunk (logits, softplus, sigmoid) whatever the number of layers
# and queries. Measured on the 2-core benchmark VM, costs of 10 layers x 100 queries x 12544
# points: all layers at once 103 ms, 3 layers per chunk (this cap) 104 ms, 1-2 layers per chunk
# 63-81 ms; the difference is first-touch page faults of freshly mapped temporaries (~22k
# faults per call at >= 3 layers per chunk, ~0-5k below), not arithmetic. A smaller cap
# would be faster here but moves the costs by float rounding (~1e-7), so it waits for a
# rerun of the benchmarks measured with this one.
_MAX_CHUNK_LOGITS = 1 << 22


def _layer_chunks(num_layers: int, logits_per_layer: int) -> list[range]:
    """Consecutive layer ranges of at most ``_MAX_CHUNK_LOGITS`` logits (>= 1 layer each)."""
    step = max(1, _MAX_CHUNK_LOGITS // max(logits_per_layer, 1))
    return [range(i, min(i + step, num_layers)) for i in range(0, num_layers, step)]


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimizing a class + mask cost.

    ``cost = cost_class * (-p[target class]) + cost_mask * BCE + cost_dice * dice``. The class
    term approximates the NLL by ``-p`` (the constant 1 of ``1 - p`` does not change the
    assignment); the mask terms are computed on ``num_points`` uniformly random points, the
    same for every prediction and target of an image, because full-resolution costs for
    ``Q x N`` pairs are too expensive. Unmatched queries are trained as no-object.

    When several decoder layers are matched at once (:meth:`match_layers`), the points of an
    image are shared by all layers, so every target is sampled only once per image.
    NaN/inf costs are replaced by the largest float so such pairs are matched only if nothing
    else is possible, instead of crashing the assignment.
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_mask: float = 1.0,
        cost_dice: float = 1.0,
        num_points: int = 12544,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_mask and cost_dice are all 0")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: Sequence[dict[str, Tensor]]) -> Indices:
        """Match one prediction set.

        Args:
            outputs: ``{"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, h, w]}`` (logits).
            targets: ``B`` dicts ``{"labels": int64 [N_b], "masks": [N_b, H, W]}``, masks bool or
                float at any resolution of the same frame as ``pred_masks``.

        Returns:
            ``B`` pairs ``(query_index, target_index)``, int64 ``[min(Q, N_b)]`` each, with
            ``query_index`` ascending.
        """
        return self.match_layers([outputs], targets)[0]

    @torch.no_grad()
    def match_layers(
        self,
        layer_outputs: Sequence[dict[str, Tensor]],
        targets: Sequence[dict[str, Tensor]],
        point_coords: Tensor | None = None,
        mask_features: Tensor | None = None,
    ) -> list[Indices]:
        """Match the predictions of several decoder layers against the same targets.

        Args:
            layer_outputs: ``L`` dicts as in :meth:`forward`.
            targets: as in :meth:`forward`.
            point_coords: ``[B, P, 2]`` normalized ``(x, y)`` points per image; default
                ``uniform_points(B, num_points)`` (a single ``torch.rand`` call).
            mask_features: ``[B, C, h, w]``; with it, every layer gives ``"mask_embed"``
                ``[B, Q, C]`` instead of ``"pred_masks"`` (``pred_masks = mask_embed @
                mask_features``) and the mask logits are only formed at the points.

        Returns:
            For each layer, the ``B`` index pairs of :meth:`forward`.
        """
        factored = mask_features is not None
        first = layer_outputs[0]["mask_embed" if factored else "pred_masks"]
        batch = first.shape[0]
        device = first.device
        if len(targets) != batch:
            raise ValueError(f"HungarianMatcher: {len(targets)} targets for a batch of {batch}")
        sizes = [len(t["labels"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if max(sizes, default=0) == 0:
            return [[(empty, empty) for _ in range(batch)] for _ in layer_outputs]
        if point_coords is None:
            point_coords = uniform_points(batch, self.num_points, device)
        point_coords = point_coords.float()
        images = [b for b, n in enumerate(sizes) if n > 0]
        height, width = (mask_features if factored else first).shape[-2:]
        with torch.autocast(device_type=device.type, enabled=False):
            probs = [o["pred_logits"].float().softmax(-1) for o in layer_outputs]
            costs = []
            for b in images:
                coords = point_coords[b]
                target = sample_masks_at_points(targets[b]["masks"].to(device), coords)  # [N, P]
                labels = targets[b]["labels"].to(device)
                # The bilinear weights of the image's points serve every layer and query;
                # embedding_bag over a [h*w, X] table is a fused gather-and-weight in which
                # each point reads 4 contiguous rows (faster than grid_sample).
                index, weight = bilinear_weights(coords, height, width)
                if factored:
                    logits = self._factored_logits(layer_outputs, mask_features, b, index, weight)
                else:
                    logits = self._sampled_logits(layer_outputs, b, index, weight, height * width)
                parts = []
                for layers in _layer_chunks(len(layer_outputs), coords.shape[0] * first.shape[1]):
                    cost_bce, cost_dice = pairwise_mask_costs(logits(layers), target)
                    cost_class = torch.cat([-probs[i][b][:, labels] for i in layers])
                    parts.append(
                        self.cost_mask * cost_bce
                        + self.cost_class * cost_class
                        + self.cost_dice * cost_dice
                    )
                cost = torch.cat(parts).view(len(layer_outputs), -1, len(labels))  # [L, Q, N]
                big = torch.finfo(cost.dtype).max
                costs.append(torch.nan_to_num(cost, nan=big, posinf=big, neginf=big))
            # One device->host copy for every layer and image.
            flat = torch.cat([c.flatten() for c in costs]).cpu().numpy()

        blocks, offset = {}, 0
        for b, cost in zip(images, costs):
            blocks[b] = flat[offset : offset + cost.numel()].reshape(cost.shape)
            offset += cost.numel()
        matches = []
        for layer in range(len(layer_outputs)):
            per_image = []
            for b in range(batch):
                if b not in blocks:
                    per_image.append((empty, empty))
                    continue
                rows, cols = linear_sum_assignment(blocks[b][layer])
                per_image.append(
                    (
                        torch.as_tensor(rows, dtype=torch.int64),
                        torch.as_tensor(cols, dtype=torch.int64),
                    )
                )
            matches.append(per_image)
        return matches

    @staticmethod
    def _sampled_logits(
        layer_outputs: Sequence[dict[str, Tensor]], b: int, index: Tensor, weight: Tensor, hw: int
    ) -> Callable[[range], Tensor]:
        """``layers -> [P, len(layers) * Q]`` mask logits of image ``b`` at the points, read
        from ``pred_masks``."""
        # one [h*w, Q] buffer for every layer: a fresh one per layer costs more than the
        # transposing copy itself on the CPU (first-touch page faults)
        table = torch.empty(hw, layer_outputs[0]["pred_masks"].shape[1], device=index.device)

        def logits(layers: range) -> Tensor:
            parts = []
            for i in layers:
                table.copy_(layer_outputs[i]["pred_masks"][b].flatten(1).t())
                parts.append(F.embedding_bag(index, table, per_sample_weights=weight, mode="sum"))
            return torch.cat(parts, dim=1)

        return logits

    @staticmethod
    def _factored_logits(
        layer_outputs: Sequence[dict[str, Tensor]],
        mask_features: Tensor,
        b: int,
        index: Tensor,
        weight: Tensor,
    ) -> Callable[[range], Tensor]:
        """``layers -> [P, len(layers) * Q]`` mask logits of image ``b`` at the points, from
        ``mask_embed`` and ``mask_features``.

        Bilinear sampling is linear, so sampling ``mask_embed @ mask_features`` at a point
        equals ``mask_embed @`` (the features sampled there): the features are gathered once
        per image, one product serves several layers, and no full-resolution mask is formed.
        """
        table = mask_features[b].float().flatten(1).t().contiguous()  # [h*w, C]
        point_features = F.embedding_bag(index, table, per_sample_weights=weight, mode="sum")

        def logits(layers: range) -> Tensor:
            embeds = [layer_outputs[i]["mask_embed"][b] for i in layers]
            return linear(point_features, torch.cat(embeds).float())

        return logits

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points}"
        )
