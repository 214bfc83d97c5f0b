import logging

import pytest
import torch

from gdseg.engine.amp import resolve_precision


def test_disabled_is_fp32():
    p = resolve_precision(False, "fp16", "cpu")
    assert not p.enabled and p.name == "fp32"
    assert not p.grad_scaler().is_enabled()


def test_fp16_on_cpu_is_refused_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        p = resolve_precision(True, "fp16", "cpu")
    assert p.dtype is None
    assert "bf16" in caplog.text


def test_bf16_on_cpu_autocasts():
    p = resolve_precision(True, "bf16", "cpu")
    assert p.dtype == torch.bfloat16 and not p.grad_scaler().is_enabled()
    lin = torch.nn.Linear(4, 4)
    with p.autocast():
        y = lin(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16


def test_unknown_precision_names_the_choices():
    with pytest.raises(ValueError, match="fp16, bf16"):
        resolve_precision(True, "fp8", "cpu")
