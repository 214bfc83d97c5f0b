"""The teacher update of guided distillation (SPEC §2, step 1).

At ``BURNIN_ITER`` the teacher becomes an exact copy of the student; after it, every
iteration moves the teacher toward the student, ``t = t - (1 - d) * (t - s)``, on every
parameter and floating-point buffer. Integer buffers (BatchNorm's ``num_batches_tracked``)
cannot be interpolated, so they are copied rather than silently skipped.
"""

from __future__ import annotations

import torch
from torch import nn

from gdseg.engine.distributed import unwrap_model


def _paired_tensors(teacher: nn.Module, student: nn.Module):
    t_state = unwrap_model(teacher).state_dict(keep_vars=True)
    s_state = unwrap_model(student).state_dict(keep_vars=True)
    if t_state.keys() != s_state.keys():
        missing = sorted(s_state.keys() - t_state.keys())[:5]
        extra = sorted(t_state.keys() - s_state.keys())[:5]
        raise ValueError(
            "Teacher and student must have the same architecture; keys only in the student: "
            f"{missing}, only in the teacher: {extra}."
        )
    for name, t in t_state.items():
        s = s_state[name]
        if t.shape != s.shape:
            raise ValueError(f"Teacher/student shape mismatch at {name}: {t.shape} vs {s.shape}.")
        yield t, s


@torch.no_grad()
def copy_student_to_teacher(teacher: nn.Module, student: nn.Module) -> None:
    """teacher := student, exactly (every parameter and buffer)."""
    for t, s in _paired_tensors(teacher, student):
        t.detach().copy_(s.detach())


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """One EMA step: ``t -= (1 - decay) * (t - s)`` on floats, copy on other tensors.

    Args:
        teacher: the model updated in place (plain module, never DDP-wrapped).
        student: the trained model (may be DDP-wrapped).
        decay: EMA decay in [0, 1]; 0 copies the student, 1 keeps the teacher.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1]; got {decay}.")
    if decay == 0.0:  # t - (t - s) is not always s in floating point; copy exactly
        copy_student_to_teacher(teacher, student)
        return
    floats_t, floats_s = [], []
    for t, s in _paired_tensors(teacher, student):
        if t.is_floating_point():
            floats_t.append(t.detach())
            floats_s.append(s.detach().to(t.dtype))
        else:
            t.detach().copy_(s.detach())
    if floats_t:
        # Literally t - (1 - d) * (t - s) (not lerp, which rounds differently), one fused
        # kernel per step for all tensors.
        diffs = torch._foreach_sub(floats_t, floats_s)
        torch._foreach_mul_(diffs, 1.0 - decay)
        torch._foreach_sub_(floats_t, diffs)
