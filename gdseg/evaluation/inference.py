"""Running a model over a dataset: images in, per-image instance predictions out.

One prediction per image is a small, picklable dict whose masks are compressed RLE at the
ORIGINAL image size, so predictions are cheap to gather across processes and to keep for a
whole dataset (100 dense masks of a COCO image weigh ~100 MB; their RLE a few hundred KB)::

    {"image_id": int, "file_name": str, "height": H, "width": W,
     "labels": [int] (contiguous 0..K-1), "scores": [float],
     "rles": [{"size": [H, W], "counts": str}], "bboxes": [[x, y, w, h]]}

:func:`predictions_to_coco_results` turns them into a COCO results list (json category ids).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "contiguous_to_dataset_ids",
    "encode_masks",
    "inference_on_dataset",
    "load_test_image",
    "predict_images",
    "predictions_to_coco_results",
]


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def load_test_image(path: str, min_size: int, max_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reads an image (EXIF-oriented RGB) and applies the test-time resize.

    Returns:
        (uint8 Tensor[3, h, w] resized for the model, uint8 Tensor[3, H, W] original).
    """
    from gdseg.data.transforms import inference_transforms
    from gdseg.data.validation import read_image

    arr = read_image(path)
    if not arr.flags.writeable:  # arrays viewing PIL's buffer are read-only
        arr = arr.copy()
    original = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    resized = inference_transforms(min_size, max_size)(original)
    return torch.as_tensor(resized), original


def _unwrap(model: nn.Module) -> nn.Module:
    # Inference on uneven shards must not go through DDP's forward-time collectives.
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def _batch_images(
    images: Sequence[torch.Tensor],
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    size_divisibility: int,
    device: torch.device,
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    from gdseg.modeling.preprocess import batch_images

    images = [img.to(device, non_blocking=True) for img in images]
    return batch_images(images, pixel_mean, pixel_std, size_divisibility=size_divisibility)


@torch.no_grad()
def predict_images(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    output_sizes: Sequence[tuple[int, int]],
    *,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    size_divisibility: int = 32,
    num_detections: int = 100,
    score_thresh: float = 0.0,
) -> list[dict[str, torch.Tensor]]:
    """Runs the model on one batch and post-processes every image to its original size.

    Args:
        model: Mask2Former (returns ``pred_logits [B, Q, K+1]``, ``pred_masks [B, Q, h, w]``);
            put in eval mode by the caller.
        images: uint8 Tensor[3, hi, wi] per image, already resized for testing.
        output_sizes: original (H, W) per image; masks are returned at this size.
        pixel_mean, pixel_std: normalization of RGB 0-255 inputs.
        size_divisibility: padding multiple of the batch.
        num_detections: top-k (query, class) pairs kept per image.
        score_thresh: detections scoring below are dropped.

    Returns:
        Per image ``{"labels": Long[N], "scores": [N], "masks": bool[N, H, W]}`` on the CPU,
        by decreasing score.
    """
    from gdseg.modeling.postprocess import instance_inference

    device = next(iter(model.parameters())).device
    batch, image_sizes = _batch_images(images, pixel_mean, pixel_std, size_divisibility, device)
    outputs = model(batch)
    logits, masks = outputs["pred_logits"], outputs["pred_masks"]
    results = []
    for i, out_size in enumerate(output_sizes):
        # Masks at 1/4 of the padded frame are upsampled to it, cropped to the valid region
        # and resized to the original image size (Mask2Former's order).
        r = instance_inference(
            logits[i].float(),
            masks[i].float(),
            image_size=tuple(image_sizes[i]),
            output_size=tuple(out_size),
            num_detections=num_detections,
            score_threshold=score_thresh,
            padded_size=tuple(batch.shape[-2:]),
        )
        results.append({k: v.cpu() for k, v in r.items()})
    return results


def encode_masks(masks: torch.Tensor) -> list[dict]:
    """bool Tensor[N, H, W] -> N compressed COCO RLEs with ``counts`` as str (json-able)."""
    if masks.shape[0] == 0:
        return []
    arr = np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8))
    rles = mask_util.encode(arr)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def _to_prediction(meta: dict, result: dict[str, torch.Tensor], height: int, width: int) -> dict:
    rles = encode_masks(result["masks"])
    bboxes = mask_util.toBbox(rles).tolist() if rles else []
    return {
        "image_id": meta.get("image_id"),
        "file_name": meta.get("file_name"),
        "height": height,
        "width": width,
        "labels": [int(v) for v in result["labels"]],
        "scores": [float(v) for v in result["scores"]],
        "rles": rles,
        "bboxes": [[float(v) for v in b] for b in bboxes],
    }


def _iter_batches(
    data: Iterable, min_size: int, max_size: int
) -> Iterable[list[tuple[dict, torch.Tensor, int, int]]]:
    """Yields lists of (input dict, resized image, original H, original W)."""
    for item in data:
        batch = item if isinstance(item, (list, tuple)) else [item]
        out = []
        for d in batch:
            if "image" in d:
                image = d["image"]
                h = int(d.get("height", image.shape[-2]))
                w = int(d.get("width", image.shape[-1]))
            else:
                image, original = load_test_image(d["file_name"], min_size, max_size)
                h, w = original.shape[-2:]
            out.append((d, image, h, w))
        yield out


def _gather(predictions: list[dict]) -> list[dict]:
    """All predictions on rank 0 (others get []), deduplicated by image id in rank order."""
    rank, world = _dist_info()
    if world == 1:
        return predictions
    gathered: list[list[dict] | None] = [None] * world
    dist.all_gather_object(gathered, predictions)
    if rank != 0:
        return []
    seen, merged = set(), []
    for part in gathered:
        for p in part or []:
            key = p["image_id"] if p["image_id"] is not None else p["file_name"]
            if key not in seen:  # samplers may pad the last shard with repeats
                seen.add(key)
                merged.append(p)
    return merged


def inference_on_dataset(
    model: nn.Module,
    data: Iterable,
    *,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    size_divisibility: int = 32,
    num_detections: int = 100,
    score_thresh: float = 0.0,
    min_size: int = 800,
    max_size: int = 1333,
    log_period: int = 50,
) -> list[dict]:
    """Predicts instances for every image of a dataset.

    The model runs in eval mode under ``torch.no_grad`` and gets its training mode back after.
    With ``torch.distributed`` initialized, a ``Sequence`` of records is split here (every
    ``world_size``-th image); any other iterable (a test DataLoader) is assumed to be sharded
    by its sampler already. Predictions are gathered to rank 0 with ``all_gather_object``.

    Args:
        model: Mask2Former (or a DDP wrapper of it).
        data: a test loader yielding batches (lists of loader dicts with ``image`` uint8
            [3, h, w] resized for testing and the original ``height``/``width``), or records
            (dicts with ``file_name``, ``image_id``), read and resized here with
            ``min_size``/``max_size``.
        pixel_mean, pixel_std: normalization of RGB 0-255 inputs.
        size_divisibility: padding multiple of a batch.
        num_detections: top-k detections per image (COCO evaluates at most 100).
        score_thresh: detections scoring below are dropped (0 for evaluation: AP integrates
            over all scores, so a threshold can only lower it).
        min_size, max_size: test-time resize of records without ``image``.
        log_period: log progress every N batches.

    Returns:
        On rank 0, one prediction dict per image (format in the module docstring); [] on the
        other ranks.
    """
    rank, world = _dist_info()
    if world > 1 and isinstance(data, Sequence):
        data = data[rank::world]
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    predictions: list[dict] = []
    start = time.perf_counter()
    try:
        for i, batch in enumerate(_iter_batches(data, min_size, max_size)):
            results = predict_images(
                net,
                [b[1] for b in batch],
                [(b[2], b[3]) for b in batch],
                pixel_mean=pixel_mean,
                pixel_std=pixel_std,
                size_divisibility=size_divisibility,
                num_detections=num_detections,
                score_thresh=score_thresh,
            )
            for (meta, _, h, w), res in zip(batch, results):
                predictions.append(_to_prediction(meta, res, h, w))
            if log_period > 0 and (i + 1) % log_period == 0 and rank == 0:
                rate = (time.perf_counter() - start) / len(predictions)
                logger.info("Inference: %d images done, %.3f s/image", len(predictions), rate)
    finally:
        net.train(was_training)
    logger.info(
        "Inference on %d images (rank %d) took %.1f s",
        len(predictions),
        rank,
        time.perf_counter() - start,
    )
    return _gather(predictions)


def contiguous_to_dataset_ids(metadata: dict | None) -> dict[int, int]:
    """Inverse of ``thing_dataset_id_to_contiguous_id`` (json keys may be str); {} if absent."""
    mapping = (metadata or {}).get("thing_dataset_id_to_contiguous_id") or {}
    return {int(c): int(d) for d, c in mapping.items()}


def predictions_to_coco_results(predictions: list[dict], metadata: dict | None) -> list[dict]:
    """Per-image predictions -> a COCO results list (what ``COCO.loadRes`` reads).

    Contiguous labels are mapped back to the dataset's json category ids through
    ``metadata["thing_dataset_id_to_contiguous_id"]`` (identity when the metadata has none).

    Returns:
        ``[{"image_id", "category_id", "segmentation": RLE (counts str), "score",
        "bbox": [x, y, w, h] of the mask}]``.
    """
    to_json = contiguous_to_dataset_ids(metadata)
    results = []
    for p in predictions:
        for label, score, rle, box in zip(p["labels"], p["scores"], p["rles"], p["bboxes"]):
            results.append(
                {
                    "image_id": p["image_id"],
                    "category_id": to_json.get(int(label), int(label)),
                    "segmentation": rle,
                    "score": float(score),
                    "bbox": box,
                }
            )
    return results
