"""Evaluation: run a model over a dataset (:mod:`.inference`), COCO mask AP (:mod:`.coco`),
Cityscapes mask AP through cityscapesscripts (:mod:`.cityscapes`, imported on demand because
cityscapesscripts is an optional dependency)."""

from .coco import COCOEvaluator, eval_output_dir, evaluate_coco_results, evaluate_main
from .inference import inference_on_dataset, predictions_to_coco_results

__all__ = [
    "COCOEvaluator",
    "eval_output_dir",
    "evaluate_coco_results",
    "evaluate_main",
    "inference_on_dataset",
    "predictions_to_coco_results",
]
