"""Cityscapes instance-segmentation AP through the official ``cityscapesscripts`` code.

Predictions are written in the benchmark's submission format (one text file per image with
``mask.png labelID score`` lines, one binary PNG per instance) to a temporary folder, and the
official matching and AP code of
``cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling`` runs on them with its
arguments set here (not through its module-global ``args`` or environment variables, and
without its ``matches.json`` side file in the working directory).

The ground truth of an image ``.../leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` is
``.../gtFine/<split>/<city>/<stem>_gtFine_instanceIds.png`` (or ``metadata["gt_dir"]/<city>/``).
Class names (``thing_classes``) must be Cityscapes label names (person, rider, car, ...).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from .coco import write_json

logger = logging.getLogger(__name__)

__all__ = ["CityscapesInstanceEvaluator", "gt_file_for_image"]

_IMAGE_SUFFIX = "_leftImg8bit"
_GT_SUFFIX = "_gtFine_instanceIds.png"


def gt_file_for_image(file_name: str, gt_dir: str | None = None) -> str:
    """The ``*_gtFine_instanceIds.png`` of a ``*_leftImg8bit.png`` image."""
    stem = os.path.splitext(os.path.basename(file_name))[0]
    if stem.endswith(_IMAGE_SUFFIX):
        stem = stem[: -len(_IMAGE_SUFFIX)]
    folder = os.path.dirname(os.path.abspath(file_name))
    if gt_dir:  # gtFine/<split>/<city>/, the city being the image's folder
        return os.path.join(gt_dir, os.path.basename(folder), stem + _GT_SUFFIX)
    parts = folder.split(os.sep)
    if "leftImg8bit" not in parts:
        raise ValueError(
            f"cannot find the Cityscapes ground truth of {file_name!r}: expected it under a "
            "'leftImg8bit' folder, or give metadata['gt_dir']"
        )
    i = len(parts) - 1 - parts[::-1].index("leftImg8bit")
    parts[i] = "gtFine"
    return os.path.join(os.sep.join(parts), stem + _GT_SUFFIX)


class _NumpyCompat:
    """numpy with ``in1d``, which numpy 2.4 removed and cityscapesscripts 2.x still calls."""

    def __getattr__(self, name: str):
        return getattr(np, name)

    @staticmethod
    def in1d(a, b, *args, **kwargs):
        return np.isin(np.ravel(a), b, *args, **kwargs)


@contextlib.contextmanager
def _official_module() -> Iterator:
    """The official evaluation module, with its output silenced and numpy patched if needed."""
    from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling as cs_eval

    saved = cs_eval.np
    if not hasattr(np, "in1d"):
        cs_eval.np = _NumpyCompat()  # restored below; affects only that module
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield cs_eval
    except SystemExit as e:  # its printError() calls sys.exit
        raise RuntimeError(f"cityscapesscripts evaluation failed (exit {e.code})") from None
    finally:
        cs_eval.np = saved


def _official_args(work_dir: str) -> SimpleNamespace:
    """The official script's parameters (its defaults), pointing into ``work_dir``."""
    return SimpleNamespace(
        overlaps=np.arange(0.5, 1.0, 0.05),
        minRegionSizes=np.array([100, 1000, 1000]),
        distanceThs=np.array([float("inf"), 100, 50]),
        distanceConfs=np.array([-float("inf"), 0.5, 0.5]),
        gtInstancesFile=os.path.join(work_dir, "gtInstances.json"),
        distanceAvailable=False,
        JSONOutput=False,
        quiet=True,
        csv=False,
        colorized=False,
        instLabels=[],
        predictionPath=os.path.abspath(work_dir),
        predictionWalk=None,
        exportFile=os.path.join(work_dir, "resultInstanceLevelSemanticLabeling.json"),
    )


class CityscapesInstanceEvaluator:
    """Cityscapes mask AP (AP over IoU .5:.95 and AP50, averaged over the 8 classes).

    Args:
        dataset_name: name used in logs.
        metadata: dataset metadata with ``thing_classes`` (Cityscapes label names) and
            optionally ``gt_dir`` (``gtFine/<split>``).
        output_dir: where ``metrics.json`` and the official per-class ``cityscapes_results.json``
            go; None writes nothing.
    """

    def __init__(self, dataset_name: str, metadata: dict, output_dir: str | None = None) -> None:
        from cityscapesscripts.helpers.labels import name2label

        self.dataset_name, self.metadata, self.output_dir = dataset_name, metadata, output_dir
        classes = list(metadata.get("thing_classes") or [])
        unknown = [c for c in classes if c not in name2label]
        if not classes or unknown:
            raise ValueError(
                f"thing_classes must be Cityscapes label names, got unknown {unknown or classes}"
            )
        self.label_ids = [name2label[c].id for c in classes]

    def _write_predictions(self, predictions: list[dict], work_dir: str) -> list[str]:
        txt_files = []
        for i, p in enumerate(predictions):
            lines = []
            for j, (label, score, rle) in enumerate(zip(p["labels"], p["scores"], p["rles"])):
                # Names without the image's own name: spaces would break the text format.
                png = f"{i:06d}_{j:03d}.png"
                mask = mask_util.decode(rle).astype(np.uint8) * 255
                Image.fromarray(mask).save(os.path.join(work_dir, png))
                lines.append(f"{png} {self.label_ids[int(label)]} {float(score):.6f}\n")
            txt = os.path.join(work_dir, f"{i:06d}_pred.txt")
            with open(txt, "w") as f:
                f.writelines(lines)
            txt_files.append(txt)
        return txt_files

    def evaluate(self, predictions: list[dict]) -> dict[str, dict[str, float]]:
        """Predictions of every image -> ``{"segm": {"AP", "AP50"}}`` in 0-100."""
        gt_dir = self.metadata.get("gt_dir")
        gt_files = [gt_file_for_image(p["file_name"], gt_dir) for p in predictions]
        missing = [f for f in gt_files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} Cityscapes ground-truth files are missing, e.g. {missing[0]}"
            )
        with tempfile.TemporaryDirectory(prefix="gdseg_cityscapes_") as work_dir:
            pred_files = self._write_predictions(predictions, work_dir)
            args = _official_args(work_dir)
            with _official_module() as cs:
                cs.setInstanceLabels(args)
                gt_instances = cs.getGtInstances(gt_files, args)
                matches = cs.matchGtWithPreds(pred_files, gt_files, gt_instances, args)
                aps = cs.evaluateMatches(matches, args)
                averages = cs.computeAverages(aps, args)
                details = cs.prepareJSONDataForResults(averages, aps, args)
        metrics = {
            "segm": {
                "AP": float(averages["allAp"]) * 100,
                "AP50": float(averages["allAp50%"]) * 100,
            }
        }
        per_class = {
            name: {"AP": float(v["ap"]) * 100, "AP50": float(v["ap50%"]) * 100}
            for name, v in averages["classes"].items()
        }
        logger.info(
            "%s: AP %.2f, AP50 %.2f; per class AP: %s",
            self.dataset_name,
            metrics["segm"]["AP"],
            metrics["segm"]["AP50"],
            ", ".join(f"{k} {v['AP']:.1f}" for k, v in per_class.items()),
        )
        if self.output_dir:
            write_json(metrics, os.path.join(self.output_dir, "metrics.json"))
            write_json(details, os.path.join(self.output_dir, "cityscapes_results.json"))
        return metrics
