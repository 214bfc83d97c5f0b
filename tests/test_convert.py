import ast
from pathlib import Path

import pytest
import torch

from gdseg.config import get_cfg
from gdseg.convert import (
    convert_checkpoint,
    convert_published_state_dict,
    from_transformers,
    load_published_state_dict,
)
from gdseg.modeling.transformer_decoder import layer_predictions

FIXTURES = Path(__file__).parent / "fixtures"


# -- transformers ------------------------------------------------------------------------------
def _hf_model(kind):
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        ResNetConfig,
        SwinConfig,
    )

    stages = ["stage1", "stage2", "stage3", "stage4"]
    if kind == "resnet18":
        bb = ResNetConfig(
            layer_type="basic",
            depths=[1, 1, 1, 1],
            hidden_sizes=[32, 64, 96, 128],
            embedding_size=16,
            out_features=stages,
        )
    elif kind == "resnet50":
        bb = ResNetConfig(
            layer_type="bottleneck",
            depths=[3, 4, 6, 3],
            hidden_sizes=[256, 512, 1024, 2048],
            out_features=stages,
        )
    else:
        bb = SwinConfig(
            embed_dim=96,
            depths=[2, 2, 6, 2],
            num_heads=[3, 6, 12, 24],
            drop_path_rate=0.0,
            out_features=stages,
        )
    config = Mask2FormerConfig(
        backbone_config=bb, use_timm_backbone=False, feature_size=64, mask_feature_size=64, hidden_dim=64,
        encoder_feedforward_dim=128, dim_feedforward=128, encoder_layers=2, decoder_layers=10,
        num_attention_heads=4, num_queries=12, num_labels=7,
    )  # fmt: skip
    model = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        # mask logits far from zero, so that the attention masks are neither empty nor full
        model.model.transformer_module.decoder.mask_predictor.mask_embedder.layers[2].layers[
            0
        ].weight.mul_(30)
    return model


@pytest.mark.parametrize("kind", ["resnet18", "resnet50", "swin_tiny"])
def test_from_transformers_matches_every_decoder_layer(kind):
    torch.manual_seed(0)
    hf = _hf_model(kind)
    ours = from_transformers(hf)
    assert not ours.training
    images = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        ref = hf(pixel_values=images, output_auxiliary_logits=True)
        out = ours(images)
    ref_logits = [a["class_queries_logits"] for a in ref.auxiliary_logits] + [
        ref.class_queries_logits
    ]
    ref_masks = [a["masks_queries_logits"] for a in ref.auxiliary_logits] + [
        ref.masks_queries_logits
    ]
    preds = layer_predictions(out)
    assert len(preds) == len(ref_logits) == 10
    masked = [(m < 0).float().mean().item() for m in ref_masks]
    assert min(masked) > 0.02 and max(masked) < 0.98  # the masked attention is exercised
    for p, logits, masks in zip(preds, ref_logits, ref_masks):
        assert (p["pred_logits"] - logits).abs().max() < 1e-4
        assert (p["pred_masks"] - masks).abs().max() < 1e-4


# -- published checkpoints -----------------------------------------------------------------------
def _listing(name):
    entries = {}
    for line in (FIXTURES / f"published_state_dict_{name}.txt").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        entries[key] = (ast.literal_eval(shape), getattr(torch, dtype))
    return entries


def _fabricate(listing, prefix, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, (shape, dtype) in listing.items():
        if dtype.is_floating_point:
            out[prefix + key] = torch.randn(shape, generator=g, dtype=dtype)
        else:
            out[prefix + key] = torch.randint(0, 49, shape, generator=g, dtype=dtype)
    return out


def _cfg(name):
    cfg = get_cfg()
    if name == "R50_cityscapes":
        cfg.merge_from_list(["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "8"])
    if name == "swin_tiny_coco":
        cfg.merge_from_list(["MODEL.BACKBONE.NAME", "swin_tiny"])
    return cfg


@pytest.mark.parametrize("name", ["R50_coco", "R50_cityscapes", "swin_tiny_coco"])
def test_published_listings_load_strictly(name):
    listing = _listing(name)
    teacher = _fabricate(listing, "modelTeacher.", seed=0)
    student = _fabricate(listing, "modelStudent.", seed=1)
    # stage 1: only the teacher; stage 2: both (the student by default)
    model = load_published_state_dict({"model": teacher}, _cfg(name))
    head_key = "sem_seg_head.predictor.class_embed.weight"
    torch.testing.assert_close(model.state_dict()[head_key], teacher["modelTeacher." + head_key])
    model = load_published_state_dict({"model": {**teacher, **student}}, model)
    torch.testing.assert_close(model.state_dict()[head_key], student["modelStudent." + head_key])
    model = load_published_state_dict({**teacher, **student}, model, which="teacher")
    torch.testing.assert_close(model.state_dict()[head_key], teacher["modelTeacher." + head_key])
    first_conv = (
        "backbone.conv1.weight" if name.startswith("R50") else "backbone.patch_embed.proj.weight"
    )
    d2_first_conv = "backbone.stem.conv1.weight" if name.startswith("R50") else first_conv
    torch.testing.assert_close(
        model.state_dict()[first_conv], teacher["modelTeacher." + d2_first_conv]
    )


def test_import_is_strict():
    listing = _listing("R50_coco")
    sd = _fabricate(listing, "")
    cfg = _cfg("R50_coco")
    with pytest.raises(KeyError, match="neither backbone nor head"):
        convert_published_state_dict({**sd, "extra.weight": torch.zeros(1)}, "resnet50")
    del sd["sem_seg_head.predictor.query_embed.weight"]
    with pytest.raises(RuntimeError, match="query_embed"):
        load_published_state_dict(sd, cfg)
    # a stage-1 file holds one model (the "teacher"): asking for the student gives it
    converted = convert_published_state_dict(
        _fabricate(listing, "modelTeacher."), "resnet50", which="student"
    )
    assert set(converted) >= {"backbone.conv1.weight", "sem_seg_head.predictor.query_feat.weight"}
    with pytest.raises(ValueError, match="which"):
        convert_published_state_dict(sd, "resnet50", which="ema")


def test_convert_checkpoint_writes_a_gdseg_checkpoint(tmp_path):
    cfg = _cfg("R50_coco")
    src, dst = tmp_path / "model_final.pth", tmp_path / "converted.pth"
    torch.save({"model": _fabricate(_listing("R50_coco"), "modelTeacher."), "iteration": 5}, src)
    convert_checkpoint(str(src), str(dst), cfg)
    ckpt = torch.load(dst, weights_only=True)
    assert set(ckpt) == {"model", "config", "gdseg_version"}
    # the same through the command line, with a shipped config
    from gdseg.cli import main
    from gdseg.model_zoo import get_config_file

    cfg_file = get_config_file("coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml")
    dst_cli = tmp_path / "converted_cli.pth"
    assert (
        main(["convert", "--config-file", cfg_file, "--weights", str(src), "--out", str(dst_cli)])
        == 0
    )
    ckpt_cli = torch.load(dst_cli, weights_only=True)
    for k, v in ckpt["model"].items():
        assert torch.equal(v, ckpt_cli["model"][k]), k
    assert set(ckpt) == {"model", "config", "gdseg_version"}
    assert "sem_seg_head.predictor.query_feat.weight" in ckpt["model"]
    assert "MASK_FORMER" in ckpt["config"]


def test_from_transformers_gradients_match():
    """Backward through our network (custom deformable-attention backward included) equals
    transformers' autograd through grid_sample."""
    from gdseg.convert import head_state_dict_from_transformers

    torch.manual_seed(0)
    hf = _hf_model("resnet18")  # eval: BatchNorm uses running statistics, as our FrozenBN
    with torch.no_grad():
        # The standard init puts sampling points exactly on pixel centres, where bilinear
        # sampling has a kink and each implementation picks a side by float rounding.
        for layer in hf.model.pixel_level_module.decoder.encoder.layers:
            bias = layer.self_attn.sampling_offsets.bias
            bias.add_(torch.rand_like(bias) * 0.02 - 0.01)
    ours = from_transformers(hf)
    images = torch.randn(2, 3, 64, 64)
    ref, out = hf(pixel_values=images, output_auxiliary_logits=True), ours(images)
    ref_preds = [
        *ref.auxiliary_logits,
        {
            "class_queries_logits": ref.class_queries_logits,
            "masks_queries_logits": ref.masks_queries_logits,
        },
    ]
    weights = [torch.randn_like(p["masks_queries_logits"]) for p in ref_preds]
    sum(
        (p["masks_queries_logits"] * w).sum() + p["class_queries_logits"].sum()
        for p, w in zip(ref_preds, weights)
    ).backward()
    sum(
        (p["pred_masks"] * w).sum() + p["pred_logits"].sum()
        for p, w in zip(layer_predictions(out), weights)
    ).backward()
    ref_grads = head_state_dict_from_transformers(
        {k: p.grad for k, p in hf.named_parameters() if p.grad is not None}
    )
    grads = dict(ours.named_parameters())
    assert len(ref_grads) > 100
    for key, g in ref_grads.items():
        ours_g = grads[key].grad
        assert (ours_g - g).abs().max() <= 1e-4 * max(1.0, g.abs().max().item()), key
