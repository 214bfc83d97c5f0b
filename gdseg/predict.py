"""``gdseg predict``: instance masks for any images, as COCO results and overlay pictures.

Writes to ``out_dir``:
- ``predictions.json``: a COCO results list, one entry per detection: ``image_id``,
  ``file_name``, ``category_id``, ``category_name``, ``segmentation`` (compressed RLE, counts
  as str), ``score``, ``bbox`` ([x, y, w, h] of the mask);
- ``images.json``: the matching COCO ``images`` + ``categories`` (no annotations), so that
  ``COCO("images.json").loadRes("predictions.json")`` works with pycocotools (as long as
  there is at least one detection: pycocotools' ``loadRes`` fails on an empty list);
- ``overlays/<image name>.png``: masks, boxes and "class score" captions.

Thresholds. Mask2Former always returns its top 100 (query, class) pairs per image, most of
them with tiny scores: they cost nothing in COCO AP, which integrates over all scores, but
they are noise in a picture or a downstream application. A score is the class probability
times the mean mask probability inside the mask, so 0.5 keeps detections the model is
confident about in both (detectron2's demo uses the same default); ``--score-thresh 0``
with ``--max-detections 100`` gives exactly what the evaluation sees.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import pycocotools.mask as mask_util
import torch
import yaml

from gdseg.evaluation.coco import write_json
from gdseg.evaluation.inference import (
    contiguous_to_dataset_ids,
    encode_masks,
    load_test_image,
    predict_images,
)
from gdseg.visualize import draw_instances, save_image

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_DETECTIONS",
    "DEFAULT_SCORE_THRESH",
    "add_predict_args",
    "collect_inputs",
    "load_predictor",
    "predict",
    "predict_main",
]

DEFAULT_SCORE_THRESH = 0.5
DEFAULT_MAX_DETECTIONS = 100
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def collect_inputs(inputs: Sequence[str]) -> list[str]:
    """Image files from files, folders (searched recursively) and glob patterns, in order.

    Raises:
        FileNotFoundError: an input matches no image.
    """
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(root, f)
                for root, _, names in os.walk(item)
                for f in names
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
        elif os.path.isfile(item):
            found = [item]
        else:
            found = sorted(
                f for f in glob.glob(item, recursive=True) if f.lower().endswith(IMAGE_EXTENSIONS)
            )
        if not found:
            raise FileNotFoundError(f"no image found for input {item!r}")
        files.extend(os.path.abspath(f) for f in found)
    return list(dict.fromkeys(files))  # drop repeats, keep order


def _build_model(cfg: Any) -> torch.nn.Module:
    from gdseg.modeling import build_model

    return build_model(cfg)


def _state_dict(ckpt: Any, use_teacher: bool) -> dict:
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        if use_teacher:
            if not isinstance(ckpt.get("teacher"), dict):
                raise KeyError("the checkpoint has no 'teacher' weights")
            return ckpt["teacher"]
        return ckpt["model"]
    if isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt  # a bare state dict
    raise ValueError("weights must be a gdseg checkpoint (with 'model') or a state dict")


def load_predictor(
    weights: str,
    config_file: str | None = None,
    device: str = "auto",
    use_teacher: bool = False,
    opts: Sequence[str] = (),
) -> tuple[torch.nn.Module, Any, dict]:
    """Builds the model of a checkpoint and loads its weights.

    The config is the checkpoint's own (``"config"``, YAML text) unless ``config_file`` is
    given; ``opts`` are ``KEY VALUE`` overrides. Class names come from the checkpoint's
    ``"metadata"`` (``thing_classes``, ``thing_dataset_id_to_contiguous_id``), else
    ``class_0..K-1``.

    Returns:
        (model in eval mode on the device, config, metadata).
    """
    from gdseg.config import get_cfg

    ckpt = torch.load(weights, map_location="cpu", weights_only=True)
    cfg = get_cfg()
    if config_file:
        cfg.merge_from_file(config_file)
    elif isinstance(ckpt, dict) and isinstance(ckpt.get("config"), str):
        cfg.merge_from_dict(yaml.safe_load(ckpt["config"]), source=f"{weights} (config)")
    else:
        raise ValueError(f"{weights} carries no config; pass --config-file")
    if opts:
        cfg.merge_from_list(list(opts))
    # All weights come from the checkpoint: do not load pretrained backbone files again.
    cfg.MODEL.WEIGHTS = ""
    model = _build_model(cfg)
    model.load_state_dict(_state_dict(ckpt, use_teacher))
    if device == "auto":  # the training run's MODEL.DEVICE says nothing about this machine
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    num_classes = int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    metadata = dict(ckpt.get("metadata") or {}) if isinstance(ckpt, dict) else {}
    names = list(metadata.get("thing_classes") or [])
    if len(names) != num_classes:
        if names:
            logger.warning("%d class names for %d classes: using class_i", len(names), num_classes)
        metadata["thing_classes"] = [f"class_{i}" for i in range(num_classes)]
    return model, cfg, metadata


def _overlay_names(files: list[str]) -> list[str]:
    """``<stem>.png`` per image, with a counter where two images share a stem."""
    names, seen = [], {}
    for f in files:
        stem = os.path.splitext(os.path.basename(f))[0]
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        names.append(f"{stem}.png" if n == 0 else f"{stem}_{n}.png")
    return names


def predict(
    weights: str,
    inputs: Sequence[str],
    out_dir: str,
    config_file: str | None = None,
    score_thresh: float = DEFAULT_SCORE_THRESH,
    max_detections: int = DEFAULT_MAX_DETECTIONS,
    device: str = "auto",
    use_teacher: bool = False,
    overlays: bool = True,
    opts: Sequence[str] = (),
) -> dict:
    """Predicts instances on images and writes predictions.json, images.json and overlays.

    Args:
        weights: a gdseg checkpoint.
        inputs: image files, folders or glob patterns.
        out_dir: output folder (created).
        config_file: overrides the config stored in the checkpoint.
        score_thresh: detections scoring below are dropped (see the module docstring).
        max_detections: at most this many detections per image, highest scores first.
        device: "auto", "cpu", "cuda", "cuda:1", ...
        use_teacher: use the checkpoint's teacher instead of its student.
        overlays: also write overlay PNGs.
        opts: ``KEY VALUE`` config overrides.

    Returns:
        ``{"num_images", "num_detections", "predictions", "images", "overlays"}`` (paths).
    """
    files = collect_inputs(inputs)
    model, cfg, metadata = load_predictor(weights, config_file, device, use_teacher, opts)
    class_names = metadata["thing_classes"]
    to_json = contiguous_to_dataset_ids(metadata)
    categories = [{"id": to_json.get(i, i), "name": n} for i, n in enumerate(class_names)]
    overlay_dir = os.path.join(out_dir, "overlays")
    images, results = [], []
    start = time.perf_counter()
    for image_id, (path, overlay_name) in enumerate(zip(files, _overlay_names(files)), 1):
        image, original = load_test_image(
            path, int(cfg.INPUT.MIN_SIZE_TEST), int(cfg.INPUT.MAX_SIZE_TEST)
        )
        height, width = original.shape[-2:]
        (res,) = predict_images(
            model,
            [image],
            [(height, width)],
            pixel_mean=cfg.MODEL.PIXEL_MEAN,
            pixel_std=cfg.MODEL.PIXEL_STD,
            size_divisibility=int(cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY),
            num_detections=max(int(cfg.TEST.DETECTIONS_PER_IMAGE), max_detections),
            score_thresh=score_thresh,
        )
        order = torch.argsort(res["scores"], descending=True)[:max_detections]
        res = {k: v[order] for k, v in res.items()}
        images.append({"id": image_id, "file_name": path, "height": height, "width": width})
        for label, score, rle in zip(res["labels"], res["scores"], encode_masks(res["masks"])):
            results.append(
                {
                    "image_id": image_id,
                    "file_name": path,
                    "category_id": categories[int(label)]["id"],
                    "category_name": class_names[int(label)],
                    "segmentation": rle,
                    "score": round(float(score), 5),
                    "bbox": [round(float(v), 2) for v in mask_util.toBbox(rle)],
                }
            )
        if overlays:
            drawn = draw_instances(
                original, res["masks"], res["labels"].tolist(), res["scores"].tolist(), class_names
            )
            save_image(drawn, os.path.join(overlay_dir, overlay_name))
        logger.info(
            "[%d/%d] %s: %d detections", image_id, len(files), path, int(res["scores"].numel())
        )
    pred_path = os.path.join(out_dir, "predictions.json")
    images_path = os.path.join(out_dir, "images.json")
    write_json(results, pred_path)
    write_json({"images": images, "annotations": [], "categories": categories}, images_path)
    logger.info(
        "%d detections on %d images in %.1f s -> %s",
        len(results),
        len(files),
        time.perf_counter() - start,
        out_dir,
    )
    return {
        "num_images": len(files),
        "num_detections": len(results),
        "predictions": pred_path,
        "images": images_path,
        "overlays": overlay_dir if overlays else None,
    }


def add_predict_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``gdseg predict``."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="images, folders or globs")
    parser.add_argument("--weights", required=True, help="gdseg checkpoint (.pth)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--config-file", default=None, help="config (default: the one stored in the checkpoint)"
    )
    parser.add_argument(
        "--score-thresh",
        type=float,
        default=DEFAULT_SCORE_THRESH,
        help="drop detections scoring below (default %(default)s; 0 keeps all)",
    )
    parser.add_argument(
        "--max-detections",
        type=int,
        default=DEFAULT_MAX_DETECTIONS,
        help="at most N detections per image (default %(default)s, the model's top-k)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--teacher", action="store_true", help="use the checkpoint's teacher")
    parser.add_argument("--no-overlays", action="store_true", help="skip the overlay PNGs")
    parser.add_argument(
        "--opts", nargs="*", default=[], metavar="KEY VALUE", help="config overrides"
    )


def predict_main(args: argparse.Namespace) -> int:
    """Runs ``gdseg predict`` from parsed arguments."""
    summary = predict(
        args.weights,
        args.inputs,
        args.out,
        config_file=args.config_file,
        score_thresh=args.score_thresh,
        max_detections=args.max_detections,
        device=args.device,
        use_teacher=args.teacher,
        overlays=not args.no_overlays,
        opts=args.opts,
    )
    print(
        f"{summary['num_detections']} detections on {summary['num_images']} images: "
        f"{summary['predictions']}"
    )
    return 0
