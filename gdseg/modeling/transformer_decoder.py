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

from .pixel_decoder import c2_xavier_fill
from .position_encoding import PositionEmbeddingSine

__all__ = ["MultiScaleMaskedTransformerDecoder"]


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
        self.out_proj = nn.Linear(embed_dim, embed_dim)
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
            q, k = F.linear(query, w[: 2 * C], b[: 2 * C]).split(C, dim=-1)
        else:
            q = F.linear(query, w[:C], b[:C])
            k = F.linear(key, w[C : 2 * C], b[C : 2 * C])
        v = F.linear(value, w[2 * C :], b[2 * C :])
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
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
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
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class _MaskLogits(torch.autograd.Function):
    """``bmm(embed, features)`` whose backward skips the all-zero rows of the gradient.

    The set criterion reaches only the masks of matched queries (a few percent of the B*Q
    rows), so most rows of the mask-logit gradient are exactly zero; leaving them out of the
    two backward matmuls (the largest of the decoder) changes nothing but the rounding.
    """

    @staticmethod
    def forward(ctx, embed: Tensor, features: Tensor) -> Tensor:
        ctx.save_for_backward(embed, features)
        return torch.bmm(embed, features)

    @staticmethod
    def backward(ctx, grad: Tensor):
        embed, features = ctx.saved_tensors
        grad = grad.to(embed.dtype)
        live = grad.abs().amax(-1) != 0  # [B, Q]; NaN rows count as live
        need_embed, need_features = ctx.needs_input_grad
        if 2 * int(live.sum()) > live.numel():  # dense gradient (another loss): plain bmm
            grad_embed = torch.bmm(grad, features.transpose(1, 2)) if need_embed else None
            grad_features = torch.bmm(embed.transpose(1, 2), grad) if need_features else None
            return grad_embed, grad_features
        grad_embed = torch.zeros_like(embed) if need_embed else None
        grad_features = torch.empty_like(features) if need_features else None
        for b in range(grad.shape[0]):
            rows = live[b].nonzero().squeeze(1)
            g = grad[b, rows]  # [r, N]
            if need_embed and len(rows):
                grad_embed[b, rows] = g @ features[b].t()
            if need_features:
                torch.mm(embed[b, rows].t(), g, out=grad_features[b])  # zeros if r == 0
        return grad_embed, grad_features


def mask_logits(embed: Tensor, features: Tensor) -> Tensor:
    """Per-query mask logits ``[B, Q, N]`` from embeddings ``[B, Q, C]`` and features
    ``[B, C, N]``. On the CPU the backward only multiplies the gradient rows that are not all
    zero (see :class:`_MaskLogits`); elsewhere a plain ``bmm`` (no host synchronization)."""
    if (
        embed.device.type == "cpu"
        and torch.is_grad_enabled()
        and (embed.requires_grad or features.requires_grad)
        and not torch.compiler.is_compiling()
    ):
        return _MaskLogits.apply(embed, features)
    return torch.bmm(embed, features)


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
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def forward(self, x: list[Tensor], mask_features: Tensor) -> dict:
        """Decode.

        Args:
            x: three ``[B, in_channels, h_i, w_i]`` maps, lowest resolution first.
            mask_features: ``[B, mask_dim, H, W]`` per-pixel embeddings.

        Returns:
            ``{"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, H, W], "aux_outputs": [...]}``,
            ``aux_outputs`` holding the ``dec_layers`` earlier predictions, first to last.
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

        predictions_class, predictions_mask = [], []
        outputs_class, outputs_mask, attn_mask = self.forward_prediction_heads(
            output, mask_features, sizes[0]
        )
        predictions_class.append(outputs_class)
        predictions_mask.append(outputs_mask)
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            output = self.transformer_cross_attention_layers[i](
                output, src[level], attn_mask, pos[level], query_pos
            )
            output = self.transformer_self_attention_layers[i](output, query_pos)
            output = self.transformer_ffn_layers[i](output)
            last = i == self.num_layers - 1
            target = None if last else sizes[(i + 1) % self.num_feature_levels]
            outputs_class, outputs_mask, attn_mask = self.forward_prediction_heads(
                output, mask_features, target
            )
            predictions_class.append(outputs_class)
            predictions_mask.append(outputs_mask)
        return {
            "pred_logits": predictions_class[-1],
            "pred_masks": predictions_mask[-1],
            "aux_outputs": [
                {"pred_logits": c, "pred_masks": m}
                for c, m in zip(predictions_class[:-1], predictions_mask[:-1])
            ],
        }

    def forward_prediction_heads(
        self, output: Tensor, mask_features: Tensor, attn_mask_target_size: tuple[int, int] | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Class logits ``[B, Q, K+1]``, mask logits ``[B, Q, H, W]`` and the attention mask of
        the next layer (bool ``[B, 1, Q, h*w]``, True = may attend; None if no size given)."""
        decoder_output = self.decoder_norm(output)
        outputs_class = self.class_embed(decoder_output)
        mask_embed = self.mask_embed(decoder_output)
        B, C, H, W = mask_features.shape
        outputs_mask = mask_logits(
            mask_embed, mask_features.reshape(B, C, H * W).to(mask_embed.dtype)
        )
        outputs_mask = outputs_mask.view(B, -1, H, W)
        if attn_mask_target_size is None:
            return outputs_class, outputs_mask, None
        with torch.no_grad():
            # masked where the (resized) previous prediction is background; same mask for all heads
            resized = F.interpolate(
                outputs_mask, size=attn_mask_target_size, mode="bilinear", align_corners=False
            )
            masked = resized.flatten(2).sigmoid() < 0.5
            # a query that would see nothing sees everything instead
            masked &= ~masked.all(dim=-1, keepdim=True)
            attn_mask = (~masked).unsqueeze(1)
        return outputs_class, outputs_mask, attn_mask
