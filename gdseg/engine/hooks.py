"""What happens around each iteration: teacher update, lr schedule, checkpoints, evaluation,
metrics. Registered in this order by :func:`gdseg.engine.train.build_hooks`; checkpoints come
after everything that draws random numbers, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from collections.abc import Callable

import torch.distributed as dist

from gdseg.fileio import atomic_write_text
from gdseg.semisup.ema import copy_student_to_teacher, ema_update

from . import distributed as comm
from .checkpoint import Checkpointer, get_rng_state
from .trainer import HookBase

logger = logging.getLogger(__name__)


class TeacherUpdate(HookBase):
    """Before iteration ``BURNIN_ITER`` the teacher becomes the student; after it, EMA.

    Runs first in every iteration (SPEC §2, step 1). Before the burn-in ends the teacher stays
    the stage-1 model.
    """

    def __init__(self, burnin_iter: int, ema_decay: float) -> None:
        self.burnin_iter = burnin_iter
        self.ema_decay = ema_decay

    def before_step(self) -> None:
        t = self.trainer
        if t.iter >= self.burnin_iter:
            # Each process's BatchNorm statistics moved with its own batch in the last
            # forward; DDP would overwrite them from rank 0 at the next one. Do it now so the
            # teachers of all processes stay identical.
            comm.broadcast_buffers(t.model)
        if t.iter == self.burnin_iter:
            copy_student_to_teacher(t.teacher, t.model)
            logger.info("Iteration %d: burn-in over, teacher := student; EMA from now on.", t.iter)
        elif t.iter > self.burnin_iter:
            ema_update(t.teacher, t.model, self.ema_decay)


class LRScheduler(HookBase):
    """Steps the lr scheduler after every iteration."""

    def after_step(self) -> None:
        self.trainer.scheduler.step()


class EvalHook(HookBase):
    """Evaluates every ``period`` iterations (0: only at the end) and after the last one.

    Args:
        period: ``TEST.EVAL_PERIOD``.
        eval_function: ``() -> {model: {dataset: {"segm": {...}}}}``; called on every process
            (inference is sharded), results appended to ``trainer.eval_results``.
    """

    def __init__(self, period: int, eval_function: Callable[[], dict]) -> None:
        self.period = period
        self.eval_function = eval_function

    def _evaluate(self, iteration: int) -> None:
        results = self.eval_function()
        self.trainer.eval_results.append((iteration, results))
        comm.synchronize()

    def after_step(self) -> None:
        nxt = self.trainer.iter + 1
        if self.period > 0 and nxt % self.period == 0 and nxt < self.trainer.max_iter:
            self._evaluate(self.trainer.iter)

    def after_train(self) -> None:
        if self.trainer.completed:
            self._evaluate(self.trainer.max_iter - 1)


class PeriodicCheckpointer(HookBase):
    """Saves ``model_{iter:07d}.pth`` every ``period`` iterations and ``model_final.pth``.

    Every process takes part (RNG states are gathered from all of them); only the
    checkpointer of rank 0 writes. Nothing is written after a failed iteration, so the last
    good checkpoint stays the one ``last_checkpoint`` points to.

    Args:
        checkpointer: writes files atomically.
        period: ``SOLVER.CHECKPOINT_PERIOD`` (0 disables periodic checkpoints).
        config_text: the resolved config (YAML) stored in every checkpoint.
        metadata: class names and category ids of the training data, stored in every
            checkpoint so that ``gdseg predict`` can name classes without the dataset.
    """

    def __init__(
        self,
        checkpointer: Checkpointer,
        period: int,
        config_text: str,
        metadata: dict | None = None,
    ) -> None:
        self.checkpointer = checkpointer
        self.period = period
        self.config_text = config_text
        self.metadata = metadata or {}

    def save(self, name: str, iteration: int) -> None:
        payload = self.trainer.state_dict(iteration)
        payload["rng"] = gather_rng_states()
        payload["config"] = self.config_text
        payload["metadata"] = self.metadata
        self.checkpointer.save(name, payload)
        comm.synchronize()

    def after_step(self) -> None:
        it = self.trainer.iter
        if self.period > 0 and (it + 1) % self.period == 0 and it + 1 < self.trainer.max_iter:
            self.save(f"model_{it:07d}", it)

    def after_train(self) -> None:
        if self.trainer.completed:
            self.save("model_final", self.trainer.max_iter - 1)


def gather_rng_states() -> dict:
    """``{"per_rank": [state of rank 0, rank 1, ...]}`` (each from ``get_rng_state``)."""
    state = get_rng_state()
    if comm.get_world_size() == 1:
        return {"per_rank": [state]}
    states: list = [None] * comm.get_world_size()
    dist.all_gather_object(states, state)
    return {"per_rank": states}


class MetricsWriter(HookBase):
    """Averages the step metrics over ``period`` iterations; writes jsonl, console, TensorBoard.

    One ``OUTPUT_DIR/metrics.jsonl`` line per window: ``iteration`` (last of the window),
    ``phase``, every loss term, ``total_loss``, ``lr``, ``data_time``, ``time`` (seconds per
    iteration, everything included), ``eta_seconds``, ``pseudo_labels_per_image`` (semisup).
    Evaluations add a line ``{"iteration", "phase", "eval": {model: {dataset: {"segm": ..}}}}``.
    Construct it on rank 0 only; the metrics it receives are already averaged over processes.
    """

    def __init__(self, output_dir: str, period: int, tensorboard: bool = True) -> None:
        self.output_dir = output_dir
        self.period = max(1, period)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._tb = _tensorboard_writer(output_dir) if tensorboard else None
        self._reset_window()
        self._written_evals = 0

    def _reset_window(self) -> None:
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._times: list[float] = []

    def before_train(self) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        if self.trainer.start_iter > 0:
            self._drop_records_from(self.trainer.start_iter)
        self._last = time.perf_counter()
        self._written_evals = len(self.trainer.eval_results)

    def _drop_records_from(self, iteration: int) -> None:
        """On resume, forget lines of iterations that are about to run again (they were
        written after the checkpoint, before the interruption)."""
        if not os.path.isfile(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        keep = [line for line in lines if json.loads(line).get("iteration", -1) < iteration]
        if len(keep) != len(lines):
            atomic_write_text("".join(keep), self.path)

    def after_step(self) -> None:
        now = time.perf_counter()
        self._times.append(now - self._last)
        self._last = now
        for k, v in self.trainer.step_metrics.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
            self._counts[k] = self._counts.get(k, 0) + 1
        it = self.trainer.iter
        if (it + 1) % self.period == 0 or it + 1 == self.trainer.max_iter:
            self._write_window(it)
        self._write_evals()

    def after_train(self) -> None:
        if self._counts:
            self._write_window(self.trainer.iter - 1)
        self._write_evals()
        if self._tb is not None:
            self._tb.close()

    def _write_window(self, it: int) -> None:
        t = self.trainer
        avg = {k: self._sums[k] / self._counts[k] for k in self._sums}
        sec = sum(self._times) / max(1, len(self._times))
        record = {"iteration": it, "phase": t.phase(it), **avg, "time": sec}
        record["lr"] = t.step_metrics.get("lr", avg.get("lr"))
        record["eta_seconds"] = sec * max(0, t.max_iter - it - 1)
        self._append(record)
        self._console(record)
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "iteration":
                    self._tb.add_scalar(k, v, it)
        self._reset_window()

    def _write_evals(self) -> None:
        for it, results in self.trainer.eval_results[self._written_evals :]:
            self._append({"iteration": it, "phase": self.trainer.phase(it), "eval": results})
            if self._tb is not None:
                for model, per_ds in results.items():
                    for ds, tasks in per_ds.items():
                        for name, v in tasks.get("segm", {}).items():
                            self._tb.add_scalar(f"eval/{model}/{ds}/{name}", v, it)
        self._written_evals = len(self.trainer.eval_results)

    def _append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _console(self, r: dict) -> None:
        main = [k for k in r if k.startswith("loss_") and not _is_aux(k)]
        losses = "  ".join(f"{k}: {r[k]:.4g}" for k in ["total_loss", *main] if k in r)
        pl = r.get("pseudo_labels_per_image")
        logger.info(
            "iter %d/%d [%s]  %s  lr: %.3g  time: %.3fs  data: %.3fs%s  eta: %s",
            r["iteration"] + 1,
            self.trainer.max_iter,
            r["phase"],
            losses,
            r["lr"],
            r["time"],
            r.get("data_time", 0.0),
            f"  pseudo/img: {pl:.2f}" if pl is not None else "",
            datetime.timedelta(seconds=round(r["eta_seconds"])),
        )


def _is_aux(key: str) -> bool:
    """``loss_ce_3`` / ``loss_ce_3_unsup`` are auxiliary-layer terms (kept out of the console)."""
    parts = key.removesuffix("_unsup").rsplit("_", 1)
    return len(parts) == 2 and parts[1].isdigit()


def _tensorboard_writer(output_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        logger.debug("tensorboard not installed; no event files written.")
        return None
    return SummaryWriter(log_dir=output_dir)


__all__ = [
    "EvalHook",
    "LRScheduler",
    "MetricsWriter",
    "PeriodicCheckpointer",
    "TeacherUpdate",
    "gather_rng_states",
]
