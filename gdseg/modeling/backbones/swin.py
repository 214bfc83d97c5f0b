"""Swin Transformer backbone for any input size, with the detectron2 parameter names.

Why our own and not timm's: timm's Swin moves the patch merging to the start of the next
stage (other parameter names) and has no per-stage output norms; Mask2Former's
``D2SwinTransformer`` pads every feature map to a multiple of the window instead of
shrinking the window, which is also what ``transformers.SwinBackbone`` does
(``always_partition=True``). Our parameter names equal the published detectron2 ones
(``patch_embed.proj``, ``layers.i.blocks.j.attn.qkv``, ``layers.i.downsample.reduction``,
``norm0..norm3``), so published Swin checkpoints load without renaming.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from .base import FEATURE_NAMES, Backbone

# name -> (embed_dim, depths, num_heads, window_size, pretrain_img_size)
SWIN_PRESETS: dict[str, tuple[int, tuple[int, ...], tuple[int, ...], int, int]] = {
    "swin_tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 224),
    "swin_small": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7, 224),
    "swin_base": (128, (2, 2, 18, 2), (4, 8, 16, 32), 7, 224),
    "swin_base_384": (128, (2, 2, 18, 2), (4, 8, 16, 32), 12, 384),
    "swin_large": (192, (2, 2, 18, 2), (6, 12, 24, 48), 7, 224),
    "swin_large_384": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12, 384),
}


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """[B, H, W, C] (H, W multiples of ws) -> [B * nW, ws * ws, C], windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: [B * nW, ws * ws, C] -> [B, H, W, C]."""
    c = windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shifted_window_mask(
    hp: int, wp: int, ws: int, shift: int, device: torch.device
) -> torch.Tensor:
    """Additive mask [nW, ws*ws, ws*ws] (0 or -100) that stops attention across the seams
    created by the cyclic shift of a padded [hp, wp] map."""
    region = torch.zeros(1, hp, wp, 1, device=device)
    cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    for i, hs in enumerate(cuts):
        for j, wsl in enumerate(cuts):
            region[:, hs, wsl, :] = i * 3 + j
    ids = window_partition(region, ws).squeeze(-1)
    diff = ids.unsqueeze(1) - ids.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside square windows with a relative position bias."""

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        coords = torch.stack(
            torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
        ).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)
        # Persistent: the published checkpoints contain it.
        self.register_buffer(
            "relative_position_index", rel[..., 0] * (2 * window_size - 1) + rel[..., 1]
        )
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Args: x [B * nW, N, C]; mask [nW, N, N] additive or None. Returns [B * nW, N, C]."""
        bw, n, c = x.shape
        qkv = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B*nW, nH, N, hd]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, -1).permute(2, 0, 1)  # [nH, N, N]
        if mask is not None:
            # Window w of every image gets mask[w]: [B * nW, nH, N, N]. Kept 4-D so that the
            # fused SDPA kernels apply (they reject 5-D inputs).
            nw = mask.shape[0]
            bias = (bias.unsqueeze(0) + mask.unsqueeze(1)).repeat(bw // nw, 1, 1, 1)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=bias.to(q.dtype),
            dropout_p=self.attn_drop if self.training else 0.0,
            scale=self.scale,
        )
        out = out.transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(out))


class SwinBlock(nn.Module):
    """(Shifted-)window attention + MLP, pre-norm, padding the map to a multiple of the window."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: float | None,
        drop: float,
        attn_drop: float,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(
            dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, drop
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(
        self, x: torch.Tensor, hw: tuple[int, int], mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Args: x [B, H*W, C]; hw (H, W); mask from :func:`shifted_window_mask`. Returns [B, H*W, C]."""
        h, w = hw
        b, _, c = x.shape
        ws, shift = self.window_size, self.shift_size
        y = self.norm1(x).view(b, h, w, c)
        # Pad after the norm (zeros), as the reference does; padded tokens are attended to.
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        if shift > 0:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        y = self.attn(window_partition(y, ws), mask if shift > 0 else None)
        y = window_reverse(y, ws, hp, wp)
        if shift > 0:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        y = y[:, :h, :w, :].reshape(b, h * w, c)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` convolution (input padded bottom/right), then LayerNorm."""

    def __init__(self, patch_size: int, embed_dim: int, patch_norm: bool) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [B, 3, H, W]. Returns [B, C, ceil(H/p), ceil(W/p)]."""
        p = self.patch_size
        x = self.proj(F.pad(x, (0, (p - x.shape[-1] % p) % p, 0, (p - x.shape[-2] % p) % p)))
        if self.norm is not None:
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat -> LayerNorm(4C) -> Linear(4C, 2C): halves the resolution."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Args: x [B, H*W, C]. Returns [B, ceil(H/2) * ceil(W/2), 2C]."""
        h, w = hw
        b, _, c = x.shape
        x = F.pad(x.view(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))
        # Order (0,0), (1,0), (0,1), (1,1) as in the original code: pretrained weights rely on it.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    """``depth`` blocks alternating regular and shifted windows, then optional patch merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        drop_path: Sequence[float],
        downsample: bool,
        use_checkpoint: bool,
        **block_kwargs,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                num_heads,
                window_size,
                shift_size=0 if i % 2 == 0 else self.shift_size,
                drop_path=drop_path[i],
                **block_kwargs,
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(
        self, x: torch.Tensor, hw: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Args: x [B, H*W, C]. Returns (stage output [B, H*W, C], merged [B, H*W/4, 2C] or None)."""
        ws = self.window_size
        hp, wp = -(-hw[0] // ws) * ws, -(-hw[1] // ws) * ws
        mask = shifted_window_mask(hp, wp, ws, self.shift_size, x.device)
        for blk in self.blocks:
            if self.use_checkpoint and x.requires_grad:
                x = checkpoint(blk, x, hw, mask, use_reentrant=False)
            else:
                x = blk(x, hw, mask)
        return x, (self.downsample(x, hw) if self.downsample is not None else None)


class SwinTransformer(Backbone):
    """Swin Transformer giving LayerNorm'ed stage outputs at strides 4, 8, 16, 32.

    Works on any input size (feature maps are padded to a multiple of the window size);
    Mask2Former feeds multiples of 32. Output channels: embed_dim * (1, 2, 4, 8).

    Args:
        embed_dim: channels of the first stage (96 T/S, 128 B, 192 L).
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: 7 for 224-pretrained models, 12 for 384.
        pretrain_img_size: pretraining resolution (only sizes the absolute position
            embedding, used when ``ape``).
        patch_size, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate,
        drop_path_rate, ape, patch_norm: as in the Swin paper / detectron2 config.
        use_checkpoint: gradient checkpointing of each block (saves memory in training).
    """

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        pretrain_img_size: int = 224,
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.3,
        ape: bool = False,
        patch_norm: bool = True,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(f"Swin needs 4 stages, got depths={depths}, num_heads={num_heads}")
        self.patch_embed = PatchEmbed(patch_size, embed_dim, patch_norm)
        self.ape = ape
        if ape:
            grid = pretrain_img_size // patch_size
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, grid, grid))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i in range(4):
            self.layers.append(
                SwinStage(
                    int(embed_dim * 2**i),
                    depths[i],
                    num_heads[i],
                    window_size,
                    dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                    downsample=i < 3,
                    use_checkpoint=use_checkpoint,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                )
            )
        self.num_features = [int(embed_dim * 2**i) for i in range(4)]
        for i, c in enumerate(self.num_features):
            self.add_module(f"norm{i}", nn.LayerNorm(c))
        self._out_channels = dict(zip(FEATURE_NAMES, self.num_features))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args: x [B, 3, H, W]. Returns {"res2": [B, C, ceil(H/4), ceil(W/4)], ..., "res5"}."""
        x = self.patch_embed(x)
        h, w = x.shape[-2:]
        if self.ape:
            x = x + F.interpolate(self.absolute_pos_embed, size=(h, w), mode="bicubic")
        x = self.pos_drop(x.flatten(2).transpose(1, 2))
        out = {}
        for i, name in enumerate(FEATURE_NAMES):
            y, x = self.layers[i](x, (h, w))
            y = getattr(self, f"norm{i}")(y)
            out[name] = y.view(-1, h, w, self.num_features[i]).permute(0, 3, 1, 2).contiguous()
            h, w = (h + 1) // 2, (w + 1) // 2
        return out


def build_swin(name: str, **kwargs) -> SwinTransformer:
    """A Swin preset from :data:`SWIN_PRESETS`; ``kwargs`` go to :class:`SwinTransformer`."""
    embed_dim, depths, heads, window, img = SWIN_PRESETS[name]
    return SwinTransformer(embed_dim, depths, heads, window, img, **kwargs)
