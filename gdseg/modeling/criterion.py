"""Mask2Former set criterion: Hungarian matching, then class and point-sampled mask losses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .matcher import HungarianMatcher
from .point_sampling import importance_sample_points, point_sample, sample_masks_at_points

__all__ = ["SetCriterion", "average_num_masks", "build_criterion"]

_LOSS_KEYS = {"labels": ("loss_ce",), "masks": ("loss_mask", "loss_dice")}


def average_num_masks(num_masks: float, device: torch.device | str = "cpu") -> float:
    """Number of target masks averaged over all processes, clamped to >= 1.

    The clamp keeps a batch without any target (e.g. no pseudo-label passed the threshold)
    from dividing by zero. Works without ``torch.distributed`` (single process).
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        total = torch.tensor([float(num_masks)], dtype=torch.float32, device=device)
        dist.all_reduce(total)
        num_masks = total.item() / dist.get_world_size()
    return max(float(num_masks), 1.0)


@dataclass
class _Rows:
    """Matched (layer, image, query, target) quadruples, one row each, layer-major.

    Within a layer rows go image by image with ascending query index (the matcher's order).
    """

    layer: Tensor  # [R] int64 on the loss device
    batch: Tensor
    query: Tensor
    target: Tensor  # index into the image's own targets
    batch_host: Tensor  # [R] int64 on the CPU, to select rows without device syncs
    layer_counts: list[int]  # rows per layer


def _flatten_matches(matches: list[list[tuple[Tensor, Tensor]]], device: torch.device) -> _Rows:
    columns: list[list[Tensor]] = [[], [], [], []]
    layer_counts = []
    for layer, per_image in enumerate(matches):
        count = 0
        for b, (query, target) in enumerate(per_image):
            columns[0].append(torch.full_like(query, layer))
            columns[1].append(torch.full_like(query, b))
            columns[2].append(query)
            columns[3].append(target)
            count += len(query)
        layer_counts.append(count)
    # One host->device copy for all index vectors.
    host = torch.stack([torch.cat(c) for c in columns])  # [4, R]
    layer, batch, query, target = host.to(device)
    return _Rows(layer, batch, query, target, host[1], layer_counts)


class SetCriterion(nn.Module):
    """Losses of Mask2Former on the outputs of every decoder layer.

    For each prediction set (final, and with ``deep_supervision`` every ``aux_outputs`` entry),
    queries are matched to targets by ``matcher``; then

    - ``loss_ce``: cross-entropy over ``K + 1`` classes, unmatched queries -> no-object
      (class ``K``) whose weight is ``eos_coef``; a weighted mean over all queries.
    - ``loss_mask``: sigmoid BCE of matched masks on ``num_points`` points chosen by
      importance sampling (uncertainty ``-|logit|``), mean over points.
    - ``loss_dice``: dice loss on the same points.

    Mask losses are summed over matched masks and divided by the number of target masks
    averaged over processes (:func:`average_num_masks`). Auxiliary layer ``i`` (the ``i``-th
    entry of ``aux_outputs``) gives ``loss_ce_i``, ``loss_mask_i``, ``loss_dice_i``.

    The returned losses are **already multiplied by their weight** (the trainer sums them).
    ``weight_dict`` maps a loss name to its weight; an auxiliary key ``loss_x_i`` uses its own
    entry if present, otherwise the entry of ``loss_x``. Matching and losses run in float32
    even under autocast.

    Random draws (``torch.rand``, in this order): the matcher's ``[B, num_points, 2]``
    points, shared by all layers; then, per chunk of layers, the importance-sampling
    candidates and the uniform points of every matched mask of those layers.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        eos_coef: float = 0.1,
        losses: Sequence[str] = ("labels", "masks"),
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        deep_supervision: bool = True,
        max_candidates_per_chunk: int = 1 << 24,
    ) -> None:
        """
        Args:
            num_classes: number of classes ``K``, without no-object.
            matcher: the assignment of queries to targets.
            weight_dict: loss name -> weight (see the class docstring).
            eos_coef: cross-entropy weight of the no-object class.
            losses: subset of ``("labels", "masks")``.
            num_points: points per mask for the mask losses.
            oversample_ratio: candidates per point for importance sampling.
            importance_sample_ratio: share of the points chosen by uncertainty.
            deep_supervision: also compute the losses of ``outputs["aux_outputs"]``.
            max_candidates_per_chunk: bound on ``masks x candidate points`` sampled at once;
                layers are processed in chunks below it to bound memory.
        """
        super().__init__()
        unknown = [name for name in losses if name not in _LOSS_KEYS]
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {unknown}; allowed {list(_LOSS_KEYS)}")
        missing = [k for name in losses for k in _LOSS_KEYS[name] if k not in weight_dict]
        if missing:
            raise ValueError(f"SetCriterion: weight_dict has no weight for {missing}")
        if oversample_ratio < 1.0 or not 0.0 <= importance_sample_ratio <= 1.0:
            raise ValueError(
                "SetCriterion: need oversample_ratio >= 1 and 0 <= importance_sample_ratio <= 1, "
                f"got {oversample_ratio} and {importance_sample_ratio}"
            )
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.losses = tuple(losses)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision = deep_supervision
        self.max_candidates_per_chunk = max_candidates_per_chunk
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        # Non-persistent: a loss constant, not part of the model's state dict.
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def forward(
        self, outputs: dict[str, object], targets: Sequence[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Compute the weighted losses.

        Args:
            outputs: ``{"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, h, w],
                "aux_outputs": [{"pred_logits", "pred_masks"}] * (L - 1)}`` (aux optional).
                When every prediction also holds ``"mask_embed"`` ``[B, Q, C]`` and
                ``outputs["mask_features"]`` ``[B, C, h, w]`` is given (Mask2Former's
                outputs, ``pred_masks = mask_embed @ mask_features``), the masks of matched
                queries are recomputed from these two factors and the gradient flows through
                them; the matcher forms mask logits at its points only, so ``pred_masks`` is
                not needed (Mask2Former's auxiliary predictions do not hold it), and no mask
                or gradient the size of all ``B x Q`` masks of every layer is ever formed.
            targets: ``B`` dicts ``{"labels": int64 [N_b], "masks": [N_b, H, W]}``; masks bool
                or float, covering the same (padded) frame as the predictions at any
                resolution. ``N_b`` may be 0.

        Returns:
            ``{"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", ...}``: weighted scalars.
        """
        layers: list[dict[str, Tensor]] = []
        if self.deep_supervision:
            layers.extend(outputs.get("aux_outputs", []) or [])
        layers.append(outputs)
        suffixes = [f"_{i}" for i in range(len(layers) - 1)] + [""]
        device = outputs["pred_logits"].device

        with torch.autocast(device_type=device.type, enabled=False):
            num_masks = average_num_masks(sum(len(t["labels"]) for t in targets), device)
            factored = all("mask_embed" in o for o in layers)
            features = outputs.get("mask_features") if factored else None
            matches = self.matcher.match_layers(layers, targets, mask_features=features)
            rows = _flatten_matches(matches, device)
            per_layer: dict[str, Tensor] = {}
            if "labels" in self.losses:
                per_layer["loss_ce"] = self._loss_labels(layers, targets, rows)
            if "masks" in self.losses:
                per_layer.update(self._loss_masks(layers, targets, rows, num_masks, features))

        losses = {}
        for name, values in per_layer.items():
            for i, suffix in enumerate(suffixes):
                key = name + suffix
                losses[key] = values[i] * self.weight_dict.get(key, self.weight_dict[name])
        return losses

    def _loss_labels(
        self, layers: list[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]], rows: _Rows
    ) -> Tensor:
        """Weighted-mean cross-entropy per layer, ``[L]``."""
        logits = torch.stack([o["pred_logits"] for o in layers]).float()  # [L, B, Q, K+1]
        num_layers, batch, num_queries, num_logits = logits.shape
        target_classes = torch.full(
            (num_layers, batch, num_queries),
            self.num_classes,
            dtype=torch.int64,
            device=logits.device,
        )
        if len(rows.layer):
            labels = torch.cat([t["labels"].to(logits.device) for t in targets])
            offsets = torch.tensor(
                [0] + [len(t["labels"]) for t in targets[:-1]], device=logits.device
            ).cumsum(0)
            matched = labels[offsets[rows.batch] + rows.target]
            target_classes[rows.layer, rows.batch, rows.query] = matched
        weight = self.empty_weight.to(logits.device)
        nll = F.cross_entropy(
            logits.reshape(-1, num_logits),
            target_classes.reshape(-1),
            weight=weight,
            reduction="none",
        ).view(num_layers, -1)
        return nll.sum(1) / weight[target_classes].view(num_layers, -1).sum(1)

    def _loss_masks(
        self,
        layers: list[dict[str, Tensor]],
        targets: Sequence[dict[str, Tensor]],
        rows: _Rows,
        num_masks: float,
        features: Tensor | None,
    ) -> dict[str, Tensor]:
        """Point-sampled BCE and dice per layer, ``{"loss_mask": [L], "loss_dice": [L]}``."""
        num_layers = len(layers)
        if len(rows.layer) == 0:
            # No target anywhere: zero losses that still reach the mask predictions (DDP sees
            # every parameter used).
            if features is None:
                zero = torch.stack([o["pred_masks"].sum() * 0.0 for o in layers]).float()
            else:
                zero = torch.stack([o["mask_embed"].sum() * 0.0 for o in layers]).float()
                zero = zero + features.sum().float() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        # Split the layers into chunks whose candidate points fit the memory budget.
        candidates = int(self.num_points * self.oversample_ratio)
        chunk_rows = max(1, self.max_candidates_per_chunk // max(candidates, 1))
        bce_parts, dice_parts = [], []
        start_layer, start_row = 0, 0
        while start_layer < num_layers:
            end_layer, end_row = start_layer, start_row
            while end_layer < num_layers and (
                end_layer == start_layer
                or end_row + rows.layer_counts[end_layer] - start_row <= chunk_rows
            ):
                end_row += rows.layer_counts[end_layer]
                end_layer += 1
            bce, dice = self._mask_losses_rows(
                layers, targets, rows, start_layer, end_layer, start_row, end_row, features
            )
            bce_parts.append(bce)
            dice_parts.append(dice)
            start_layer, start_row = end_layer, end_row
        bce = torch.cat(bce_parts)
        dice = torch.cat(dice_parts)
        loss_mask = bce.new_zeros(num_layers).index_add(0, rows.layer, bce) / num_masks
        loss_dice = dice.new_zeros(num_layers).index_add(0, rows.layer, dice) / num_masks
        return {"loss_mask": loss_mask, "loss_dice": loss_dice}

    def _mask_losses_rows(
        self,
        layers: list[dict[str, Tensor]],
        targets: Sequence[dict[str, Tensor]],
        rows: _Rows,
        start_layer: int,
        end_layer: int,
        start_row: int,
        end_row: int,
        features: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Per-row BCE and dice, ``[end_row - start_row]`` each, for layers ``[start, end)``."""
        key = "pred_masks" if features is None else "mask_embed"
        picked = []
        row = start_row
        for layer in range(start_layer, end_layer):
            count = rows.layer_counts[layer]
            sl = slice(row, row + count)
            picked.append(layers[layer][key][rows.batch[sl], rows.query[sl]])
            row += count
        if features is None:
            pred = torch.cat(picked).float()  # [R, h, w]
        else:
            pred = _masks_from_factors(
                torch.cat(picked).float(), features, rows.batch_host[start_row:end_row]
            )
        pred = pred.unsqueeze(1)  # [R, 1, h, w]
        coords = importance_sample_points(
            pred.detach(), self.num_points, self.oversample_ratio, self.importance_sample_ratio
        )  # [R, P, 2]
        with torch.no_grad():
            labels = pred.new_zeros(coords.shape[:2])  # [R, P]
            batch_host = rows.batch_host[start_row:end_row]
            for b, target in enumerate(targets):
                local = torch.nonzero(batch_host == b).flatten()
                if len(local) == 0:
                    continue
                local = local.to(pred.device)
                target_index = rows.target[local + start_row]
                masks = target["masks"].to(pred.device)
                labels[local] = sample_masks_at_points(masks, coords[local], target_index)
        logits = point_sample(pred, coords).squeeze(1)  # [R, P]
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1)
        prob = logits.sigmoid()
        numerator = 2.0 * (prob * labels).sum(1)
        denominator = prob.sum(1) + labels.sum(1)
        dice = 1.0 - (numerator + 1.0) / (denominator + 1.0)
        return bce, dice


def _masks_from_factors(embed: Tensor, features: Tensor, batch_host: Tensor) -> Tensor:
    """Mask logits ``[R, h, w]`` of rows with embeddings ``embed`` ``[R, C]`` in images
    ``batch_host`` ``[R]`` (CPU) from ``features`` ``[B, C, h, w]``.

    One matrix product per image over the rows of all layers, so each backward product has
    ``R_b`` (tens) rather than a handful of rows: the point of this path.
    """
    B, C, h, w = features.shape
    flat = features.float().reshape(B, C, h * w).unbind(0)
    order = torch.argsort(batch_host, stable=True)
    counts = torch.bincount(batch_host, minlength=B).tolist()
    sorted_embed = embed[order.to(embed.device)].split(counts)
    parts = [e @ f for e, f, n in zip(sorted_embed, flat, counts) if n]
    inverse = torch.argsort(order).to(embed.device)
    return torch.cat(parts)[inverse].view(-1, h, w)


def build_criterion(cfg) -> SetCriterion:
    """Build the published Mask2Former criterion from ``cfg.MODEL.MASK_FORMER`` keys."""
    mf = cfg.MODEL.MASK_FORMER
    matcher = HungarianMatcher(
        cost_class=mf.CLASS_WEIGHT,
        cost_mask=mf.MASK_WEIGHT,
        cost_dice=mf.DICE_WEIGHT,
        num_points=mf.TRAIN_NUM_POINTS,
    )
    base = {"loss_ce": mf.CLASS_WEIGHT, "loss_mask": mf.MASK_WEIGHT, "loss_dice": mf.DICE_WEIGHT}
    weight_dict = dict(base)
    if mf.DEEP_SUPERVISION:
        # Explicit per-layer keys, as detectron2's Mask2Former builds them.
        for i in range(mf.DEC_LAYERS - 1):
            weight_dict.update({f"{name}_{i}": w for name, w in base.items()})
    return SetCriterion(
        num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
        matcher=matcher,
        weight_dict=weight_dict,
        eos_coef=mf.NO_OBJECT_WEIGHT,
        losses=("labels", "masks"),
        num_points=mf.TRAIN_NUM_POINTS,
        oversample_ratio=mf.OVERSAMPLE_RATIO,
        importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO,
        deep_supervision=mf.DEEP_SUPERVISION,
    )
