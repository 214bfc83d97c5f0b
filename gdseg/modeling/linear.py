"""Fully connected layers that run their fp32 CPU products through oneDNN.

PyTorch sends an fp32 ``F.linear`` on the CPU to the BLAS it was built with (MKL in the
official wheels) and a 1x1 convolution to oneDNN. On one thread the two are as fast; on two
threads (2-core AMD EPYC, AVX-512) MKL's GEMM ran 1.4-2.2x faster than on one and oneDNN's
3.2-3.3x, so oneDNN was about 2x faster for this model's shapes (forward + backward of the
pixel decoder's ``[6048, 256] x [256, 1024]`` product: 34 vs 66 ms; a whole R-50 training
step 2.9 vs 3.75 s).
The result is the same product up to float rounding (relative ~1e-6). So with several CPU
threads, in fp32 and outside autocast, :func:`linear` runs ``x @ W.T + b`` as a 1x1
convolution over a channels-last view of ``x`` (no copy in or out); elsewhere it is
``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IMPLS", "Linear", "linear"]

IMPLS = ("auto", "onednn", "blas")


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, impl: str = "auto") -> Tensor:
    """``x @ weight.T + bias``: ``x`` ``[..., K]``, ``weight`` ``[N, K]``, ``bias`` ``[N]`` ->
    ``[..., N]``.

    Args:
        impl: "blas" (``F.linear``), "onednn" (a 1x1 convolution: oneDNN on the CPU) or
            "auto" (oneDNN for fp32 CPU tensors on several threads, outside autocast and
            ``torch.compile``; else ``F.linear``).
    """
    if impl == "auto":
        impl = "onednn" if _onednn_fits(x, weight) else "blas"
    if impl == "blas":
        return F.linear(x, weight, bias)
    if impl != "onednn":
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    K = x.shape[-1]
    rows = x.reshape(-1, K)
    M = rows.shape[0]
    # [M, K] row-major is the channels-last layout of a [1, K, M, 1] image: no copy
    image = rows.view(1, M, 1, K).permute(0, 3, 1, 2)
    out = F.conv2d(image, weight[:, :, None, None], bias)  # [1, N, M, 1], channels-last
    return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], weight.shape[0])


def _onednn_fits(x: Tensor, weight: Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.numel() > 0
        and torch.get_num_threads() > 1
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
        # inductor has its own CPU linear lowering; give it the plain op
        and not torch.compiler.is_compiling()
    )


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, init and state dict) computed by :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
