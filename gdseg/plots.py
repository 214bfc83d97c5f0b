"""Plots of a teacher run and a guided-distillation run, read from their ``metrics.jsonl``.

Three figures, each with the end of the burn-in marked (the iteration at which the teacher
becomes the student and starts following it by EMA):

- training curves: stage 1 losses, stage 2 supervised and unlabeled losses;
- mask AP over iterations (``TEST.EVAL_PERIOD`` evaluations): the supervised model, the
  distilled student and the stage-2 teacher;
- pseudo-labels per unlabeled image over iterations (with the ground-truth average, if given).

Figures are drawn with matplotlib's object API and the Agg canvas, never ``pyplot``, so no
global backend or figure state is touched and nothing needs a display.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "eval_series",
    "plot_ap_curves",
    "plot_pseudo_labels",
    "plot_training_curves",
    "read_metrics",
]

_COLORS = {"supervised": "tab:blue", "student": "tab:red", "teacher": "tab:green"}


def read_metrics(path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """Reads a ``metrics.jsonl``.

    Returns:
        (training windows: dicts with ``iteration``, losses, ...; evaluations: dicts with
        ``iteration`` and ``eval`` = ``{model: {dataset: {"segm": {...}}}}``). Missing file:
        two empty lists.
    """
    train, evals = [], []
    if not os.path.isfile(path):
        return train, evals
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            record = json.loads(line)
            (evals if "eval" in record else train).append(record)
    return train, evals


def eval_series(
    evals: Sequence[dict], model: str, metric: str = "AP", dataset: str | None = None
) -> tuple[list[int], list[float]]:
    """``(iterations done, metric)`` of one model over a run's evaluations.

    ``iteration`` in metrics.jsonl is the 0-based index of the last finished iteration, so the
    number of iterations done is ``iteration + 1``. ``dataset`` None takes the first one.
    """
    xs, ys = [], []
    for record in evals:
        per_dataset = record["eval"].get(model) or {}
        if not per_dataset:
            continue
        name = dataset if dataset is not None else next(iter(per_dataset))
        value = per_dataset.get(name, {}).get("segm", {}).get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        xs.append(int(record["iteration"]) + 1)
        ys.append(float(value))
    return xs, ys


def _loss_sums(records: Sequence[dict]) -> tuple[list[int], list[float], list[float]]:
    """Per window: iterations done, summed labeled losses, summed unlabeled losses."""
    xs, sup, unsup = [], [], []
    for r in records:
        losses = {k: v for k, v in r.items() if k.startswith("loss_")}
        if not losses:
            continue
        xs.append(int(r["iteration"]) + 1)
        sup.append(sum(v for k, v in losses.items() if not k.endswith("_unsup")))
        unsup.append(sum(v for k, v in losses.items() if k.endswith("_unsup")))
    return xs, sup, unsup


def _mark_burnin(ax, burnin_iter: int | None, max_x: float) -> None:
    if burnin_iter is None or burnin_iter <= 0:
        return
    ax.axvspan(0, min(burnin_iter, max_x), color="0.92", zorder=0)
    ax.axvline(burnin_iter, color="0.3", linestyle="--", linewidth=1)
    ax.text(
        burnin_iter,
        0.02,
        " burn-in ends:\n teacher := student, then EMA",
        transform=ax.get_xaxis_transform(),
        va="bottom",
        fontsize=7,
        color="0.3",
    )


def _save(fig: Figure, path: str | os.PathLike) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return str(path)


def plot_training_curves(
    stage1: Sequence[dict],
    stage2: Sequence[dict],
    burnin_iter: int | None,
    path: str | os.PathLike,
) -> str:
    """Loss curves of both stages side by side (log scale); returns ``path``."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    xs, sup, _ = _loss_sums(stage1)
    ax1.plot(xs, sup, color=_COLORS["supervised"], label="labeled loss (all layers)")
    ax1.set_title("Stage 1: supervised teacher (labeled fraction)")
    xs2, sup2, unsup2 = _loss_sums(stage2)
    ax2.plot(xs2, sup2, color=_COLORS["supervised"], label="labeled loss L_sup")
    if any(unsup2):
        ax2.plot(xs2, unsup2, color=_COLORS["student"], label="unlabeled loss L_unsup (weighted)")
    ax2.set_title("Stage 2: guided distillation (fresh student)")
    _mark_burnin(ax2, burnin_iter, max(xs2, default=0))
    for ax, values in ((ax1, sup), (ax2, sup2 + [v for v in unsup2 if v > 0])):
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss (sum of terms)")
        if values and min(values) > 0:  # losses fall by orders of magnitude early on
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def plot_ap_curves(
    stage1_evals: Sequence[dict],
    stage2_evals: Sequence[dict],
    burnin_iter: int | None,
    path: str | os.PathLike,
    dataset: str | None = None,
) -> str:
    """Mask AP of the supervised model, the student and the stage-2 teacher over iterations."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    curves = [
        ("supervised", stage1_evals, "student", "supervised only (stage 1)"),
        ("student", stage2_evals, "student", "guided distillation: student"),
        ("teacher", stage2_evals, "teacher", "guided distillation: teacher"),
    ]
    max_x = 0
    for color_key, evals, model, label in curves:
        xs, ys = eval_series(evals, model, "AP", dataset)
        if xs:
            style = "--" if color_key == "teacher" else "-"
            ax.plot(xs, ys, style, marker="o", ms=3, color=_COLORS[color_key], label=label)
            max_x = max(max_x, xs[-1])
    _mark_burnin(ax, burnin_iter, max_x)
    ax.set_xlabel("iteration (of its stage)")
    ax.set_ylabel("mask AP on the validation set")
    ax.set_title("Validation mask AP during training")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_pseudo_labels(
    stage2: Sequence[dict],
    burnin_iter: int | None,
    path: str | os.PathLike,
    gt_per_image: float | None = None,
) -> str:
    """Pseudo-labels kept per unlabeled image over the stage-2 iterations."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    pts = [
        (int(r["iteration"]) + 1, float(r["pseudo_labels_per_image"]))
        for r in stage2
        if "pseudo_labels_per_image" in r
    ]
    if pts:
        ax.plot(*zip(*pts), color=_COLORS["teacher"], label="pseudo-labels per unlabeled image")
    if gt_per_image is not None:
        ax.axhline(gt_per_image, color="0.5", linestyle=":", label="true instances per image")
    _mark_burnin(ax, burnin_iter, max((p[0] for p in pts), default=0))
    ax.set_xlabel("iteration")
    ax.set_ylabel("pseudo-labels per image")
    ax.set_title("Teacher pseudo-labels that pass the thresholds")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)
