"""Mixed precision: which dtype (if any) to autocast to, and the gradient scaler.

fp16 needs a gradient scaler (its exponent range is small) and is only offered on CUDA; bf16
has fp32's range, needs no scaler and works on CUDA and on CPUs with bf16 support. The
criterion computes matching and losses in fp32 whatever we choose here.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

_DTYPES = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class Precision:
    """Resolved mixed-precision setting.

    Attributes:
        device_type: ``"cuda"`` or ``"cpu"`` (what autocast needs).
        dtype: the autocast dtype, or ``None`` for plain fp32.
    """

    device_type: str
    dtype: torch.dtype | None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    @property
    def name(self) -> str:
        return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context manager running the enclosed forward pass in the chosen precision."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler, enabled only for fp16 (a pass-through otherwise)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)


def resolve_precision(enabled: bool, precision: str, device: torch.device | str) -> Precision:
    """Decide the autocast dtype from ``SOLVER.AMP.{ENABLED,PRECISION}`` and the device.

    fp16 on CPU is refused with a warning (runs in fp32): CPU autocast to fp16 is slow and has
    no loss scaling. Choose bf16 to get mixed precision on CPU.
    """
    device_type = torch.device(device).type
    key = str(precision).lower()
    if key not in _DTYPES:
        raise ValueError(f"SOLVER.AMP.PRECISION must be one of fp16, bf16; got {precision!r}.")
    if not enabled:
        return Precision(device_type, None)
    dtype = _DTYPES[key]
    if device_type == "cpu" and dtype == torch.float16:
        logger.warning(
            "SOLVER.AMP.ENABLED with fp16 is not supported on CPU; training in fp32. "
            "Set SOLVER.AMP.PRECISION bf16 for mixed precision on CPU."
        )
        return Precision(device_type, None)
    if device_type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        logger.warning("This GPU has no bf16 support; using fp16 with a gradient scaler.")
        dtype = torch.float16
    if device_type not in ("cpu", "cuda"):
        logger.warning(
            "Mixed precision is not set up for device %r; training in fp32.", device_type
        )
        return Precision(device_type, None)
    return Precision(device_type, dtype)


def build_precision(cfg, device: torch.device | str) -> Precision:
    """``resolve_precision`` from ``cfg.SOLVER.AMP``."""
    return resolve_precision(cfg.SOLVER.AMP.ENABLED, cfg.SOLVER.AMP.PRECISION, device)
