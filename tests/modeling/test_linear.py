import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gdseg.modeling.linear as linear_mod
from gdseg.modeling.linear import Linear, linear
from tests.threads import torch_threads


@pytest.fixture
def two_threads():
    with torch_threads(2):
        yield


def _count_convs(monkeypatch) -> list:
    calls = []
    conv2d = F.conv2d

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return conv2d(*args, **kwargs)

    monkeypatch.setattr(linear_mod.F, "conv2d", counted)
    return calls


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 5), (2, 9, 5), (3, 1, 4, 5)])
def test_onednn_matches_float64_product_and_gradients(shape, bias):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(6, 5, requires_grad=True)
    b = torch.randn(6, requires_grad=True) if bias else None
    got = linear(x, w, b, impl="onednn")
    expected = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.shape == (*shape[:-1], 6) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)

    grad = torch.randn_like(expected)
    inputs = [x, w] + ([b] if bias else [])
    g_got = torch.autograd.grad((got.double() * grad).sum(), inputs)
    g_exp = torch.autograd.grad((expected * grad).sum(), inputs)
    for a, e in zip(g_got, g_exp):
        assert a.shape == e.shape
        torch.testing.assert_close(a.double(), e.double(), atol=1e-5, rtol=1e-5)


def test_onednn_takes_non_contiguous_inputs_and_weight_slices():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 3).transpose(1, 2)  # [4, 3, 8], last dim strided
    w = torch.randn(12, 8)
    got = linear(x, w[4:8], impl="onednn")
    torch.testing.assert_close(got, x @ w[4:8].t(), atol=1e-5, rtol=1e-5)


def test_auto_uses_onednn_for_fp32_cpu_on_several_threads(monkeypatch, two_threads):
    calls = _count_convs(monkeypatch)
    x, w = torch.randn(10, 4), torch.randn(3, 4)
    linear(x, w)
    assert calls == [(1, 4, 10, 1)]


# torch.backends.mkldnn.flags() warns about Intel-GPU TF32 while restoring its settings
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
@pytest.mark.parametrize(
    "case", ["one thread", "float64", "autocast", "empty", "mkldnn disabled", "compiling"]
)
def test_auto_falls_back_to_f_linear(case, monkeypatch, two_threads):
    calls = _count_convs(monkeypatch)
    x, w, b = torch.randn(10, 4), torch.randn(3, 4), torch.randn(3)
    if case == "one thread":
        torch.set_num_threads(1)
    if case == "float64":
        x, w, b = x.double(), w.double(), b.double()
    if case == "empty":
        x = x[:0]
    if case == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    context = contextlib.nullcontext()
    if case == "autocast":
        context = torch.autocast("cpu", dtype=torch.bfloat16)
    if case == "mkldnn disabled":
        context = torch.backends.mkldnn.flags(enabled=False)
    with context:
        out = linear(x, w, b)
        expected = F.linear(x, w, b)
    assert calls == []
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_bad_impl_names_the_allowed_ones():
    with pytest.raises(ValueError, match="'auto', 'onednn', 'blas'.*'mkl'"):
        linear(torch.randn(2, 3), torch.randn(4, 3), impl="mkl")


def test_linear_module_is_a_drop_in_nn_linear(monkeypatch, two_threads):
    torch.manual_seed(0)
    plain = nn.Linear(5, 7)
    ours = Linear(5, 7)
    assert isinstance(ours, nn.Linear)
    ours.load_state_dict(plain.state_dict())
    assert ours.state_dict().keys() == plain.state_dict().keys()
    calls = _count_convs(monkeypatch)
    x = torch.randn(3, 11, 5)
    torch.testing.assert_close(ours(x), plain(x), atol=1e-5, rtol=1e-5)
    assert len(calls) == 1
