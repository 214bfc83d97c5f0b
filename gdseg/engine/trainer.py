"""The one training loop: supervised teacher pretraining and guided distillation.

Read top to bottom: :class:`TrainerBase` is the loop with hooks (detectron2's ``train_loop``);
:class:`Trainer` adds one iteration of the method (SPEC §2) in :meth:`Trainer.run_step`.
Everything around the step (lr schedule, teacher copy/EMA, checkpoints, evaluation, metrics)
is a hook in :mod:`gdseg.engine.hooks`. The phases are not separate trainers:

- ``supervised``  — ``SSL.TRAIN_SSL False``: labeled batches only;
- ``burn_in``     — semi-supervised, ``iter < BURNIN_ITER``: the teacher is the fixed stage-1 model;
- ``ema``         — semi-supervised, ``iter >= BURNIN_ITER``: the teacher follows the student.

All training state (iteration, optimizer, scaler, loader positions) lives here, never in the
model: the model maps images to predictions and knows nothing about phases or losses.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gdseg.modeling.preprocess import batch_images, pad_targets
from gdseg.semisup.pseudo_labels import make_pseudo_labels

from . import distributed as comm
from .amp import Precision
from .optim import clip_gradients

logger = logging.getLogger(__name__)

LossDict = dict[str, torch.Tensor]


class HookBase:
    """Something done around every iteration. ``self.trainer`` is set on registration.

    ``before_step`` runs before each iteration and must stay cheap.
    """

    trainer: TrainerBase

    def before_train(self) -> None: ...

    def after_train(self) -> None: ...

    def before_step(self) -> None: ...

    def after_step(self) -> None: ...


class TrainerBase:
    """``for iter in range(start, max): before_step; run_step; after_step`` with hooks.

    Attributes:
        iter: the current iteration (0-based); equals ``max_iter`` after a finished run.
        completed: True once the last iteration finished without an exception; hooks use it to
            skip final work (``model_final.pth``, final evaluation) after a failure.
    """

    def __init__(self) -> None:
        self._hooks: list[HookBase] = []
        self.iter = 0
        self.start_iter = 0
        self.max_iter = 0
        self.completed = False
        self.eval_results: list[tuple[int, dict]] = []  # (iteration, results) from EvalHook

    def register_hooks(self, hooks: Iterable[HookBase | None]) -> None:
        for h in hooks:
            if h is not None:
                h.trainer = self
                self._hooks.append(h)

    def train(self, start_iter: int, max_iter: int) -> None:
        logger.info("Starting training from iteration %d to %d", start_iter, max_iter)
        self.iter = self.start_iter = start_iter
        self.max_iter = max_iter
        self.completed = False
        try:
            for h in self._hooks:
                h.before_train()
            for self.iter in range(start_iter, max_iter):
                for h in self._hooks:
                    h.before_step()
                self.run_step()
                for h in self._hooks:
                    h.after_step()
            self.iter = max_iter  # finished: after_train sees max_iter, like detectron2
            self.completed = True
        except Exception:
            logger.exception("Exception during training at iteration %d:", self.iter)
            raise
        finally:
            for h in self._hooks:
                h.after_train()

    def run_step(self) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class SemisupSettings:
    """Guided distillation settings (``SSL.*``); ``None`` in the trainer means supervised."""

    burnin_iter: int
    ema_decay: float
    freq: int = 1
    unsup_loss_weight: float = 2.0
    class_threshold: float = 0.7
    mask_threshold: float = 0.5
    min_mask_area: float = 5.0


@dataclass(frozen=True)
class Preprocess:
    """How loader images become model inputs (``MODEL.PIXEL_*``, size divisibility)."""

    pixel_mean: Sequence[float]
    pixel_std: Sequence[float]
    size_divisibility: int = 32


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; training stops, the last checkpoint stays intact."""


class Trainer(TrainerBase):
    """One iteration of supervised training or guided distillation (SPEC §2).

    Args:
        model: the student (possibly DDP-wrapped); the only optimized module.
        criterion: ``criterion(outputs, targets) -> dict`` of weighted losses.
        optimizer: over the student's parameters.
        labeled_loader: infinite iterable of labeled batches (lists of loader dicts) with
            ``state_dict()``/``load_state_dict()``.
        preprocess: normalization and padding of images.
        precision: autocast dtype and gradient scaler (:mod:`gdseg.engine.amp`).
        device: where inputs go.
        teacher: the frozen teacher (plain module) for guided distillation, else ``None``.
        unlabeled_loader: infinite iterable of ``image_weak``/``image_strong`` batches.
        semisup: guided distillation settings; ``None`` trains supervised.
        scheduler: lr scheduler (stepped by a hook; saved in checkpoints).
        clip: ``(clip_type, clip_value, norm_type)`` or ``None`` for no clipping.
        batch_student: run the student once on labeled + strong views when their padded sizes
            match and no BatchNorm computes batch statistics (a batched pass would mix them).
            None (default): batched on accelerators, two passes on the CPU, where one pass over
            twice the images was measured ~10 % slower (it touches twice the activation memory
            at once; benchmarks/train_step.py, ``gd`` row).
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Callable[[dict, list[dict]], LossDict],
        optimizer: torch.optim.Optimizer,
        labeled_loader: Iterable[list[dict]],
        preprocess: Preprocess,
        precision: Precision,
        device: torch.device | str = "cpu",
        teacher: nn.Module | None = None,
        unlabeled_loader: Iterable[list[dict]] | None = None,
        semisup: SemisupSettings | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        clip: tuple[str, float, float] | None = None,
        batch_student: bool | None = None,
    ) -> None:
        super().__init__()
        if semisup is not None and (teacher is None or unlabeled_loader is None):
            raise ValueError("Guided distillation needs a teacher and an unlabeled loader.")
        self.model = model
        self.teacher = teacher
        self.criterion = criterion
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.labeled_loader = labeled_loader
        self.unlabeled_loader = unlabeled_loader
        self.semisup = semisup
        self.preprocess = preprocess
        self.precision = precision
        self.scaler = precision.grad_scaler()
        self.device = torch.device(device)
        self.clip = clip
        if batch_student is None:
            batch_student = self.device.type != "cpu"
        self.batch_student = batch_student and not _has_batch_statistics(model)
        self.step_metrics: dict[str, float] = {}  # last iteration's reduced scalars (hooks)
        self._labeled_iter = None
        self._unlabeled_iter = None
        self.model.train()
        if self.teacher is not None:
            self.teacher.eval()
            self.teacher.requires_grad_(False)

    # -- phases ----------------------------------------------------------------------------
    def phase(self, it: int | None = None) -> str:
        """``supervised``, ``burn_in`` or ``ema`` at iteration ``it`` (default: now)."""
        it = self.iter if it is None else it
        if self.semisup is None:
            return "supervised"
        return "burn_in" if it < self.semisup.burnin_iter else "ema"

    def uses_unlabeled(self, it: int) -> bool:
        return self.semisup is not None and it % self.semisup.freq == 0

    # -- the iteration ---------------------------------------------------------------------
    def run_step(self) -> None:
        """Labeled loss, unlabeled loss on pseudo-labels, one backward, one optimizer step.

        The teacher update of this iteration already happened in a hook's ``before_step``.
        """
        start = time.perf_counter()
        labeled = next(self._labeled_stream())
        unlabeled = next(self._unlabeled_stream()) if self.uses_unlabeled(self.iter) else None
        data_time = time.perf_counter() - start

        images, targets = self._labeled_inputs(labeled)
        extra: dict[str, float] = {}
        if unlabeled is None:
            with self.precision.autocast():
                outputs = self.model(images)
            loss_dict = dict(self.criterion(outputs, targets))
        else:
            weak, strong = self._unlabeled_inputs(unlabeled)
            pseudo = self._pseudo_labels(weak)
            extra["pseudo_labels_per_image"] = sum(len(p["labels"]) for p in pseudo) / len(pseudo)
            loss_dict = self._semisup_losses(images, targets, strong, pseudo)

        total = sum(loss_dict.values())
        reduced = comm.all_reduce_dict({**loss_dict, "total_loss": total, **extra})
        self._check_finite(reduced)

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        grad_norm = self._clip_gradients()
        self.scaler.step(self.optimizer)
        self.scaler.update()

        self.step_metrics = {
            **reduced,
            "lr": _main_lr(self.optimizer),
            "data_time": data_time,
            "step_time": time.perf_counter() - start,
        }
        if grad_norm is not None:
            self.step_metrics["grad_norm"] = float(grad_norm)

    def _semisup_losses(
        self, images: torch.Tensor, targets: list[dict], strong: torch.Tensor, pseudo: list[dict]
    ) -> LossDict:
        """``L_sup`` on labeled images + ``UNSUP_LOSS_WEIGHT * L_unsup`` on strong views."""
        # Every process must take the same branch: DDP runs a collective in each forward.
        same_size = images.shape[1:] == strong.shape[1:]
        if self.batch_student and comm.all_processes_agree(same_size):
            with self.precision.autocast():
                both = self.model(torch.cat([images, strong]))
            out_sup, out_unsup = split_outputs(both, images.shape[0])
        else:
            with self.precision.autocast():
                out_sup = self.model(images)
                out_unsup = self.model(strong)
        losses = dict(self.criterion(out_sup, targets))
        weight = self.semisup.unsup_loss_weight
        for k, v in self.criterion(out_unsup, pseudo).items():
            losses[f"{k}_unsup"] = v * weight
        return losses

    @torch.no_grad()
    def _pseudo_labels(self, weak: torch.Tensor) -> list[dict]:
        """Teacher (eval mode, no gradients) on the weak views -> filtered targets."""
        with self.precision.autocast():
            out = self.teacher(weak)
        s = self.semisup
        return make_pseudo_labels(
            out["pred_logits"],
            out["pred_masks"],
            class_threshold=s.class_threshold,
            mask_threshold=s.mask_threshold,
            min_mask_area=s.min_mask_area,
        )

    def _labeled_inputs(self, batch: list[dict]) -> tuple[torch.Tensor, list[dict]]:
        images, _ = self._batch([d["image"] for d in batch])
        instances = [
            {k: d["instances"][k].to(self.device, non_blocking=True) for k in ("labels", "masks")}
            for d in batch
        ]
        return images, pad_targets(instances, tuple(images.shape[-2:]))

    def _unlabeled_inputs(self, batch: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        weak, _ = self._batch([d["image_weak"] for d in batch])
        strong, _ = self._batch([d["image_strong"] for d in batch])
        return weak, strong

    def _batch(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, list]:
        p = self.preprocess
        images = [img.to(self.device, non_blocking=True) for img in images]
        return batch_images(images, p.pixel_mean, p.pixel_std, p.size_divisibility)

    def _clip_gradients(self) -> torch.Tensor | None:
        if self.clip is None:
            return None
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not scaled ones
        clip_type, value, norm_type = self.clip
        return clip_gradients(self.model.parameters(), clip_type, value, norm_type)

    def _check_finite(self, reduced: Mapping[str, float]) -> None:
        # Reduced values are identical on every process, so all of them stop together.
        if all(math.isfinite(v) for v in reduced.values()):
            return
        losses = ", ".join(f"{k}={v:.4g}" for k, v in sorted(reduced.items()))
        raise NonFiniteLossError(
            f"Loss became non-finite at iteration {self.iter} ({self.phase()} phase): {losses}. "
            "Training stopped; the last checkpoint in OUTPUT_DIR is intact (resume with "
            "--resume). Try a lower SOLVER.BASE_LR or longer SOLVER.WARMUP_ITERS, enable "
            "SOLVER.CLIP_GRADIENTS.ENABLED, or use SOLVER.AMP.PRECISION bf16 instead of fp16."
        )

    # -- data streams ----------------------------------------------------------------------
    def _labeled_stream(self):
        if self._labeled_iter is None:
            self._labeled_iter = iter(self.labeled_loader)
        return self._labeled_iter

    def _unlabeled_stream(self):
        if self._unlabeled_iter is None:
            self._unlabeled_iter = iter(self.unlabeled_loader)
        return self._unlabeled_iter

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self, iteration: int) -> dict:
        """Everything needed to continue after ``iteration`` (the last finished one)."""
        state = {
            "model": comm.unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": int(iteration),
            "data": {"labeled": self.labeled_loader.state_dict()},
        }
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.teacher is not None:
            state["teacher"] = self.teacher.state_dict()
        if self.unlabeled_loader is not None:
            state["data"]["unlabeled"] = self.unlabeled_loader.state_dict()
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`; training continues at ``state["iteration"] + 1``."""
        from .checkpoint import load_model_state

        load_model_state(self.model, state["model"], "Checkpoint 'model'")
        if self.teacher is not None:
            if "teacher" not in state:
                raise RuntimeError(
                    "Resuming guided distillation from a checkpoint without a teacher."
                )
            load_model_state(self.teacher, state["teacher"], "Checkpoint 'teacher'")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        data = state.get("data", {})
        if "labeled" in data:
            self.labeled_loader.load_state_dict(data["labeled"])
        if self.unlabeled_loader is not None and "unlabeled" in data:
            self.unlabeled_loader.load_state_dict(data["unlabeled"])
        self._labeled_iter = self._unlabeled_iter = None  # restart from the restored positions
        self.start_iter = int(state["iteration"]) + 1


def split_outputs(outputs: Mapping, n: int) -> tuple[dict, dict]:
    """Split a batched model output into the first ``n`` images and the rest."""
    first, second = {}, {}
    for k, v in outputs.items():
        if isinstance(v, torch.Tensor):
            first[k], second[k] = v[:n], v[n:]
        elif isinstance(v, (list, tuple)):
            parts = [split_outputs(x, n) for x in v]
            first[k], second[k] = [p[0] for p in parts], [p[1] for p in parts]
        else:
            first[k] = second[k] = v
    return first, second


def _has_batch_statistics(model: nn.Module) -> bool:
    """Whether a BatchNorm computes batch statistics in training (batching would mix them)."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in comm.unwrap_model(model).modules()
    )


def _main_lr(optimizer: torch.optim.Optimizer) -> float:
    """The lr of the head (largest group with the full lr); what the logs show as ``lr``."""
    return max(g["lr"] for g in optimizer.param_groups)
