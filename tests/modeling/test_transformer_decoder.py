import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gdseg.modeling.transformer_decoder import (
    Attention,
    MultiScaleMaskedTransformerDecoder,
    bilinear_downsample,
    layer_predictions,
)

SIZES = [(2, 3), (4, 6), (8, 12)]


def _decoder(**kwargs):
    args = dict(
        num_classes=5,
        hidden_dim=32,
        num_queries=7,
        nheads=4,
        dim_feedforward=64,
        dec_layers=4,
        mask_dim=16,
    )
    args.update(kwargs)
    return MultiScaleMaskedTransformerDecoder(32, **args)


def _inputs(B=2, C=32, mask_dim=16):
    return [torch.randn(B, C, h, w) for h, w in SIZES], torch.randn(B, mask_dim, 16, 24)


def _mha(ours: Attention) -> nn.MultiheadAttention:
    mha = nn.MultiheadAttention(ours.embed_dim, ours.num_heads)
    mha.load_state_dict(ours.state_dict())  # same parameter names and layout
    return mha


def test_attention_equals_multihead_attention():
    torch.manual_seed(0)
    attn = Attention(32, 4)
    q, kv = torch.randn(2, 7, 32), torch.randn(2, 11, 32)
    allowed = torch.rand(2, 1, 7, 11) > 0.3
    allowed[..., 0] = True
    ref, _ = _mha(attn)(
        q.transpose(0, 1),
        kv.transpose(0, 1),
        kv.transpose(0, 1),
        attn_mask=(~allowed).expand(2, 4, 7, 11).flatten(0, 1),
    )
    torch.testing.assert_close(attn(q, kv, kv, allowed), ref.transpose(0, 1), atol=1e-5, rtol=1e-5)
    ref, _ = _mha(attn)(q.transpose(0, 1), q.transpose(0, 1), kv[:, :7].transpose(0, 1))
    torch.testing.assert_close(attn(q, q, kv[:, :7]), ref.transpose(0, 1), atol=1e-5, rtol=1e-5)


def reference_decoder(dec, x, mask_features):
    """The published decoder, sequence-first with nn.MultiheadAttention (post-norm)."""
    B = mask_features.shape[0]
    src, pos = [], []
    for i in range(3):
        pos.append(dec.pe_layer(x[i]).expand(B, -1, -1, -1).flatten(2).permute(2, 0, 1))
        src.append((x[i].flatten(2) + dec.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
    query_pos = dec.query_embed.weight.unsqueeze(1).repeat(1, B, 1)
    out = dec.query_feat.weight.unsqueeze(1).repeat(1, B, 1)

    def heads(out, size):
        d = dec.decoder_norm(out).transpose(0, 1)
        masks = torch.einsum("bqc,bchw->bqhw", dec.mask_embed(d), mask_features)
        m = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
        m = (
            m.sigmoid().flatten(2).unsqueeze(1).repeat(1, dec.num_heads, 1, 1).flatten(0, 1) < 0.5
        ).bool()
        return dec.class_embed(d), masks, m

    preds = [heads(out, SIZES[0])]
    for i in range(dec.num_layers):
        lvl = i % 3
        attn_mask = preds[-1][2]
        attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
        ca, sa, ffn = (
            dec.transformer_cross_attention_layers[i],
            dec.transformer_self_attention_layers[i],
            dec.transformer_ffn_layers[i],
        )
        t = _mha(ca.multihead_attn)(
            out + query_pos, src[lvl] + pos[lvl], src[lvl], attn_mask=attn_mask
        )[0]
        out = ca.norm(out + t)
        q = out + query_pos
        out = sa.norm(out + _mha(sa.self_attn)(q, q, out)[0])
        out = ffn.norm(out + ffn.linear2(F.relu(ffn.linear1(out))))
        preds.append(heads(out, SIZES[(i + 1) % 3]))
    return preds


def test_decoder_matches_published_formulation():
    torch.manual_seed(0)
    dec = _decoder().eval()
    with torch.no_grad():
        dec.mask_embed.layers[2].weight.mul_(20)  # masks far from 0: attention masks matter
    x, mask_features = _inputs()
    with torch.no_grad():
        out = dec(x, mask_features)
        ref = reference_decoder(dec, x, mask_features)
    ours = layer_predictions(out)
    assert len(ours) == len(ref) == 5
    for o, (logits, masks, _) in zip(ours, ref):
        torch.testing.assert_close(o["pred_logits"], logits.float(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(o["pred_masks"], masks, atol=1e-4, rtol=1e-4)


def test_output_structure_train_and_eval():
    torch.manual_seed(0)
    dec = _decoder(dec_layers=5)
    x, mask_features = _inputs()
    for mode in (dec.train, dec.eval):
        mode()
        out = dec(x, mask_features)
        assert out["pred_logits"].shape == (2, 7, 6)
        assert out["pred_masks"].shape == (2, 7, 16, 24)
        assert len(out["aux_outputs"]) == 5
        assert all("pred_masks" not in a for a in out["aux_outputs"])  # formed on demand
        assert all(a["pred_masks"].shape == (2, 7, 16, 24) for a in layer_predictions(out))


def test_attention_mask_unmasks_fully_masked_queries():
    torch.manual_seed(0)
    dec = _decoder()
    output = torch.randn(2, 7, 32)
    mask_features = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        # query 0 predicts background everywhere, query 1 foreground everywhere
        dec.mask_embed.layers[2].weight.zero_()
        dec.mask_embed.layers[2].bias.copy_(
            torch.cat([torch.full((8,), -1.0), torch.full((8,), 1.0)])
        )
        mask_features.zero_()
        mask_features[:, :8, :, :2] = 1.0  # left half: logit -8 (background)
        mask_features[:, 8:, :, 2:] = 1.0  # right half: logit 8 (foreground)
    pred, allowed = dec.forward_prediction_heads(output, mask_features, mask_features.flatten(2))
    masks = pred["pred_masks"]
    assert allowed.shape == (2, 1, 7, 16) and allowed.dtype == torch.bool
    assert not allowed.requires_grad
    assert 0 < allowed.sum() < allowed.numel()
    expected = (masks.flatten(2).sigmoid() >= 0.5).unsqueeze(1)
    torch.testing.assert_close(allowed, expected)
    with torch.no_grad():
        mask_features.zero_()
        mask_features[:, :8] = 1.0  # logit -8 everywhere: every query would see nothing
    _, allowed = dec.forward_prediction_heads(output, mask_features, mask_features.flatten(2))
    assert allowed.all()


@pytest.mark.parametrize(
    "size,target", [((96, 64), (48, 32)), ((96, 64), (24, 16)), ((96, 64), (12, 8)),
                    ((15, 12), (5, 4)), ((16, 24), (16, 24)), ((10, 10), (4, 3))],
)  # fmt: skip
def test_bilinear_downsample_equals_interpolate(size, target):
    torch.manual_seed(0)
    x = torch.randn(2, 5, *size)
    expected = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
    torch.testing.assert_close(bilinear_downsample(x, target), expected, rtol=0, atol=1e-5)


def test_low_resolution_attention_mask_equals_resized_full_masks():
    """Masks multiplied at low resolution give the attention mask of the published
    formulation: full-resolution masks, bilinearly resized, thresholded at 0.5."""
    torch.manual_seed(0)
    dec = _decoder()
    output, mask_features = torch.randn(2, 7, 32), torch.randn(2, 16, 16, 24)
    for size in SIZES:
        with torch.no_grad():
            low = bilinear_downsample(mask_features, size).flatten(2)
            pred, allowed = dec.forward_prediction_heads(output, mask_features, low)
            resized = F.interpolate(pred["pred_masks"], size, mode="bilinear", align_corners=False)
        torch.testing.assert_close(
            torch.bmm(pred["mask_embed"], low), resized.flatten(2), rtol=0, atol=1e-5
        )
        expected = resized.flatten(2).sigmoid() >= 0.5
        expected |= ~expected.any(-1, keepdim=True)  # a query that would see nothing sees all
        assert torch.equal(allowed, expected.unsqueeze(1))


def test_options():
    torch.manual_seed(0)
    assert all(isinstance(p, nn.Identity) for p in _decoder().input_proj)
    dec = _decoder(enforce_input_project=True, pre_norm=True)
    assert dec.input_proj[0].weight.shape == (32, 32, 1, 1)
    x, mask_features = _inputs()
    out = dec(x, mask_features)
    out["pred_masks"].sum().backward()
    assert dec.input_proj[0].weight.grad is not None
    with pytest.raises(ValueError, match="feature maps"):
        dec(x[:2], mask_features)
