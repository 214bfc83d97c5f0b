"""``gdseg train`` / ``python train_net.py``: the published flags, one entry point.

``main(args)`` launches one process per device (or joins torchrun's), then each process:
reads the config, seeds, builds the student (and the teacher for guided distillation), the
data streams, the optimizer and the hooks, resumes if asked, and trains — or, with
``--eval-only``, evaluates ``MODEL.WEIGHTS`` (student and/or teacher per ``SSL.EVAL_WHO``).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import time

import numpy as np
import torch
from torch import nn

from gdseg.config import CfgNode, get_cfg
from gdseg.fileio import atomic_write_text

from . import distributed as comm
from .amp import build_precision
from .checkpoint import (
    Checkpointer,
    has_teacher,
    load_file,
    load_full_model,
    load_initial_weights,
    load_teacher_weights,
    set_rng_state,
)
from .hooks import EvalHook, LRScheduler, MetricsWriter, PeriodicCheckpointer, TeacherUpdate
from .host_memory import keep_freed_memory
from .launch import launch
from .optim import build_lr_scheduler, build_optimizer
from .trainer import Preprocess, SemisupSettings, Trainer

logger = logging.getLogger(__name__)

__all__ = [
    "add_train_args",
    "build_trainer",
    "evaluate_models",
    "evaluate_weights",
    "labeled_dataset",
    "main",
    "setup",
    "test_datasets",
    "unlabeled_dataset",
]

EVAL_WHO = ("STUDENT", "TEACHER", "BOTH")


def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The published ``train_net.py`` flags plus trailing ``KEY VALUE`` config overrides."""
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to a config")
    parser.add_argument(
        "--resume", action="store_true", help="continue from OUTPUT_DIR/last_checkpoint"
    )
    parser.add_argument(
        "--eval-only", action="store_true", help="evaluate MODEL.WEIGHTS (see SSL.EVAL_WHO)"
    )
    parser.add_argument(
        "--num-gpus", type=int, default=1, help="processes per machine (CPU processes without GPUs)"
    )
    parser.add_argument("--num-machines", type=int, default=1, help="total number of machines")
    parser.add_argument("--machine-rank", type=int, default=0, help="rank of this machine")
    parser.add_argument(
        "--dist-url",
        default="auto",
        help="rendezvous URL, e.g. tcp://HOST:PORT ('auto': a free local port, one machine)",
    )
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides as KEY VALUE pairs, e.g. SSL.TRAIN_SSL True OUTPUT_DIR out/x",
    )
    return parser


_SWITCHES = {"--resume": "resume", "--eval-only": "eval_only"}
_VALUED = {
    "--config-file": ("config_file", str),
    "--num-gpus": ("num_gpus", int),
    "--num-machines": ("num_machines", int),
    "--machine-rank": ("machine_rank", int),
    "--dist-url": ("dist_url", str),
}


def _flags_from_opts(args: argparse.Namespace) -> argparse.Namespace:
    """Take our flags back out of the trailing ``KEY VALUE`` list.

    ``opts`` swallows everything after the first KEY, so ``... OUTPUT_DIR o --eval-only`` would
    otherwise pass "--eval-only" as a config key. Config keys never start with "--".
    """
    opts, rest = list(args.opts or []), []
    while opts:
        item = opts.pop(0)
        name, eq, value = item.partition("=")
        if item in _SWITCHES:
            setattr(args, _SWITCHES[item], True)
        elif name in _VALUED:
            if not eq:
                if not opts:
                    raise SystemExit(f"gdseg train: {name} needs a value")
                value = opts.pop(0)
            attr, kind = _VALUED[name]
            setattr(args, attr, kind(value))
        elif item.startswith("--"):
            raise SystemExit(f"gdseg train: unknown flag {item!r} among the config overrides")
        else:
            rest.append(item)
    args.opts = rest
    return args


def main(args: argparse.Namespace) -> None:
    """Launch training (or evaluation) in every process."""
    args = _flags_from_opts(args)
    launch(
        _worker,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


def _worker(args: argparse.Namespace) -> None:
    cfg = setup(args)
    if args.eval_only:
        evaluate_weights(cfg)
        return
    trainer = build_trainer(cfg, resume=args.resume)
    trainer.train(trainer.start_iter, cfg.SOLVER.MAX_ITER)


# -- setup --------------------------------------------------------------------------------------
def setup(args: argparse.Namespace) -> CfgNode:
    """Config from file + overrides, seed, logging; rank 0 writes OUTPUT_DIR/config.yaml."""
    cfg = get_cfg()
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(list(args.opts or []))
    if cfg.SSL.EVAL_WHO not in EVAL_WHO:
        raise ValueError(f"SSL.EVAL_WHO must be one of {EVAL_WHO}; got {cfg.SSL.EVAL_WHO!r}.")
    if cfg.SEED < 0:  # time-based, shared by all processes, recorded in config.yaml
        cfg.SEED = int(comm.broadcast_object(int(time.time() * 1000) % (2**31)))
    cfg.freeze()
    _setup_logging(cfg.OUTPUT_DIR)
    if comm.is_main_process():
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        atomic_write_text(cfg.dump(), os.path.join(cfg.OUTPUT_DIR, "config.yaml"))
        logger.info("Config written to %s", os.path.join(cfg.OUTPUT_DIR, "config.yaml"))
    seed_all(cfg.SEED)
    torch.backends.cudnn.benchmark = bool(cfg.CUDNN_BENCHMARK)
    if cfg.KEEP_FREED_MEMORY:
        keep_freed_memory()
    return cfg


def seed_all(seed: int) -> None:
    """Seed torch, numpy and python ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _setup_logging(output_dir: str) -> None:
    """INFO on rank 0 (console + OUTPUT_DIR/log.txt), warnings only on other ranks."""
    root = logging.getLogger("gdseg")
    if not comm.is_main_process():
        root.setLevel(logging.WARNING)
        return
    root.setLevel(logging.INFO)
    fmt = logging.Formatter("[%(asctime)s %(name)s] %(message)s", datefmt="%m/%d %H:%M:%S")
    if not logging.getLogger().handlers and not root.handlers:
        console = logging.StreamHandler()
        console.setFormatter(fmt)
        root.addHandler(console)
    log_file = os.path.abspath(os.path.join(output_dir, "log.txt"))
    for h in list(root.handlers):  # one run, one log file (several runs in one process)
        if getattr(h, "_gdseg_run_log", False) and h.baseFilename != log_file:
            root.removeHandler(h)
            h.close()
    if not any(getattr(h, "baseFilename", None) == log_file for h in root.handlers):
        os.makedirs(output_dir, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        fh._gdseg_run_log = True
        root.addHandler(fh)


def resolve_device(cfg: CfgNode) -> torch.device:
    """``MODEL.DEVICE`` (auto: CUDA if present); with several GPUs, this process's one."""
    name = cfg.MODEL.DEVICE
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("MODEL.DEVICE cuda but no GPU is visible; use MODEL.DEVICE cpu.")
        return torch.device("cuda", comm.get_local_rank())
    return torch.device(name)


# -- building ------------------------------------------------------------------------------------
def build_student(cfg: CfgNode, device: torch.device, load_weights: bool = True) -> nn.Module:
    """A fresh model with ``MODEL.WEIGHTS`` (pretrained backbone or a full checkpoint).

    In stage 2 too: the student starts like a stage-1 model, NOT from the teacher.
    """
    from gdseg.modeling import build_model

    model = build_model(cfg)
    if load_weights:
        load_initial_weights(model, cfg.MODEL.WEIGHTS)
    return model.to(device)


def build_trainer(cfg: CfgNode, resume: bool = False) -> Trainer:
    """Everything the loop needs, from the config; restores the last checkpoint if ``resume``.

    The returned trainer has its hooks registered and ``start_iter`` set.
    """
    from gdseg.modeling import build_criterion

    device = resolve_device(cfg)
    checkpointer = Checkpointer(cfg.OUTPUT_DIR, save_to_disk=comm.is_main_process())
    resuming = resume and checkpointer.last_checkpoint() is not None  # weights come from it
    # Same seed for model creation on every process; then a per-process stream for the
    # point sampling of the losses.
    seed_all(cfg.SEED)
    student = build_student(cfg, device, load_weights=not resuming)
    teacher = None
    if cfg.SSL.TRAIN_SSL:
        teacher = _build_teacher(cfg, device, load_weights=not resuming)
    seed_all(cfg.SEED + comm.get_rank())

    optimizer = build_optimizer(cfg, student)
    scheduler = build_lr_scheduler(cfg, optimizer)
    model: nn.Module = student
    if comm.get_world_size() > 1:
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    labeled, unlabeled, class_metadata = build_training_streams(cfg)
    semisup = None
    if cfg.SSL.TRAIN_SSL:
        s = cfg.SSL
        semisup = SemisupSettings(
            burnin_iter=s.BURNIN_ITER,
            ema_decay=s.EMA_DECAY,
            freq=s.FREQ,
            unsup_loss_weight=s.UNSUP_LOSS_WEIGHT,
            class_threshold=s.CLASS_THRESHOLD,
            mask_threshold=s.MASK_THRESHOLD,
            min_mask_area=s.MIN_MASK_AREA,
        )
    clip = cfg.SOLVER.CLIP_GRADIENTS
    trainer = Trainer(
        model=model,
        criterion=build_criterion(cfg).to(device),
        optimizer=optimizer,
        labeled_loader=labeled,
        preprocess=Preprocess(
            cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY
        ),
        precision=build_precision(cfg, device),
        device=device,
        teacher=teacher,
        unlabeled_loader=unlabeled,
        semisup=semisup,
        scheduler=scheduler,
        clip=(clip.CLIP_TYPE, clip.CLIP_VALUE, clip.NORM_TYPE) if clip.ENABLED else None,
    )
    trainer.register_hooks(build_hooks(cfg, trainer, checkpointer, class_metadata))
    if resume:
        resume_from_last(trainer, checkpointer)
    return trainer


def _build_teacher(cfg: CfgNode, device: torch.device, load_weights: bool = True) -> nn.Module:
    """The frozen teacher from ``SSL.TEACHER_CKPT`` (eval mode, no gradients, never DDP)."""
    from gdseg.modeling import build_model

    teacher = build_model(cfg)
    if load_weights:
        if not cfg.SSL.TEACHER_CKPT:
            raise ValueError(
                "SSL.TRAIN_SSL True needs SSL.TEACHER_CKPT: the stage-1 checkpoint "
                "(e.g. out/teacher/model_final.pth) or imported published weights."
            )
        load_teacher_weights(teacher, cfg.SSL.TEACHER_CKPT)
    teacher.eval().requires_grad_(False)
    return teacher.to(device)


def build_hooks(
    cfg: CfgNode, trainer: Trainer, checkpointer: Checkpointer, class_metadata: dict | None = None
) -> list:
    """Teacher update, lr schedule, checkpoints, evaluation, metrics — in that order.

    Nothing after the checkpointer draws random numbers (inference is deterministic and its
    loader has a private generator), so a resumed run continues bit for bit.
    """
    hooks = []
    if trainer.semisup is not None:
        hooks.append(TeacherUpdate(cfg.SSL.BURNIN_ITER, cfg.SSL.EMA_DECAY))
    hooks.append(LRScheduler())
    # Checkpoints before evaluation: a failing evaluation must not cost model_final.pth.
    hooks.append(
        PeriodicCheckpointer(checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, cfg.dump(), class_metadata)
    )
    if cfg.DATASETS.TEST or cfg.DATASETS.TEST_JSON:
        models = _eval_models(cfg, trainer.model, trainer.teacher)
        hooks.append(EvalHook(cfg.TEST.EVAL_PERIOD, lambda: evaluate_models(cfg, models)))
    if comm.is_main_process():
        hooks.append(MetricsWriter(cfg.OUTPUT_DIR, cfg.SOLVER.LOG_PERIOD))
    return hooks


def resume_from_last(trainer: Trainer, checkpointer: Checkpointer) -> None:
    """Restore the full training state from ``OUTPUT_DIR/last_checkpoint`` if there is one."""
    path = checkpointer.last_checkpoint()
    if path is None:
        logger.info(
            "--resume: no checkpoint in %s; starting from scratch.", checkpointer.output_dir
        )
        return
    state = load_file(path)
    trainer.load_state_dict(state)
    per_rank = state.get("rng", {}).get("per_rank", [])
    if per_rank:
        rank = comm.get_rank()
        if len(per_rank) != comm.get_world_size():
            logger.warning(
                "RNG states saved by %d processes, resuming on %d.",
                len(per_rank),
                comm.get_world_size(),
            )
        set_rng_state(per_rank[rank % len(per_rank)])
    logger.info("Resumed from %s at iteration %d", path, trainer.start_iter)


# -- data ----------------------------------------------------------------------------------------
def labeled_dataset(cfg: CfgNode) -> tuple[list[dict], dict]:
    """Records and metadata of the labeled fraction (``SSL.PERCENTAGE``) of the training set."""
    from gdseg.data.catalog import build_labeled_dataset

    return build_labeled_dataset(cfg)


def unlabeled_dataset(cfg: CfgNode) -> list[dict]:
    """Unlabeled records (by default every training image, labels dropped, as published)."""
    from gdseg.data.catalog import build_unlabeled_dataset

    return build_unlabeled_dataset(cfg)[0]


def test_datasets(cfg: CfgNode) -> list[tuple[str, list[dict], dict]]:
    """``(name, records, metadata)`` of each evaluation dataset."""
    from gdseg.data.catalog import build_test_datasets

    return build_test_datasets(cfg)


def build_training_streams(cfg: CfgNode):
    """The labeled loader, for guided distillation the unlabeled one, and the class metadata
    (``thing_classes``, ``thing_dataset_id_to_contiguous_id``) stored in checkpoints."""
    from gdseg.data.loader import build_train_loader, build_unlabeled_loader

    records, metadata = labeled_dataset(cfg)
    logger.info("Labeled images: %d (SSL.PERCENTAGE %s)", len(records), cfg.SSL.PERCENTAGE)
    labeled = build_train_loader(cfg, records, metadata, seed=cfg.SEED)
    unlabeled = None
    if cfg.SSL.TRAIN_SSL:
        unlabeled_records = unlabeled_dataset(cfg)
        logger.info("Unlabeled images: %d", len(unlabeled_records))
        unlabeled = build_unlabeled_loader(cfg, unlabeled_records, seed=cfg.SEED)
    class_metadata = {
        k: metadata[k]
        for k in ("thing_classes", "thing_dataset_id_to_contiguous_id")
        if k in metadata
    }
    return labeled, unlabeled, class_metadata


# -- evaluation ----------------------------------------------------------------------------------
def _eval_models(cfg: CfgNode, student: nn.Module, teacher: nn.Module | None) -> dict:
    who = cfg.SSL.EVAL_WHO
    models = {}
    if who in ("STUDENT", "BOTH") or teacher is None:
        models["student"] = student
    if who in ("TEACHER", "BOTH") and teacher is not None:
        models["teacher"] = teacher
    return models


def evaluate_models(cfg: CfgNode, models: dict[str, nn.Module]) -> dict:
    """``{model: {dataset: {"segm": {...}}}}`` for every test dataset.

    Every process runs inference on its shard; rank 0 evaluates and writes
    ``OUTPUT_DIR/eval/<model>/<dataset>/metrics.json``; other ranks return ``{}`` entries.
    """
    from gdseg.data.loader import build_test_loader
    from gdseg.evaluation.coco import COCOEvaluator, eval_output_dir
    from gdseg.evaluation.inference import inference_on_dataset

    results: dict = {name: {} for name in models}
    for ds_name, records, metadata in test_datasets(cfg):
        loader = build_test_loader(cfg, records)
        for name, model in models.items():
            predictions = inference_on_dataset(
                model,
                loader,
                pixel_mean=cfg.MODEL.PIXEL_MEAN,
                pixel_std=cfg.MODEL.PIXEL_STD,
                size_divisibility=cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY,
                num_detections=cfg.TEST.DETECTIONS_PER_IMAGE,
                score_thresh=cfg.TEST.SCORE_THRESH,
                min_size=cfg.INPUT.MIN_SIZE_TEST,
                max_size=cfg.INPUT.MAX_SIZE_TEST,
            )
            if not comm.is_main_process():
                continue
            out_dir = eval_output_dir(cfg.OUTPUT_DIR, name, ds_name)
            kind = cfg.TEST.EVALUATOR
            if kind == "auto":
                kind = metadata.get("evaluator_type", "coco")
            if kind == "cityscapes":
                from gdseg.evaluation.cityscapes import CityscapesInstanceEvaluator

                evaluator = CityscapesInstanceEvaluator(ds_name, metadata, out_dir)
            else:
                evaluator = COCOEvaluator(
                    ds_name,
                    metadata,
                    out_dir,
                    records=records,
                    backend=cfg.TEST.COCO_EVAL_BACKEND,
                )
            results[name][ds_name] = evaluator.evaluate(predictions)
    comm.synchronize()
    return results


def evaluate_weights(cfg: CfgNode) -> dict:
    """``--eval-only``: load ``MODEL.WEIGHTS`` into the student (and teacher) and evaluate.

    ``SSL.EVAL_WHO`` TEACHER or BOTH needs a file holding a teacher (a gdseg stage-2
    checkpoint or a published Guided Distillation one).
    """
    from gdseg.modeling import build_model
    from gdseg.modeling.backbones import resolve_weights

    if not cfg.MODEL.WEIGHTS:
        raise ValueError("--eval-only needs MODEL.WEIGHTS (the checkpoint to evaluate).")
    path = resolve_weights(cfg.MODEL.WEIGHTS)
    device = resolve_device(cfg)
    who = cfg.SSL.EVAL_WHO
    roles = {"STUDENT": ["student"], "TEACHER": ["teacher"], "BOTH": ["student", "teacher"]}[who]
    if "teacher" in roles and not has_teacher(path):
        raise ValueError(
            f"SSL.EVAL_WHO {who} but {path} holds no teacher (only stage-2 checkpoints do); "
            "use SSL.EVAL_WHO STUDENT."
        )
    models = {}
    for role in roles:
        model = build_model(cfg)
        load_full_model(model, path, role)
        models[role] = model.to(device).eval()
    return evaluate_models(cfg, models)
