"""Mask2Former transformer decoder: learnable queries refined by masked cross-attention over
three feature scales (round-robin), self-attention and an FFN per layer.

Parameter names are those of the published detectron2 model
(``transformer_{self,cross}_attention_layers.i``, ``transformer_ffn_layers.i``, ``decoder_norm``,
``query_feat``, ``query_embed``, ``level_embed``, ``input_proj``, ``class_embed``,
``mask_embed.layers.j``). Attention runs batch-first through ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .linear import Linear, linear
from .pixel_decoder import c2_xavier_fill
from .position_encoding import PositionEmbeddingSine

__all__ = ["MultiScaleMaskedTransformerDecoder", "layer_predictions", "predicted_masks"]


class Attention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameters (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj``) and math, batch-first, through SDPA."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim must be divisible by num_heads, got {embed_dim} and {num_heads}"
            )
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def _heads(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, -1).transpose(1, 2)

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None
    ) -> Tensor:
        """query ``[B, Q, C]``, key/value ``[B, K, C]`` (key may be ``query``: self-attention
        fuses the two projections); attn_mask bool ``[B, 1, Q, K]``, True = may attend."""
        C = self.embed_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if key is query:
            q, k = linear(query, w[: 2 * C], b[: 2 * C]).split(C, dim=-1)
        else:
            q = linear(query, w[:C], b[:C])
            k = linear(key, w[C : 2 * C], b[C : 2 * C])
        v = linear(value, w[2 * C :], b[2 * C :])
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        B, _, Q, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, Q, C))


class SelfAttentionLayer(nn.Module):
    """Self-attention among queries with query position embeddings on q and k."""

    def __init__(
        self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False
    ):
        super().__init__()
        self.self_attn = Attention(d_model, nhead, dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = dropout
        self.normalize_before = normalize_before
        _xavier_matrices(self)

    def forward(self, tgt: Tensor, query_pos: Tensor) -> Tensor:
        x = self.norm(tgt) if self.normalize_before else tgt
        qk = x + query_pos
        tgt = tgt + F.dropout(self.self_attn(qk, qk, x), self.dropout, self.training)
        return tgt if self.normalize_before else self.norm(tgt)


class CrossAttentionLayer(nn.Module):
    """Masked cross-attention from queries to one feature level."""

    def __init__(
        self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False
    ):
        super().__init__()
        self.multihead_attn = Attention(d_model, nhead, dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = dropout
        self.normalize_before = normalize_before
        _xavier_matrices(self)

    def forward(
        self, tgt: Tensor, memory: Tensor, attn_mask: Tensor | None, pos: Tensor, query_pos: Tensor
    ):
        """tgt ``[B, Q, C]``, memory ``[B, K, C]``, pos ``[1, K, C]``, query_pos ``[B|1, Q, C]``."""
        x = self.norm(tgt) if self.normalize_before else tgt
        out = self.multihead_attn(x + query_pos, memory + pos, memory, attn_mask)
        tgt = tgt + F.dropout(out, self.dropout, self.training)
        return tgt if self.normalize_before else self.norm(tgt)


class FFNLayer(nn.Module):
    """Two-layer ReLU MLP with a residual connection."""

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        normalize_before: bool = False,
    ):
        super().__init__()
        self.linear1 = Linear(d_model, dim_feedforward)
        self.linear2 = Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = dropout
        self.normalize_before = normalize_before
        _xavier_matrices(self)

    def forward(self, tgt: Tensor) -> Tensor:
        x = self.norm(tgt) if self.normalize_before else tgt
        x = self.linear2(F.dropout(F.relu(self.linear1(x)), self.dropout, self.training))
        tgt = tgt + F.dropout(x, self.dropout, self.training)
        return tgt if self.normalize_before else self.norm(tgt)


def _xavier_matrices(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class MLP(nn.Module):
    """Multi-layer perceptron with ReLU between layers (``layers.j`` names as published)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def predicted_masks(mask_embed: Tensor, mask_features: Tensor) -> Tensor:
    """Mask logits ``[B, Q, H, W]`` from ``mask_embed`` ``[B, Q, C]`` and ``mask_features``
    ``[B, C, H, W]`` (``pred_masks`` of an auxiliary prediction)."""
    B, C, H, W = mask_features.shape
    features = mask_features.reshape(B, C, H * W).to(mask_embed.dtype)
    return torch.bmm(mask_embed, features).view(B, -1, H, W)


def layer_predictions(outputs: dict) -> list[dict[str, Tensor]]:
    """Every layer's prediction of a decoder output, first to last, each with its
    ``pred_masks`` (formed here for the auxiliary ones)."""
    features = outputs["mask_features"]
    aux = [
        {**a, "pred_masks": predicted_masks(a["mask_embed"], features)}
        for a in outputs.get("aux_outputs", [])
    ]
    last = {k: v for k, v in outputs.items() if k not in ("aux_outputs", "mask_features")}
    return [*aux, last]


def bilinear_downsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` of ``[B, C, H, W]``.

    When ``H / h`` and ``W / w`` are integers (the decoder's case: strides 4 -> 8, 16, 32),
    every output pixel samples the source at ``s * i + (s - 1) / 2``: one source pixel for an
    odd factor ``s``, the mean of two for an even one. Those strided slices are several times
    cheaper than ``F.interpolate`` on the CPU; other sizes use ``F.interpolate``.
    """
    H, W = x.shape[-2:]
    h, w = size
    if H % h or W % w:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    sy, sx = H // h, W // w
    if sy % 2:
        x = x[..., (sy - 1) // 2 :: sy, :]
    else:
        x = (x[..., sy // 2 - 1 :: sy, :] + x[..., sy // 2 :: sy, :]) * 0.5
    if sx % 2:
        x = x[..., (sx - 1) // 2 :: sx]
    else:
        x = (x[..., sx // 2 - 1 :: sx] + x[..., sx // 2 :: sx]) * 0.5
    return x


class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Masked-attention decoder of Mask2Former.

    Args:
        in_channels: channels of the multi-scale features (conv_dim of the pixel decoder).
        num_classes: K; the class head predicts K + 1 logits (last = no object).
        hidden_dim: query width.
        num_queries: Q.
        nheads: attention heads.
        dim_feedforward: FFN width.
        dec_layers: decoder layers (``DEC_LAYERS - 1``; one prediction more than layers).
        pre_norm: pre-LayerNorm layers (published: post-norm).
        mask_dim: channels of the mask features.
        enforce_input_project: 1x1 input projections even when ``in_channels == hidden_dim``.
        dropout: dropout in attention and FFN (published: 0).
    """

    def __init__(
        self,
        in_channels: int,
        *,
        num_classes: int,
        hidden_dim: int = 256,
        num_queries: int = 100,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        dec_layers: int = 9,
        pre_norm: bool = False,
        mask_dim: int = 256,
        enforce_input_project: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, dropout, pre_norm) for _ in range(dec_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, dropout, pre_norm) for _ in range(dec_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, dropout, pre_norm) for _ in range(dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.num_queries = num_queries
        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # learnable query features
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # learnable query positions
        self.num_feature_levels = 3
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
                c2_xavier_fill(conv)
                self.input_proj.append(conv)
            else:
                self.input_proj.append(nn.Identity())
        self.class_embed = Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def forward(self, x: list[Tensor], mask_features: Tensor) -> dict:
        """Decode.

        Args:
            x: three ``[B, in_channels, h_i, w_i]`` maps, lowest resolution first.
            mask_features: ``[B, mask_dim, H, W]`` per-pixel embeddings.

        Returns:
            ``{"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, H, W], "mask_embed":
            [B, Q, mask_dim], "mask_features", "aux_outputs": [...]}``, ``aux_outputs``
            holding the ``dec_layers`` earlier predictions (``pred_logits``, ``mask_embed``),
            first to last. ``pred_masks`` is ``mask_embed @ mask_features``; the earlier
            predictions do not form it (:func:`predicted_masks` does, on demand): the
            criterion and the matcher use the two factors to compute only what they need, and
            inference reads the last prediction only.
        """
        if len(x) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature maps, got {len(x)}")
        src, pos, sizes = [], [], []
        for i in range(self.num_feature_levels):
            sizes.append(tuple(x[i].shape[-2:]))
            pos.append(self.pe_layer(x[i]).flatten(2).transpose(1, 2))  # [1, hw, C]
            s = self.input_proj[i](x[i]).flatten(2).transpose(1, 2)
            src.append(s + self.level_embed.weight[i].to(s.dtype))  # [B, hw, C]
            pos[-1] = pos[-1].to(s.dtype)
        B = src[0].shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(B, -1, -1)
        output = self.query_feat.weight.unsqueeze(0).expand(B, -1, -1)

        # Attention masks only need the previous masks at the next level's size; as bilinear
        # resizing is linear, resizing the mask features once per size and multiplying at low
        # resolution equals resizing every layer's full-resolution masks.
        with torch.no_grad():
            attn_features = {
                size: bilinear_downsample(mask_features, size).flatten(2) for size in set(sizes)
            }
        predictions = []
        prediction, attn_mask = self.forward_prediction_heads(
            output, mask_features, attn_features[sizes[0]], with_masks=False
        )
        predictions.append(prediction)
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            output = self.transformer_cross_attention_layers[i](
                output, src[level], attn_mask, pos[level], query_pos
            )
            output = self.transformer_self_attention_layers[i](output, query_pos)
            output = self.transformer_ffn_layers[i](output)
            last = i == self.num_layers - 1
            target = None if last else attn_features[sizes[(i + 1) % self.num_feature_levels]]
            prediction, attn_mask = self.forward_prediction_heads(
                output, mask_features, target, with_masks=last
            )
            predictions.append(prediction)
        return {**predictions[-1], "mask_features": mask_features, "aux_outputs": predictions[:-1]}

    def forward_prediction_heads(
        self,
        output: Tensor,
        mask_features: Tensor,
        attn_features: Tensor | None = None,
        with_masks: bool = True,
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        """Predictions of one layer and the attention mask of the next.

        Args:
            output: ``[B, Q, hidden_dim]`` query features.
            mask_features: ``[B, mask_dim, H, W]``.
            attn_features: ``[B, mask_dim, h*w]``, the mask features resized to the next
                layer's feature level (see :func:`bilinear_downsample`), or None for no mask.
            with_masks: also form the full-resolution ``pred_masks``.

        Returns:
            ``{"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, H, W], "mask_embed":
            [B, Q, mask_dim]}`` (``pred_masks = mask_embed @ mask_features``; absent without
            ``with_masks``) and the attention mask (bool ``[B, 1, Q, h*w]``, True = may
            attend) or None.
        """
        decoder_output = self.decoder_norm(output)
        outputs_class = self.class_embed(decoder_output)
        mask_embed = self.mask_embed(decoder_output)
        prediction = {"pred_logits": outputs_class, "mask_embed": mask_embed}
        if with_masks:
            prediction["pred_masks"] = predicted_masks(mask_embed, mask_features)
        if attn_features is None:
            return prediction, None
        with torch.no_grad():
            # masked where the (resized) prediction is background; same mask for all heads
            resized = torch.bmm(mask_embed, attn_features.to(mask_embed.dtype))
            masked = resized.sigmoid() < 0.5
            # a query that would see nothing sees everything instead
            masked &= ~masked.all(dim=-1, keepdim=True)
            attn_mask = (~masked).unsqueeze(1)
        return prediction, attn_mask
