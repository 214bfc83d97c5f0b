import copy

import pytest
import torch
from torch import nn

from gdseg.semisup.ema import copy_student_to_teacher, ema_update


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(6, 2))


def _pair():
    torch.manual_seed(0)
    student = _net()
    teacher = _net()  # different random init
    student(torch.randn(2, 3, 8, 8))  # move BN running stats and num_batches_tracked
    return teacher, student


def test_copy_is_exact():
    teacher, student = _pair()
    copy_student_to_teacher(teacher, student)
    for (k, t), s in zip(teacher.state_dict().items(), student.state_dict().values()):
        assert torch.equal(t, s), k


def test_ema_formula_on_floats_and_copy_of_integer_buffers():
    teacher, student = _pair()
    before = copy.deepcopy(teacher.state_dict())
    d = 0.9
    ema_update(teacher, student, d)
    s_state = student.state_dict()
    for k, t in teacher.state_dict().items():
        if t.is_floating_point():
            expected = before[k] - (1 - d) * (before[k] - s_state[k])
            assert torch.equal(t, expected), k
        else:
            assert k.endswith("num_batches_tracked")
            assert torch.equal(t, s_state[k])
    assert teacher[1].num_batches_tracked.item() == 1


def test_decay_limits():
    teacher, student = _pair()
    keep = copy.deepcopy(teacher.state_dict())
    ema_update(teacher, student, 1.0)
    for k, v in keep.items():
        if v.is_floating_point():
            assert torch.equal(teacher.state_dict()[k], v)
    ema_update(teacher, student, 0.0)
    for k, v in student.state_dict().items():
        assert torch.equal(teacher.state_dict()[k], v)
    with pytest.raises(ValueError):
        ema_update(teacher, student, 1.5)


def test_teacher_gets_no_gradient_and_keeps_identity():
    teacher, student = _pair()
    teacher.requires_grad_(False)
    params = [id(p) for p in teacher.parameters()]
    ema_update(teacher, student, 0.5)
    assert params == [id(p) for p in teacher.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_mismatched_architectures_are_refused():
    with pytest.raises(ValueError, match="same architecture"):
        ema_update(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), 0.5)
