"""Sine position embedding of DETR / Mask2Former (normalized coordinates, scale 2*pi)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """Fixed 2-D sine/cosine embedding of pixel positions.

    Without a padding mask (Mask2Former never passes one) the embedding depends only on the
    feature-map size, so it is computed once per size with batch 1 and broadcast by callers.

    Args:
        num_pos_feats: channels per axis; the output has ``2 * num_pos_feats`` channels
            (y first, then x, as in DETR).
        temperature: frequency base.
        normalize: divide positions by the map size (then multiply by ``scale``).
        scale: ``2 * pi`` when None.
    """

    def __init__(
        self,
        num_pos_feats: int = 64,
        temperature: int = 10000,
        normalize: bool = True,
        scale: float | None = None,
    ):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("normalize should be True if scale is passed")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: Tensor) -> Tensor:
        """Embedding for the spatial size of ``x`` ([B, C, H, W]).

        Returns:
            ``[1, 2 * num_pos_feats, H, W]`` float32 (broadcast over the batch).
        """
        return self.embed(x.shape[-2], x.shape[-1], x.device)

    def embed(self, height: int, width: int, device: torch.device | str | None = None) -> Tensor:
        """``[1, 2 * num_pos_feats, height, width]`` float32 embedding."""
        # Same arithmetic as the reference (cumsum of ones == arange from 1) for exact parity.
        y = torch.arange(1, height + 1, dtype=torch.float32, device=device)
        x = torch.arange(1, width + 1, dtype=torch.float32, device=device)
        if self.normalize:
            eps = 1e-6
            y = y / (y[-1:] + eps) * self.scale
            x = x / (x[-1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        dim_t = self.temperature ** (
            2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats
        )
        pos_x = _interleave_sin_cos(x[:, None] / dim_t)  # [W, F]
        pos_y = _interleave_sin_cos(y[:, None] / dim_t)  # [H, F]
        pos = torch.cat(
            (
                pos_y[:, None, :].expand(height, width, -1),
                pos_x[None, :, :].expand(height, width, -1),
            ),
            dim=-1,
        )
        return pos.permute(2, 0, 1).unsqueeze(0)

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale}"
        )


def _interleave_sin_cos(t: Tensor) -> Tensor:
    """[..., F] -> [..., F]: sin of even channels and cos of odd ones, interleaved pairwise."""
    return torch.stack((t[..., 0::2].sin(), t[..., 1::2].cos()), dim=-1).flatten(-2)
