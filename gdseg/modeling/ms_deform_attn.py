"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch.

No compiled op: two formulations of the sampling core, numerically equal to the CUDA op of
the published code (bilinear sampling, zero padding, ``align_corners=False``):

- ``"grid_sample"``: one ``F.grid_sample`` per level, the classic pure-PyTorch formulation
  (what detectron2 and transformers fall back to). Default on accelerators.
- ``"gather"``: all levels at once as a weighted gather of value rows (``F.embedding_bag``),
  with a hand-written backward (sorted scatter through ``embedding_bag``, corner-weight
  gradients through a sampled sparse matmul). Default on CPU, where it is about 3x faster
  than ``grid_sample`` for forward + backward (5x for forward alone).

Both sample in float32 whatever the autocast dtype: sampling positions in bf16 would be off
by up to half a pixel on a 128-px level, and the published pixel decoder runs in fp32 too.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .linear import Linear

__all__ = [
    "MSDeformAttn",
    "ms_deform_attn_core",
    "ms_deform_attn_gather",
    "ms_deform_attn_grid_sample",
]

SpatialShapes = list[tuple[int, int]]


def ms_deform_attn_grid_sample(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Deformable sampling with one ``grid_sample`` per level.

    Args:
        value: ``[B, S, H, D]``, the levels flattened and concatenated along S.
        spatial_shapes: ``(h, w)`` of every level, in the order of ``value``.
        sampling_locations: ``[B, Lq, H, L, P, 2]``, (x, y) normalized to [0, 1].
        attention_weights: ``[B, Lq, H, L, P]``.

    Returns:
        ``[B, Lq, H * D]`` in the dtype of ``value``.
    """
    B, _, H, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    out_dtype = value.dtype
    value = value.float()
    grids = 2 * sampling_locations.float() - 1
    per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        v = per_level[lvl].flatten(2).transpose(1, 2).reshape(B * H, D, h, w)
        grid = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # [B*H, Lq, P, 2]
        sampled.append(
            F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    weights = attention_weights.float().transpose(1, 2).reshape(B * H, 1, Lq, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # [B*H, D, Lq]
    return out.view(B, H * D, Lq).transpose(1, 2).to(out_dtype)


class _BilinearGather(torch.autograd.Function):
    """Weighted bilinear gather from a zero-bordered value table, all levels at once.

    Every sampling point reads the 2x2 corner rows ``base``, ``base + H``, ``base + vshift``,
    ``base + vshift + H`` of ``table`` (``H`` rows = one pixel to the right, ``vshift`` rows =
    one pixel down). The one-pixel zero border makes every corner of an in-range point a valid
    row, so zero padding needs no per-corner masks. Corner tensors are laid out
    ``[N, 2 (y), 2 (x), LP]`` so that elementwise work runs over contiguous LP-long rows.
    """

    @staticmethod
    def forward(ctx, table, attn, pix_x, pix_y, size, start, bh, H):
        # table [R, D]; attn, pix_x, pix_y [N, LP] (pixel coordinates); size [2, LP] (w, h);
        # start [LP] first padded row of each level; bh [N, 1] batch/head row offset.
        w_l, h_l = size[0], size[1]
        # Points outside [-1, size] touch no valid pixel: zero weight, zero gradient.
        inside = (pix_x >= -1) & (pix_x <= w_l) & (pix_y >= -1) & (pix_y <= h_l)
        a = attn * inside
        x0 = torch.minimum(pix_x.floor().clamp_(min=-1), w_l - 1)
        y0 = torch.minimum(pix_y.floor().clamp_(min=-1), h_l - 1)
        fx, fy = pix_x - x0, pix_y - y0
        wx = torch.stack((1 - fx, fx), dim=1)  # [N, 2, LP]
        wy = torch.stack((1 - fy, fy), dim=1)
        w = (a[:, None] * wy)[:, :, None] * wx[:, None]  # [N, 2, 2, LP]
        padded_w = w_l + 2
        # start, coordinates and widths are exact integers in float32 (< 2**24 per image)
        index_dtype = bh.dtype
        base = (start + (y0 + 1) * padded_w + (x0 + 1)).to(index_dtype) * H + bh
        vshift = (padded_w * H).to(index_dtype)
        offs = torch.stack(
            (torch.zeros_like(vshift), torch.full_like(vshift, H), vshift, vshift + H)
        ).view(2, 2, -1)
        N, LP = attn.shape
        idx = (base[:, None, None] + offs).view(N, 4 * LP)
        out = F.embedding_bag(idx, table, per_sample_weights=w.view(N, 4 * LP), mode="sum")
        ctx.save_for_backward(table, a, inside, fx, fy, w, idx, base, vshift)
        ctx.H = H
        return out

    @staticmethod
    def backward(ctx, grad_out):
        table, a, inside, fx, fy, w, idx, base, vshift = ctx.saved_tensors
        g = grad_out.contiguous().to(table.dtype)
        grad_table = grad_attn = grad_x = grad_y = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            grad_attn, grad_x, grad_y = _corner_weight_grads(table, g, a, fx, fy, w, idx)
            grad_attn = grad_attn * inside
        if ctx.needs_input_grad[0]:
            grad_table = _scatter_to_table(g, a, fx, fy, base, vshift, ctx.H, table.shape[0])
        return grad_table, grad_attn, grad_x, grad_y, None, None, None, None


def _corner_weight_grads(table, g, a, fx, fy, w, idx):
    """Gradients of the attention weights and of the x and y pixel coordinates ([N, LP] each)."""
    N, LP = a.shape
    crow = torch.arange(0, N * LP * 4 + 1, LP * 4, device=g.device, dtype=idx.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        # only the pattern matters (beta=0): reuse w as its values
        pattern = torch.sparse_csr_tensor(
            crow, idx.view(-1), w.view(-1), (N, table.shape[0]), check_invariants=False
        )
        # gw[n, k] = <grad_out[n], table[idx[n, k]]> without materializing [N, 4LP, D]
        gw = torch.sparse.sampled_addmm(pattern, g, table.t(), beta=0.0).values().view(N, 2, 2, LP)
    # w[y, x] = a * wy[y] * wx[x], wx = (1 - fx, fx), wy = (1 - fy, fy)
    gx0, gx1 = gw[:, :, 0], gw[:, :, 1]  # [N, 2 (y), LP]
    t_y = gx0 + fx[:, None] * (gx1 - gx0)  # sum over x of gw * wx
    grad_a = t_y[:, 0] + fy * (t_y[:, 1] - t_y[:, 0])
    grad_fy = a * (t_y[:, 1] - t_y[:, 0])
    d_x = gx1 - gx0
    grad_fx = a * (d_x[:, 0] + fy * (d_x[:, 1] - d_x[:, 0]))
    return grad_a, grad_fx, grad_fy


def _scatter_to_table(g, a, fx, fy, base, vshift, H, R):
    """grad_table[r] = sum of w * grad_out over the corners reading row r ([R, D]).

    Sorting the points by their top-left row turns the scatter into four segment sums done by
    ``embedding_bag`` with offsets; the bottom corners (``base + vshift``) keep the same order,
    because ``vshift`` is constant within a (batch, level) block of rows.
    """
    N, LP = base.shape
    keys = base.reshape(-1)
    _, perm = torch.sort(keys, stable=True)
    rows = torch.div(perm, LP, rounding_mode="floor")
    # corner weights of the sorted points, computed from the gathered factors
    a_s, fx_s, fy_s = (t.reshape(-1).index_select(0, perm) for t in (a, fx, fy))
    top, bottom = a_s - a_s * fy_s, a_s * fy_s
    grad_table = torch.zeros(R, g.shape[1], dtype=g.dtype, device=g.device)
    bottom_keys = (base + vshift).reshape(-1)
    for corner_keys, ay in ((keys, top), (bottom_keys, bottom)):
        offsets = torch.zeros(R + 1, dtype=rows.dtype, device=g.device)
        torch.cumsum(torch.bincount(corner_keys, minlength=R), 0, out=offsets[1:])
        right = ay * fx_s
        for weight, shift in ((ay - right, 0), (right, H)):
            part = F.embedding_bag(
                rows,
                g,
                offsets=offsets,
                per_sample_weights=weight,
                mode="sum",
                include_last_offset=True,
            )
            if shift:
                grad_table[shift:] += part[:-shift]
            else:
                grad_table += part
    return grad_table


def ms_deform_attn_gather(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Deformable sampling as one weighted gather over all levels (same contract as
    :func:`ms_deform_attn_grid_sample`)."""
    L = len(spatial_shapes)
    size = torch.tensor(
        [[w, h] for h, w in spatial_shapes], dtype=torch.float32, device=value.device
    ).view(L, 1, 2)
    # grid_sample convention (align_corners=False): pixel = location * size - 0.5
    pixels = sampling_locations.float() * size - 0.5
    return _gather_pixels(value, spatial_shapes, pixels, attention_weights)


def _gather_pixels(
    value: Tensor, spatial_shapes: SpatialShapes, pixels: Tensor, attention_weights: Tensor
) -> Tensor:
    """:func:`ms_deform_attn_gather` taking ``[B, Lq, H, L, P, 2]`` pixel coordinates (x, y)
    instead of normalized locations: ``pixel = location * size - 0.5`` (pixel centres at integers)."""
    B, S, H, D = value.shape
    _, Lq, _, L, P, _ = pixels.shape
    dev = value.device
    padded = []
    for v, (h, w) in zip(
        value.float().split([h * w for h, w in spatial_shapes], dim=1), spatial_shapes
    ):
        v = F.pad(v.reshape(B, h, w, H * D), (0, 0, 1, 1, 1, 1))
        padded.append(v.reshape(B, (h + 2) * (w + 2), H, D))
    s_pad = sum((h + 2) * (w + 2) for h, w in spatial_shapes)
    table = torch.cat(padded, dim=1).view(B * s_pad * H, D)  # row = (b * s_pad + s) * H + h

    starts, acc = [], 0
    for h, w in spatial_shapes:
        starts.append(acc)
        acc += (h + 2) * (w + 2)
    size = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=torch.float32, device=dev)
    size = size.repeat_interleave(P, dim=0)  # [L*P, 2]
    start = torch.tensor(starts, dtype=torch.float32, device=dev).repeat_interleave(P)
    # int32 indices halve the memory traffic of the index math; int64 only for huge batches
    index_dtype = torch.int32 if table.shape[0] * 4 < 2**31 else torch.int64
    bh = torch.arange(B, device=dev).view(B, 1, 1) * (s_pad * H)
    bh = bh + torch.arange(H, device=dev).view(1, 1, H)
    bh = bh.expand(B, Lq, H).reshape(B * Lq * H, 1).to(index_dtype)

    N = B * Lq * H
    pix = pixels.float().reshape(N, L * P, 2)
    attn = attention_weights.float().reshape(N, L * P)
    out = _BilinearGather.apply(
        table, attn, pix[..., 0], pix[..., 1], size.t().contiguous(), start, bh, H
    )
    return out.view(B, Lq, H * D).to(value.dtype)


def ms_deform_attn_core(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    impl: str = "auto",
) -> Tensor:
    """Multi-scale deformable sampling; ``impl`` is "auto", "gather" or "grid_sample"."""
    impl = _resolve_impl(impl, value.device)
    if impl == "gather":
        return ms_deform_attn_gather(value, spatial_shapes, sampling_locations, attention_weights)
    if impl == "grid_sample":
        return ms_deform_attn_grid_sample(
            value, spatial_shapes, sampling_locations, attention_weights
        )
    raise ValueError(f"impl must be 'auto', 'gather' or 'grid_sample', got {impl!r}")


def _resolve_impl(impl: str, device: torch.device) -> str:
    if impl == "auto":
        # grid_sample is fast on accelerators; the gather formulation wins on CPU
        return "gather" if device.type == "cpu" else "grid_sample"
    return impl


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Zhu et al., Deformable DETR).

    Every query attends to ``n_points`` learned positions around its reference point on each of
    ``n_levels`` feature maps, per head.

    Args:
        d_model: channels C.
        n_levels: number of feature levels L.
        n_heads: attention heads H (C must be divisible by H).
        n_points: sampling points P per head and level.
        impl: sampling formulation, see :func:`ms_deform_attn_core`.
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        impl: str = "auto",
    ):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, got {d_model} and {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = (
            d_model,
            n_levels,
            n_heads,
            n_points,
        )
        if impl not in ("auto", "gather", "grid_sample"):
            raise ValueError(f"impl must be 'auto', 'gather' or 'grid_sample', got {impl!r}")
        self.impl = impl
        self.sampling_offsets = Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = Linear(d_model, d_model)
        self.output_proj = Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR init: offsets start on a ring of directions, one per head."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        spatial_shapes: SpatialShapes,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from queries to the flattened levels.

        Args:
            query: ``[B, Lq, C]`` (position embedding already added).
            reference_points: ``[B, Lq, L, 2]``, (x, y) in [0, 1].
            input_flatten: ``[B, S, C]``, levels flattened and concatenated, S = sum(h * w).
            spatial_shapes: ``(h, w)`` per level.
            padding_mask: optional ``[B, S]`` bool, True at padded positions (read as zero).

        Returns:
            ``[B, Lq, C]``.
        """
        B, Lq, _ = query.shape
        S = input_flatten.shape[1]
        if sum(h * w for h, w in spatial_shapes) != S:
            raise ValueError(f"spatial_shapes {spatial_shapes} do not add up to {S} positions")
        H, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(B, S, H, self.d_model // H)
        offsets = self.sampling_offsets(query).view(B, Lq, H, L, P, 2).float()
        weights = (
            self.attention_weights(query)
            .view(B, Lq, H, L * P)
            .float()
            .softmax(-1)
            .view(B, Lq, H, L, P)
        )
        size = torch.tensor(
            [[w, h] for h, w in spatial_shapes], dtype=torch.float32, device=query.device
        )
        impl = _resolve_impl(self.impl, value.device)
        if impl == "gather":
            # offsets are in pixels: skip the normalize / de-normalize round trip
            ref_pixels = reference_points.float() * size - 0.5
            pixels = ref_pixels[:, :, None, :, None, :] + offsets
            out = _gather_pixels(value, spatial_shapes, pixels, weights)
        else:
            locations = (
                reference_points.float()[:, :, None, :, None, :]
                + offsets / size[None, None, None, :, None, :]
            )
            out = ms_deform_attn_grid_sample(value, spatial_shapes, locations, weights)
        return self.output_proj(out.to(value.dtype))
