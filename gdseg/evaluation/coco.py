"""COCO mask AP: the evaluator used during training and by ``gdseg evaluate``.

Two backends compute the same COCO protocol: ``pycocotools`` (the reference implementation)
and ``faster_coco_eval`` (a C++ re-implementation of COCOeval's evaluate/accumulate). On our
tests (non-contiguous category ids, polygons, crowd regions, perturbed masks and scores, images
without detections) and on real COCO val2017 annotations they give the same six numbers to
1e-6, see ``tests/evaluation/test_coco.py``. The default is ``faster_coco_eval`` because it
is several times faster at the same numbers: 4.7 s against 15.9 s for 200 COCO val images with
100 masks each (2-core CPU), i.e. minutes saved per COCO val evaluation, paid at every
``TEST.EVAL_PERIOD`` during training. ``backend="pycocotools"`` (``--backend`` on the command
line) gives the reference implementation when in doubt.

Conventions (the detectron2 ones, under which Mask2Former's numbers are published):
- Results are evaluated without their ``bbox`` field. With a ``bbox`` present, COCO's
  ``loadRes`` takes the BOX area as the detection's area, which changes what counts as
  small/medium/large; without it, the mask area is used.
- Crowd regions (``iscrowd: 1`` in the ground truth) are matched as crowd: detections on them
  are ignored, never counted as false positives, and crowds are never missed detections.
- AP values are in 0-100; a value COCOeval reports as -1 (no ground truth in that area range)
  is NaN here and ``null`` in the written json. No detections at all gives zeros.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pycocotools.mask as mask_util

from .inference import contiguous_to_dataset_ids, predictions_to_coco_results

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "COCOEvaluator",
    "DEFAULT_BACKEND",
    "METRICS",
    "add_evaluate_args",
    "coco_gt_from_records",
    "evaluate_cli_main",
    "evaluate_coco_results",
    "evaluate_main",
    "eval_output_dir",
    "write_json",
]

BACKENDS = ("faster_coco_eval", "pycocotools")
DEFAULT_BACKEND = "faster_coco_eval"
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Writes json atomically (temporary file, then rename); NaN becomes null."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(clean(obj), f)
    os.replace(tmp, path)


def eval_output_dir(output_dir: str, model_name: str, dataset_name: str) -> str:
    """``OUTPUT_DIR/eval/<model>/<dataset>``, where metrics.json and the results go.

    A dataset given by its json path (``DATASETS.TEST_JSON``) gets the json's stem as folder
    name: joining an absolute path would write beside the user's json instead.
    """
    if "/" in dataset_name or os.sep in dataset_name or dataset_name.endswith(".json"):
        dataset_name = os.path.splitext(os.path.basename(dataset_name.rstrip("/" + os.sep)))[0]
    return os.path.join(output_dir, "eval", model_name, dataset_name)


def _api(backend: str) -> tuple[type, type]:
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    raise ValueError(f"unknown COCO evaluation backend {backend!r}; choose one of {BACKENDS}")


def _load_gt(gt: str | os.PathLike | dict, backend: str) -> Any:
    coco_cls, _ = _api(backend)
    data = gt
    if not isinstance(gt, dict):
        with open(gt) as f:
            data = json.load(f)
    data = dict(data)
    data.setdefault("info", {})  # pycocotools' loadRes copies it
    data.setdefault("annotations", [])
    with contextlib.redirect_stdout(io.StringIO()):
        coco = coco_cls()
        coco.dataset = data
        coco.createIndex()
    return coco


def _load_results(results: str | os.PathLike | list[dict]) -> list[dict]:
    if not isinstance(results, list):
        with open(results) as f:
            results = json.load(f)
        if not isinstance(results, list):
            raise ValueError(f"{results!r}: a COCO results file is a json list of detections")
    # loadRes writes into the dicts (area, id, iscrowd); work on copies, without the box
    # (see the module docstring: the mask area must define small/medium/large).
    return [{k: copy.deepcopy(v) for k, v in r.items() if k != "bbox"} for r in results]


def _empty_metrics() -> dict[str, float]:
    return dict.fromkeys(METRICS, 0.0)


def evaluate_coco_results(
    gt_json: str | os.PathLike | dict,
    results: str | os.PathLike | list[dict],
    *,
    img_ids: Sequence[int] | None = None,
    backend: str = DEFAULT_BACKEND,
) -> dict[str, dict[str, float]]:
    """COCO mask AP of a results list/file against a COCO ground-truth json.

    Args:
        gt_json: ground truth (path or loaded dict) with images, annotations (``iscrowd``)
            and categories; category ids may be any integers.
        results: COCO results (path or list) with ``image_id``, ``category_id`` (json ids),
            ``segmentation`` (compressed RLE) and ``score``.
        img_ids: evaluate only these images (default: every image of the ground truth).
        backend: ``faster_coco_eval`` or ``pycocotools``.

    Returns:
        ``{"segm": {"AP", "AP50", "AP75", "APs", "APm", "APl"}}`` in 0-100.
    """
    _, eval_cls = _api(backend)
    coco_gt = _load_gt(gt_json, backend)
    dets = _load_results(results)
    gt_images = set(coco_gt.getImgIds())
    unknown = {d["image_id"] for d in dets} - gt_images
    if unknown:
        raise ValueError(
            f"{len(unknown)} result image ids are not in the ground truth "
            f"(e.g. {sorted(unknown)[:5]}); results and annotations must come from the same "
            "images"
        )
    if img_ids is not None:
        keep = set(img_ids)
        dets = [d for d in dets if d["image_id"] in keep]
    if not dets:
        logger.warning("No detections to evaluate: all AP are 0")
        return {"segm": _empty_metrics()}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        coco_dt = coco_gt.loadRes(dets)
        kwargs = (
            {"print_function": lambda s: log.write(f"{s}\n")}
            if backend == "faster_coco_eval"
            else {}
        )
        coco_eval = eval_cls(coco_gt, coco_dt, "segm", **kwargs)
        if img_ids is not None:
            coco_eval.params.imgIds = sorted(set(img_ids) & gt_images)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    logger.info("COCO mask evaluation (%s):\n%s", backend, log.getvalue().strip())
    stats = np.asarray(coco_eval.stats[: len(METRICS)], dtype=np.float64)
    return {"segm": {k: float(v * 100) if v >= 0 else float("nan") for k, v in zip(METRICS, stats)}}


def coco_gt_from_records(records: list[dict], metadata: dict | None) -> dict:
    """A COCO ground-truth dict built from dataset records (for datasets without a json).

    Contiguous record category ids are mapped to the metadata's json ids (identity when
    absent), crowd flags are kept, and annotation ids are renumbered from 1 (COCOeval treats
    an id of 0 as "unmatched").
    """
    from gdseg.data.validation import segmentation_to_rle

    to_json = contiguous_to_dataset_ids(metadata)
    names = list((metadata or {}).get("thing_classes") or [])
    used = {a["category_id"] for r in records for a in r.get("annotations", [])}
    contiguous = sorted(set(range(len(names))) | used)
    categories = [
        {"id": to_json.get(c, c), "name": names[c] if c < len(names) else f"class_{c}"}
        for c in contiguous
    ]
    images, annotations = [], []
    for r in records:
        h, w = int(r["height"]), int(r["width"])
        images.append({"id": r["image_id"], "height": h, "width": w, "file_name": r["file_name"]})
        for a in r.get("annotations", []):
            rle = segmentation_to_rle(a["segmentation"], h, w)
            counts = rle["counts"]
            if isinstance(counts, bytes):
                rle = {"size": rle["size"], "counts": counts.decode("ascii")}
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": r["image_id"],
                    "category_id": to_json.get(a["category_id"], a["category_id"]),
                    "segmentation": rle,
                    "area": float(mask_util.area(rle)),
                    "bbox": [float(v) for v in a.get("bbox", mask_util.toBbox(rle))],
                    "iscrowd": int(a.get("iscrowd", 0)),
                }
            )
    return {"images": images, "annotations": annotations, "categories": categories}


class COCOEvaluator:
    """Mask AP of per-image predictions (see :mod:`gdseg.evaluation.inference`).

    The ground truth is ``metadata["json_file"]`` when there is one (the official json, crowd
    regions included), else it is built from ``records``. Only the predicted images are
    evaluated, so a subset of a dataset gives that subset's AP.

    Args:
        dataset_name: name used in logs.
        metadata: dataset metadata (``thing_dataset_id_to_contiguous_id``, ``json_file``,
            ``thing_classes``).
        output_dir: where ``coco_instances_results.json`` and ``metrics.json`` are written
            (e.g. :func:`eval_output_dir`); None writes nothing.
        records: dataset records, needed only when the metadata has no json file.
        backend: ``faster_coco_eval`` or ``pycocotools``.
    """

    def __init__(
        self,
        dataset_name: str,
        metadata: dict,
        output_dir: str | None = None,
        records: list[dict] | None = None,
        backend: str = DEFAULT_BACKEND,
    ) -> None:
        _api(backend)  # fail early on a bad name
        self.dataset_name, self.metadata = dataset_name, metadata
        self.output_dir, self.records, self.backend = output_dir, records, backend

    def _ground_truth(self) -> str | dict:
        json_file = self.metadata.get("json_file")
        if json_file:
            return json_file
        if self.records is None:
            raise ValueError(
                f"dataset {self.dataset_name!r} has no json_file in its metadata; give the "
                "evaluator its records to build the ground truth from"
            )
        return coco_gt_from_records(self.records, self.metadata)

    def evaluate(self, predictions: list[dict]) -> dict[str, dict[str, float]]:
        """Predictions of every image -> ``{"segm": {AP, AP50, AP75, APs, APm, APl}}``."""
        results = predictions_to_coco_results(predictions, self.metadata)
        if self.output_dir:
            write_json(results, os.path.join(self.output_dir, "coco_instances_results.json"))
        img_ids = [p["image_id"] for p in predictions]
        metrics = evaluate_coco_results(
            self._ground_truth(), results, img_ids=img_ids, backend=self.backend
        )
        logger.info(
            "%s: %s",
            self.dataset_name,
            ", ".join(f"{k} {v:.2f}" for k, v in metrics["segm"].items()),
        )
        if self.output_dir:
            write_json(metrics, os.path.join(self.output_dir, "metrics.json"))
        return metrics


def evaluate_main(
    annotations: str | os.PathLike,
    results: str | os.PathLike,
    out: str | os.PathLike | None = None,
    backend: str = DEFAULT_BACKEND,
) -> dict[str, dict[str, float]]:
    """``gdseg evaluate``: mask AP of a COCO results file, optionally written to ``out``."""
    metrics = evaluate_coco_results(annotations, results, backend=backend)
    if out:
        write_json(metrics, out)
    return metrics


def add_evaluate_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``gdseg evaluate``."""
    parser.add_argument("--annotations", required=True, help="COCO ground-truth json")
    parser.add_argument(
        "--results",
        required=True,
        help="COCO results json (image_id, category_id, RLE segmentation, score); a bbox "
        "field is ignored so that small/medium/large use the mask area",
    )
    parser.add_argument("--out", default=None, help="write the metrics json here")
    parser.add_argument(
        "--backend", default=DEFAULT_BACKEND, choices=BACKENDS, help="COCOeval implementation"
    )


def evaluate_cli_main(args: argparse.Namespace) -> int:
    """Runs ``gdseg evaluate`` from parsed arguments and prints the six numbers."""
    metrics = evaluate_main(args.annotations, args.results, args.out, backend=args.backend)
    segm = metrics["segm"]
    print("  ".join(f"{k:>6}" for k in segm))
    print("  ".join(f"{v:6.2f}" for v in segm.values()))
    return 0
