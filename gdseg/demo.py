"""``gdseg demo``: the gain from unlabeled images, end to end, on a CPU, with no downloads.

1. Generates the synthetic shapes dataset (``gdseg.data.synthetic``) and picks the labeled
   fraction ``SSL.PERCENTAGE`` of its training images with the run's seed.
2. Stage 1: trains the teacher on the labeled images only (``SSL.TRAIN_SSL False``). This is
   also the supervised-only baseline.
3. Stage 2: guided distillation (SPEC §2): a fresh student, the stage-1 teacher, a guided
   burn-in, then EMA; every training image is an unlabeled image (labels dropped).
4. Evaluates both on the synthetic validation set (COCO mask AP), writes ``results.json``,
   plots and overlay pictures, and prints the comparison table.

Both stages use the same architecture, the same number of iterations, the same labeled batches
and schedule and the same evaluation; stage 2 only adds the unlabeled images. The real trainer
runs in this process (:func:`gdseg.engine.train.build_trainer`). Settings: ``configs/demo/demo.yaml``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from collections.abc import Sequence

import torch

from gdseg.model_zoo import get_config_file

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_CONFIG", "add_demo_args", "format_table", "main", "run_demo", "train_stage"]

DEFAULT_CONFIG = "demo/demo.yaml"
METRICS = ("AP", "AP50", "AP75")
STAGES = ("supervised", "guided_distillation")


def add_demo_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``gdseg demo [--out DIR] [--seed S] [--config-file F] [KEY VALUE ...]``."""
    parser.add_argument("--out", default="output/demo", help="output folder (default %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=0, help="training seed and labeled-split seed (default 0)"
    )
    parser.add_argument(
        "--config-file",
        default=DEFAULT_CONFIG,
        help="demo config, a path or a shipped name (default %(default)s)",
    )
    parser.add_argument(
        "--overlays", type=int, default=4, help="validation images to draw (default 4)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default 0: torch's choice; 1 is faster on a busy machine)",
    )
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides for both stages, e.g. SSL.PERCENTAGE 5 SOLVER.MAX_ITER 100",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    """Runs the demo and prints its table."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)  # this process is the demo's own
    results = run_demo(
        args.out,
        seed=args.seed,
        config_file=args.config_file,
        opts=list(args.opts or []),
        num_overlays=args.overlays,
    )
    print(format_table(results))  # the demo's answer, on stdout
    print(f"\nResults, plots and overlays: {os.path.abspath(args.out)}")
    return 0


def _config_path(config_file: str) -> str:
    return config_file if os.path.isfile(config_file) else get_config_file(config_file)


class _Clock:
    """Wall and process CPU time (all threads) since creation."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> dict[str, float]:
        return {
            "wall_s": round(time.perf_counter() - self.wall, 2),
            "cpu_s": round(time.process_time() - self.cpu, 2),
        }


def train_stage(config_file: str, opts: Sequence[str]):
    """Trains one stage in this process with the real engine.

    Args:
        config_file: config path.
        opts: ``KEY VALUE`` overrides (``OUTPUT_DIR`` among them).

    Returns:
        (frozen config, the finished trainer, ``{"wall_s", "cpu_s"}``). The trainer's
        ``eval_results[-1]`` holds the final evaluation.
    """
    from gdseg.engine.train import build_trainer, setup

    clock = _Clock()
    root = logging.getLogger("gdseg")
    handlers = list(root.handlers)
    try:
        cfg = setup(argparse.Namespace(config_file=config_file, opts=list(opts)))
        trainer = build_trainer(cfg)
        trainer.train(trainer.start_iter, cfg.SOLVER.MAX_ITER)
    finally:
        for h in [h for h in root.handlers if h not in handlers]:  # this stage's log.txt
            root.removeHandler(h)
            h.close()
    return cfg, trainer, clock.read()


def final_metrics(trainer, model: str = "student") -> dict[str, float]:
    """``{"AP", "AP50", ...}`` of ``model`` at the trainer's last evaluation (first dataset)."""
    if not trainer.eval_results:
        raise RuntimeError("the stage ran no evaluation (DATASETS.TEST is empty?)")
    per_dataset = trainer.eval_results[-1][1].get(model) or {}
    if not per_dataset:
        raise RuntimeError(f"no final evaluation of the {model}")
    return dict(next(iter(per_dataset.values()))["segm"])


def _settings(cfg, seed: int, config_file: str, opts: Sequence[str], counts: dict) -> dict:
    s, m = cfg.SSL, cfg.MODEL
    return {
        "seed": seed,
        "config_file": config_file,
        "overrides": list(opts),
        "labeled_percentage": float(s.PERCENTAGE),
        **counts,
        "image_size": int(cfg.INPUT.IMAGE_SIZE),
        "backbone": m.BACKBONE.NAME,
        "backbone_weights": m.WEIGHTS or "none (random init)",
        "hidden_dim": int(m.MASK_FORMER.HIDDEN_DIM),
        "num_queries": int(m.MASK_FORMER.NUM_OBJECT_QUERIES),
        "decoder_layers": int(m.MASK_FORMER.DEC_LAYERS) - 1,
        "iterations_per_stage": int(cfg.SOLVER.MAX_ITER),
        "ims_per_batch": int(cfg.SOLVER.IMS_PER_BATCH),
        "ims_per_batch_unlabeled": int(s.IMS_PER_BATCH_UNLABELED),
        "base_lr": float(cfg.SOLVER.BASE_LR),
        "lr_steps": list(cfg.SOLVER.STEPS),
        "burnin_iter": int(s.BURNIN_ITER),
        "ema_decay": float(s.EMA_DECAY),
        "class_threshold": float(s.CLASS_THRESHOLD),
        "mask_threshold": float(s.MASK_THRESHOLD),
        "min_mask_area": float(s.MIN_MASK_AREA),
        "unsup_loss_weight": float(s.UNSUP_LOSS_WEIGHT),
        "eval_period": int(cfg.TEST.EVAL_PERIOD),
        "device": str(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        if m.DEVICE == "auto"
        else m.DEVICE,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
    }


def _prepare_data(config_file: str, opts: Sequence[str]) -> tuple[dict, list[dict], dict]:
    """Generates the data once; returns counts, validation records, metadata."""
    from gdseg.config import get_cfg
    from gdseg.engine.train import labeled_dataset, test_datasets, unlabeled_dataset

    cfg = get_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if cfg.MODEL.WEIGHTS:  # fail before minutes of work, saying how to get the file
        from gdseg.modeling.backbones.weights import resolve_weights

        resolve_weights(cfg.MODEL.WEIGHTS)
    labeled, metadata = labeled_dataset(cfg)
    unlabeled = unlabeled_dataset(cfg)
    _, val, _ = test_datasets(cfg)[0]
    counts = {
        "num_labeled": len(labeled),
        "num_unlabeled": len(unlabeled),
        "num_val": len(val),
        "labeled_instances_per_image": round(
            sum(len(r["annotations"]) for r in labeled) / max(1, len(labeled)), 3
        ),
    }
    return counts, val, metadata


def run_demo(
    out_dir: str,
    seed: int = 0,
    config_file: str = DEFAULT_CONFIG,
    opts: Sequence[str] = (),
    num_overlays: int = 4,
) -> dict:
    """Teacher on the labeled fraction, then guided distillation; evaluation, plots, overlays.

    Args:
        out_dir: output folder: ``supervised/`` and ``guided_distillation/`` (each a normal
            training output folder with checkpoints, metrics.jsonl, eval/), ``results.json``,
            ``plots/``, ``overlays/``.
        seed: ``SEED`` and ``SSL.SPLIT_SEED`` (which images are labeled).
        config_file: a config path or a shipped config name.
        opts: ``KEY VALUE`` overrides applied to both stages.
        num_overlays: validation images drawn with both models' predictions.

    Returns:
        The content of ``results.json``.
    """
    total = _Clock()
    config_file = _config_path(config_file)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    common = [*opts, "SEED", str(seed), "SSL.SPLIT_SEED", str(seed)]
    dirs = {s: os.path.join(out_dir, s) for s in STAGES}

    clock = _Clock()
    logger.info("[demo] Preparing the synthetic dataset and the labeled split (seed %d)", seed)
    counts, val_records, metadata = _prepare_data(config_file, common)
    timings = {"data": clock.read()}
    logger.info(
        "[demo] %d labeled training images, %d unlabeled, %d validation images",
        counts["num_labeled"],
        counts["num_unlabeled"],
        counts["num_val"],
    )

    logger.info("[demo] Stage 1/2: supervised teacher on the labeled images only")
    cfg1, trainer1, timings["supervised"] = train_stage(
        config_file, [*common, "SSL.TRAIN_SSL", "False", "OUTPUT_DIR", dirs["supervised"]]
    )
    teacher_ckpt = os.path.join(dirs["supervised"], "model_final.pth")
    logger.info("[demo] Stage 2/2: guided distillation, teacher %s", teacher_ckpt)
    cfg2, trainer2, timings["guided_distillation"] = train_stage(
        config_file,
        [
            *common,
            "SSL.TRAIN_SSL", "True",
            "SSL.TEACHER_CKPT", teacher_ckpt,
            "SSL.EVAL_WHO", "BOTH",
            "OUTPUT_DIR", dirs["guided_distillation"],
        ],
    )  # fmt: skip

    clock = _Clock()
    results = {
        "supervised": {"segm": final_metrics(trainer1)},
        "guided_distillation": {"segm": final_metrics(trainer2)},
        "guided_distillation_teacher": {"segm": final_metrics(trainer2, "teacher")},
    }
    sup, gd = results["supervised"]["segm"], results["guided_distillation"]["segm"]
    results["gain"] = {k: round(gd[k] - sup[k], 3) for k in METRICS}
    results["settings"] = _settings(cfg2, seed, config_file, opts, counts)
    results["pseudo_labels_per_image"] = _pseudo_label_summary(dirs["guided_distillation"])
    results["files"] = {
        "teacher_checkpoint": teacher_ckpt,
        "student_checkpoint": os.path.join(dirs["guided_distillation"], "model_final.pth"),
        "plots": _plots(out_dir, dirs, int(cfg2.SSL.BURNIN_ITER), counts),
        "overlays": _overlays(out_dir, dirs, val_records[:num_overlays], metadata),
    }
    timings["plots_and_overlays"] = clock.read()
    timings["total"] = total.read()
    results["timings"] = timings
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    logger.info("[demo] Done in %.0f s: %s", timings["total"]["wall_s"], out_dir)
    return results


def _pseudo_label_summary(stage2_dir: str) -> dict:
    from gdseg.plots import read_metrics

    windows, _ = read_metrics(os.path.join(stage2_dir, "metrics.jsonl"))
    values = [w["pseudo_labels_per_image"] for w in windows if "pseudo_labels_per_image" in w]
    if not values:
        return {}
    return {"first_window": round(values[0], 3), "last_window": round(values[-1], 3)}


def _plots(out_dir: str, dirs: dict, burnin_iter: int, counts: dict) -> list[str]:
    from gdseg.plots import plot_ap_curves, plot_pseudo_labels, plot_training_curves, read_metrics

    s1, e1 = read_metrics(os.path.join(dirs["supervised"], "metrics.jsonl"))
    s2, e2 = read_metrics(os.path.join(dirs["guided_distillation"], "metrics.jsonl"))
    plots = os.path.join(out_dir, "plots")
    return [
        plot_training_curves(s1, s2, burnin_iter, os.path.join(plots, "training_curves.png")),
        plot_ap_curves(e1, e2, burnin_iter, os.path.join(plots, "ap_over_iterations.png")),
        plot_pseudo_labels(
            s2,
            burnin_iter,
            os.path.join(plots, "pseudo_labels.png"),
            gt_per_image=counts.get("labeled_instances_per_image"),
        ),
    ]


def _overlays(out_dir: str, dirs: dict, records: list[dict], metadata: dict) -> list[str]:
    """One picture per image: ground truth | supervised only | guided distillation."""
    from gdseg.data.mapper import decode_instances
    from gdseg.evaluation.inference import load_test_image, predict_images
    from gdseg.predict import DEFAULT_SCORE_THRESH, load_predictor
    from gdseg.visualize import save_image

    if not records:
        return []
    names = list(metadata["thing_classes"])
    models = [
        load_predictor(os.path.join(dirs[s], "model_final.pth"), device="cpu")[:2] for s in STAGES
    ]
    cfg = models[0][1]
    paths = []
    for record in records:
        image, original = load_test_image(
            record["file_name"], int(cfg.INPUT.MIN_SIZE_TEST), int(cfg.INPUT.MAX_SIZE_TEST)
        )
        h, w = original.shape[-2:]
        scale = max(1, -(-256 // min(h, w)))  # draw at >= 256 px so captions stay readable
        big = original.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        labels, masks = decode_instances(record, h, w)
        panels = [_draw(big, masks, labels.tolist(), [1.0] * len(labels), names, scale)]
        for model, mcfg in models:
            (pred,) = predict_images(
                model,
                [image],
                [(h, w)],
                pixel_mean=mcfg.MODEL.PIXEL_MEAN,
                pixel_std=mcfg.MODEL.PIXEL_STD,
                size_divisibility=int(mcfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY),
                num_detections=int(mcfg.TEST.DETECTIONS_PER_IMAGE),
                score_thresh=DEFAULT_SCORE_THRESH,
            )
            panels.append(
                _draw(big, pred["masks"], pred["labels"].tolist(), pred["scores"].tolist(), names,
                      scale)
            )  # fmt: skip
        titles = ["ground truth", "supervised only", "guided distillation"]
        path = os.path.join(out_dir, "overlays", f"val_{int(record['image_id']):06d}.png")
        save_image(_side_by_side(panels, titles), path)
        paths.append(path)
    return paths


def _draw(image, masks, labels, scores, names, scale: int):
    from gdseg.visualize import draw_instances

    if scale > 1 and masks.numel():
        masks = masks.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return draw_instances(image, masks, labels, scores, names)


def _side_by_side(panels: list[torch.Tensor], titles: list[str]) -> torch.Tensor:
    """Panels [3, H, W] in a row, a white gap between, a title strip on top."""
    import numpy as np
    from PIL import Image, ImageDraw

    gap, strip = 8, 18
    h, w = panels[0].shape[-2:]
    canvas = Image.new("RGB", (len(panels) * w + (len(panels) - 1) * gap, h + strip), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (panel, title) in enumerate(zip(panels, titles)):
        x = i * (w + gap)
        canvas.paste(Image.fromarray(panel.permute(1, 2, 0).numpy()), (x, strip))
        draw.text((x + 4, 3), title, fill="black")
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)


def format_table(results: dict) -> str:
    """The comparison table printed at the end of the demo."""
    s, t = results["settings"], results["timings"]
    rows = [
        ("supervised only (stage 1)", results["supervised"]["segm"], t["supervised"]),
        ("guided distillation (stage 2)", results["guided_distillation"]["segm"],
         t["guided_distillation"]),
    ]  # fmt: skip
    lines = [
        f"Guided Distillation demo, seed {s['seed']}: {s['labeled_percentage']:g} % labels = "
        f"{s['num_labeled']} labeled images, {s['num_unlabeled']} unlabeled images, "
        f"{s['num_val']} validation images, {s['iterations_per_stage']} iterations per stage",
        "",
        f"{'model':<32}{'AP':>7}{'AP50':>7}{'AP75':>7}{'wall s':>9}{'CPU s':>9}",
    ]
    for name, m, tm in rows:
        vals = "".join(f"{m[k]:>7.1f}" for k in METRICS)
        lines.append(f"{name:<32}{vals}{tm['wall_s']:>9.0f}{tm['cpu_s']:>9.0f}")
    gain = "".join(f"{results['gain'][k]:>+7.1f}" for k in METRICS)
    lines.append(f"{'gain from unlabeled images':<32}{gain}")
    lines.append(
        f"\ntotal {t['total']['wall_s']:.0f} s wall, {t['total']['cpu_s']:.0f} s CPU "
        f"(data {t['data']['wall_s']:.0f} s, plots+overlays {t['plots_and_overlays']['wall_s']:.0f} s)"
    )
    return "\n".join(lines)
