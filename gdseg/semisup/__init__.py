"""Semi-supervised pieces of guided distillation: pseudo-labels and the teacher update."""

from .ema import copy_student_to_teacher, ema_update
from .pseudo_labels import make_pseudo_labels

__all__ = ["copy_student_to_teacher", "ema_update", "make_pseudo_labels"]
