"""Checkpoints that survive crashes and load with ``torch.load(weights_only=True)``.

A checkpoint is one dict (see the team contract): ``model`` (student), ``teacher``,
``optimizer``, ``scheduler``, ``scaler``, ``iteration`` (index of the last finished
iteration, as in detectron2), ``rng``, ``data`` (loader positions), ``config`` (YAML text),
``gdseg_version``. Files are written to a temporary name and renamed, so a crash mid-write
never leaves a truncated ``model_final.pth`` or ``last_checkpoint`` behind.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

import gdseg
from gdseg.fileio import atomic_write, atomic_write_text

from .distributed import unwrap_model

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"


# -- atomic files ---------------------------------------------------------------------------
def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``."""
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def load_file(path: str | os.PathLike) -> dict:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with a helpful error."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(
            f"Could not read {path} with torch.load(weights_only=True): {e}. gdseg only loads "
            "tensor files; convert other formats with `gdseg convert`."
        ) from e


# -- RNG states as tensors / lists (weights_only-safe) ----------------------------------------
def get_rng_state() -> dict:
    """torch, CUDA, numpy and python ``random`` states as tensors and plain lists."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    """Restore what ``get_rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning(
                "CUDA RNG states of %d devices not restored on %d devices.",
                len(cuda_states),
                torch.cuda.device_count(),
            )


# -- model weights -----------------------------------------------------------------------------
def load_model_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Strict ``load_state_dict`` with an error message that names the first differences."""
    model = unwrap_model(model)
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"{what} does not match the model: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:5]}), {len(result.unexpected_keys)} unexpected keys "
            f"(e.g. {result.unexpected_keys[:5]}). Check MODEL.* in the config."
        )


def _is_gdseg_checkpoint(ckpt: object) -> bool:
    return (
        isinstance(ckpt, Mapping)
        and isinstance(ckpt.get("model"), Mapping)
        and ("config" in ckpt or "gdseg_version" in ckpt)
    )


def extract_state_dict(ckpt: Mapping, role: str, path: str = "<dict>") -> Mapping:
    """The weights of ``role`` ("student" or "teacher") of a gdseg checkpoint.

    A stage-2 checkpoint gives its ``teacher`` for the teacher role; otherwise ``model``.
    """
    if not _is_gdseg_checkpoint(ckpt):
        raise ValueError(f"{path} is not a gdseg checkpoint (no 'model' and 'config' entries).")
    if role == "teacher" and isinstance(ckpt.get("teacher"), Mapping):
        return ckpt["teacher"]
    return ckpt["model"]


def has_teacher(path: str) -> bool:
    """Whether a weights file holds a teacher (gdseg stage 2, or a published GD file)."""
    from gdseg.modeling.backbones import read_state_dict

    if path.endswith((".pth", ".pt")):
        ckpt = load_file(path)
        if _is_gdseg_checkpoint(ckpt):
            return isinstance(ckpt.get("teacher"), Mapping)
    return any(k.startswith("modelTeacher.") for k in read_state_dict(path))


def load_full_model(model: nn.Module, path: str, role: str = "student") -> None:
    """Load every weight of ``model`` from a file, strictly.

    Accepted: a gdseg checkpoint (stage 1: ``model``; stage 2: ``teacher`` for the teacher
    role, ``model`` for the student), a published Mask2Former / Guided Distillation
    checkpoint (``.pkl`` or ``.pth``, converted by :mod:`gdseg.convert`; ``modelTeacher.`` /
    ``modelStudent.`` chosen by ``role``), or a plain state dict with our names.
    """
    from gdseg.convert import load_published_state_dict
    from gdseg.modeling.backbones import read_state_dict

    if path.endswith((".pth", ".pt")):
        ckpt = load_file(path)
        if _is_gdseg_checkpoint(ckpt):
            load_model_state(model, extract_state_dict(ckpt, role, path), f"{role} of {path}")
            return
    sd = read_state_dict(path)
    net = unwrap_model(model)
    if set(sd) == set(net.state_dict()):
        load_model_state(net, sd, path)
        return
    try:
        load_published_state_dict(sd, net, which=role)
    except (KeyError, RuntimeError) as e:
        raise RuntimeError(
            f"{path} does not hold a whole model of this config (needed for the {role}): {e}. "
            "Expected a gdseg checkpoint, a published Mask2Former / Guided Distillation "
            "checkpoint, or a state dict with gdseg's names; check MODEL.* in the config."
        ) from e
    logger.info("Imported the published %s weights of %s", role, path)


def load_teacher_weights(teacher: nn.Module, path: str) -> None:
    """Load ``SSL.TEACHER_CKPT`` into the teacher (see :func:`load_full_model`)."""
    load_full_model(teacher, path, role="teacher")
    logger.info("Teacher loaded from %s", path)


def load_initial_weights(model: nn.Module, spec: str) -> None:
    """``MODEL.WEIGHTS`` for training: a full-model file, or pretrained backbone weights.

    A file holding head weights (``sem_seg_head.*``, a gdseg or published checkpoint) is
    loaded as a whole; anything else (torchvision, timm, detectron2 ``.pkl`` backbones,
    ``torchvision://`` / ``timm://`` / ``detectron2://`` names) initializes the backbone only.
    """
    from gdseg.modeling.backbones import load_pretrained_backbone, read_state_dict, resolve_weights

    if not spec:
        return
    path = resolve_weights(spec)
    keys = read_state_dict(path).keys()
    if any(".sem_seg_head." in f".{k}" for k in keys):
        load_full_model(model, path, role="student")
        logger.info("Model initialized from the full checkpoint %s", path)
    else:
        load_pretrained_backbone(unwrap_model(model).backbone, path)


# -- training checkpoints ----------------------------------------------------------------------
class Checkpointer:
    """Save and restore the whole training state in ``output_dir``.

    Args:
        output_dir: folder of ``model_*.pth`` and ``last_checkpoint``.
        save_to_disk: only rank 0 writes; other ranks construct it with ``False``.
    """

    def __init__(self, output_dir: str, save_to_disk: bool = True) -> None:
        self.output_dir = output_dir
        self.save_to_disk = save_to_disk

    def save(self, name: str, payload: dict) -> str | None:
        """Write ``output_dir/name.pth`` atomically and point ``last_checkpoint`` at it."""
        if not self.save_to_disk:
            return None
        path = os.path.join(self.output_dir, f"{name}.pth")
        payload = {**payload, "gdseg_version": gdseg.__version__}
        atomic_save(payload, path)
        atomic_write_text(f"{name}.pth", os.path.join(self.output_dir, LAST_CHECKPOINT))
        logger.info("Saved checkpoint %s", path)
        return path

    def last_checkpoint(self) -> str | None:
        """Path named by ``output_dir/last_checkpoint``, or ``None`` if there is none."""
        marker = os.path.join(self.output_dir, LAST_CHECKPOINT)
        if not os.path.isfile(marker):
            return None
        with open(marker, encoding="utf-8") as f:
            name = f.read().strip()
        path = os.path.join(self.output_dir, name)
        if not os.path.isfile(path):
            logger.warning("last_checkpoint names %s, which does not exist.", path)
            return None
        return path
