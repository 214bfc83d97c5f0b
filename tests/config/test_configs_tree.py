"""The shipped configs: published names and values, all loadable, and the tiny demo config."""

from __future__ import annotations

import inspect
import shlex
from pathlib import Path

import pytest
import yaml

from gdseg.config import get_cfg
from gdseg.model_zoo import CONFIGS_DIR, get_config_file, list_config_files

ALL_CONFIGS = list_config_files()

COCO = "coco/instance-segmentation/"
CITY = "cityscapes/instance-segmentation/"
# The published file names users know (SPEC §3-4, §7), with the backbone each one builds.
PUBLISHED = {
    COCO + "maskformer2_R50_bs16_50ep.yaml": "resnet50",
    COCO + "maskformer2_R101_bs16_50ep.yaml": "resnet101",
    COCO + "swin/maskformer2_swin_tiny_bs16_50ep.yaml": "swin_tiny",
    COCO + "swin/maskformer2_swin_small_bs16_50ep.yaml": "swin_small",
    COCO + "swin/maskformer2_swin_base_384_bs16_50ep.yaml": "swin_base_384",
    COCO + "swin/maskformer2_swin_base_IN21k_384_bs16_50ep.yaml": "swin_base_384",
    COCO + "swin/maskformer2_swin_large_IN21k_384_bs16_100ep.yaml": "swin_large_384",
    COCO + "deit/maskformer2_deit_base_bs16_50ep.yaml": "deit_base",
    COCO + "dinov2/maskformer2_dinov2_base_bs16_50ep.yaml": "dinov2_base",
    COCO + "dinov2/maskformer2_dinov2_large_bs16_50ep.yaml": "dinov2_large",
    COCO + "dinov2/maskformer2_vit_large_bs16_50ep.yaml": "vit_large",
    CITY + "maskformer2_R50_bs16_90k.yaml": "resnet50",
    CITY + "maskformer2_R101_bs16_90k.yaml": "resnet101",
    CITY + "swin/maskformer2_swin_tiny_bs16_90k.yaml": "swin_tiny",
    CITY + "swin/maskformer2_swin_small_bs16_90k.yaml": "swin_small",
    CITY + "swin/maskformer2_swin_base_IN21k_384_bs16_90k.yaml": "swin_base_384",
    CITY + "swin/maskformer2_swin_large_IN21k_384_bs16_90k.yaml": "swin_large_384",
    CITY + "deit/maskformer2_deit_base_b14_bs16_90k.yaml": "deit_base",
    CITY + "dinov2/maskformer2_dinov2_b14_bs16_90k.yaml": "dinov2_base",
    CITY + "dinov2/maskformer2_dinov2_l14_bs16_90k.yaml": "dinov2_large",
}


def load(rel: str):
    cfg = get_cfg()
    cfg.merge_from_file(get_config_file(rel))
    return cfg


# --- every shipped file ---------------------------------------------------------------------


def test_the_tree_holds_every_published_file_and_the_demo_configs():
    expected = set(PUBLISHED) | {
        COCO + "Base-COCO-InstanceSegmentation.yaml",
        CITY + "Base-Cityscapes-InstanceSegmentation.yaml",
        "demo/tiny.yaml",
        "demo/tiny_instant.yaml",
    }
    assert expected <= set(ALL_CONFIGS)


def test_repo_root_configs_is_the_packaged_folder():
    root = Path(__file__).resolve().parents[2] / "configs"
    assert root.resolve() == CONFIGS_DIR.resolve()


@pytest.mark.parametrize("rel", ALL_CONFIGS)
def test_config_loads_and_round_trips(rel, tmp_path):
    cfg = load(rel)
    dumped = tmp_path / "config.yaml"
    dumped.write_text(cfg.dump(), encoding="utf-8")
    back = get_cfg()
    back.merge_from_file(str(dumped))
    assert back == cfg


@pytest.mark.parametrize("rel", ALL_CONFIGS)
def test_config_is_plain_yaml_with_lists(rel):
    """Safe YAML only, and tuples as YAML lists (not Python text like "(1, 2)")."""
    text = (CONFIGS_DIR / rel).read_text(encoding="utf-8")
    assert "!!" not in text
    data = yaml.safe_load(text)
    assert isinstance(data, dict)

    def strings(d):
        for v in d.values():
            if isinstance(v, dict):
                yield from strings(v)
            elif isinstance(v, str):
                yield v

    assert not [s for s in strings(data) if s.startswith(("(", "["))]


@pytest.mark.parametrize("rel", sorted(PUBLISHED))
def test_published_config_backbone_and_architecture(rel):
    cfg = load(rel)
    assert PUBLISHED[rel] == cfg.MODEL.BACKBONE.NAME
    mf = cfg.MODEL.MASK_FORMER
    assert (mf.HIDDEN_DIM, mf.NHEADS, mf.DIM_FEEDFORWARD, mf.DEC_LAYERS) == (256, 8, 2048, 10)
    assert (mf.CLASS_WEIGHT, mf.MASK_WEIGHT, mf.DICE_WEIGHT, mf.NO_OBJECT_WEIGHT) == (
        2.0,
        5.0,
        5.0,
        0.1,
    )
    assert mf.TRAIN_NUM_POINTS == 12544
    assert (mf.OVERSAMPLE_RATIO, mf.IMPORTANCE_SAMPLE_RATIO) == (3.0, 0.75)
    assert (200 if "large_IN21k" in rel else 100) == mf.NUM_OBJECT_QUERIES
    head = cfg.MODEL.SEM_SEG_HEAD
    assert (head.CONVS_DIM, head.MASK_DIM, head.TRANSFORMER_ENC_LAYERS) == (256, 256, 6)
    assert (80 if rel.startswith("coco/") else 8) == head.NUM_CLASSES
    assert cfg.MODEL.PIXEL_MEAN == (123.675, 116.28, 103.53)
    assert cfg.MODEL.PIXEL_STD == (58.395, 57.12, 57.375)
    s = cfg.SOLVER
    assert (s.OPTIMIZER, s.BASE_LR, s.WEIGHT_DECAY, s.BACKBONE_MULTIPLIER) == (
        "ADAMW",
        1e-4,
        0.05,
        0.1,
    )
    assert s.IMS_PER_BATCH == 16
    assert s.CLIP_GRADIENTS.ENABLED and s.CLIP_GRADIENTS.CLIP_TYPE == "full_model"
    assert s.CLIP_GRADIENTS.CLIP_VALUE == 0.01 and s.AMP.ENABLED
    assert (cfg.SSL.TRAIN_SSL, cfg.SSL.EMA_DECAY, cfg.SSL.FREQ) == (False, 0.9996, 1)
    assert cfg.SSL.BURNIN_ITER == 50000 and cfg.SSL.EVAL_WHO == "STUDENT"


@pytest.mark.parametrize("rel", sorted(r for r in PUBLISHED if r.startswith("coco/")))
def test_coco_recipe(rel):
    cfg = load(rel)
    assert cfg.DATASETS.TRAIN == ("coco_2017_train",) and cfg.DATASETS.TEST == ("coco_2017_val",)
    assert cfg.INPUT.DATASET_MAPPER_NAME == "coco_instance_lsj"
    assert (cfg.INPUT.IMAGE_SIZE, cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE) == (1024, 0.1, 2.0)
    assert cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupMultiStepLR"
    if "100ep" in rel:
        assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS) == (737500, (655556, 710184))
    else:
        assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS) == (368750, (327778, 355092))
    assert cfg.SOLVER.WARMUP_ITERS == 10
    assert cfg.MODEL.RESNETS.NORM == "FrozenBN"


@pytest.mark.parametrize("rel", sorted(r for r in PUBLISHED if r.startswith("cityscapes/")))
def test_cityscapes_recipe(rel):
    cfg = load(rel)
    assert cfg.DATASETS.TRAIN == ("cityscapes_fine_instance_seg_train",)
    assert cfg.DATASETS.TEST == ("cityscapes_fine_instance_seg_val",)
    assert cfg.INPUT.DATASET_MAPPER_NAME == "mask_former_instance"
    assert tuple(int(x * 0.1 * 1024) for x in range(5, 21)) == cfg.INPUT.MIN_SIZE_TRAIN
    assert (cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (
        4096,
        1024,
        2048,
    )
    assert cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.SIZE == (512, 1024)
    assert cfg.INPUT.COLOR_AUG_SSD
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.LR_SCHEDULER_NAME) == (90000, "WarmupPolyLR")
    assert (cfg.SOLVER.POLY_LR_POWER, cfg.SOLVER.WARMUP_ITERS) == (0.9, 0)
    assert cfg.MODEL.RESNETS.NORM == "SyncBN"


@pytest.mark.parametrize(
    "rel, weights, swin",
    [
        (COCO + "maskformer2_R50_bs16_50ep.yaml", "R-50.pkl", None),
        (COCO + "maskformer2_R101_bs16_50ep.yaml", "R-101.pkl", None),
        (
            COCO + "swin/maskformer2_swin_tiny_bs16_50ep.yaml",
            "swin_tiny_patch4_window7_224.pkl",
            (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 224),
        ),
        (
            COCO + "swin/maskformer2_swin_small_bs16_50ep.yaml",
            "swin_small_patch4_window7_224.pkl",
            (96, (2, 2, 18, 2), (3, 6, 12, 24), 7, 224),
        ),
        (
            COCO + "swin/maskformer2_swin_base_384_bs16_50ep.yaml",
            "swin_base_patch4_window12_384.pkl",
            (128, (2, 2, 18, 2), (4, 8, 16, 32), 12, 384),
        ),
        (
            CITY + "swin/maskformer2_swin_base_IN21k_384_bs16_90k.yaml",
            "swin_base_patch4_window12_384_22k.pkl",
            (128, (2, 2, 18, 2), (4, 8, 16, 32), 12, 384),
        ),
        (
            CITY + "swin/maskformer2_swin_large_IN21k_384_bs16_90k.yaml",
            "swin_large_patch4_window12_384_22k.pkl",
            (192, (2, 2, 18, 2), (6, 12, 24, 48), 12, 384),
        ),
        (
            COCO + "dinov2/maskformer2_dinov2_large_bs16_50ep.yaml",
            "timm://vit_large_patch14_dinov2.lvd142m",
            None,
        ),
        (
            CITY + "deit/maskformer2_deit_base_b14_bs16_90k.yaml",
            "deit_base_patch16_384.fb_in1k",
            None,
        ),
    ],
)
def test_published_weights_and_swin_shapes(rel, weights, swin):
    cfg = load(rel)
    assert cfg.MODEL.WEIGHTS.endswith(weights)
    if swin is not None:
        s = cfg.MODEL.SWIN
        assert swin == (s.EMBED_DIM, s.DEPTHS, s.NUM_HEADS, s.WINDOW_SIZE, s.PRETRAIN_IMG_SIZE)
        assert (s.DROP_PATH_RATE, s.APE, s.PATCH_NORM) == (0.3, False, True)


@pytest.mark.parametrize("rel", ALL_CONFIGS)
def test_backbone_name_and_keys_agree_with_the_registry(rel):
    """The name is registered, and the keys beside it do not contradict its preset."""
    from gdseg.modeling.backbones import BACKBONE_REGISTRY, canonical_name
    from gdseg.modeling.backbones.swin import SWIN_PRESETS
    from gdseg.modeling.backbones.vit import VIT_PRESETS

    cfg = load(rel)
    name = cfg.MODEL.BACKBONE.NAME
    assert canonical_name(name) == name and name in BACKBONE_REGISTRY
    if name.startswith("resnet"):
        assert int(name[len("resnet") :]) == cfg.MODEL.RESNETS.DEPTH
    if name in SWIN_PRESETS:
        s = cfg.MODEL.SWIN
        given = (s.EMBED_DIM, s.DEPTHS, s.NUM_HEADS, s.WINDOW_SIZE, s.PRETRAIN_IMG_SIZE)
        assert given == SWIN_PRESETS[name]
    if name in VIT_PRESETS:
        from timm.models import get_pretrained_cfg

        # Pretrained weights of the very timm architecture, at its pretraining size.
        arch, tag = cfg.MODEL.WEIGHTS.removeprefix("timm://").split(".")
        assert arch == VIT_PRESETS[name] and not cfg.MODEL.VIT.TIMM_NAME
        pretrained = get_pretrained_cfg(f"{arch}.{tag}")
        assert pretrained is not None
        assert cfg.MODEL.VIT.IMG_SIZE in (0, pretrained.input_size[-1])


def test_resnet_depth_matches_backbone_name():
    for rel, name in PUBLISHED.items():
        if name.startswith("resnet"):
            assert int(name[len("resnet") :]) == load(rel).MODEL.RESNETS.DEPTH, rel


def test_published_command_line_on_its_config():
    cfg = load("configs/coco/instance-segmentation/dinov2/maskformer2_dinov2_large_bs16_50ep.yaml")
    cfg.merge_from_list(
        shlex.split("SSL.PERCENTAGE 250 SSL.TRAIN_SSL False OUTPUT_DIR out/teacher")
    )
    assert (cfg.SSL.PERCENTAGE, cfg.SSL.TRAIN_SSL, cfg.OUTPUT_DIR) == (250.0, False, "out/teacher")


# --- the tiny demo configs ------------------------------------------------------------------


@pytest.mark.parametrize("rel", ["demo/tiny.yaml", "demo/tiny_instant.yaml"])
def test_tiny_configs_are_consistent(rel):
    cfg = load(rel)
    mf, head = cfg.MODEL.MASK_FORMER, cfg.MODEL.SEM_SEG_HEAD
    assert cfg.MODEL.BACKBONE.NAME == "resnet18" and cfg.MODEL.WEIGHTS == ""
    assert mf.HIDDEN_DIM <= 128 and mf.NUM_OBJECT_QUERIES <= 20 and mf.DEC_LAYERS <= 4
    assert mf.HIDDEN_DIM % mf.NHEADS == 0
    assert head.CONVS_DIM % 32 == 0  # GroupNorm(32)
    assert head.CONVS_DIM % mf.NHEADS == 0  # the pixel decoder's heads are MASK_FORMER.NHEADS
    assert cfg.TEST.DETECTIONS_PER_IMAGE <= mf.NUM_OBJECT_QUERIES * head.NUM_CLASSES
    assert cfg.INPUT.IMAGE_SIZE <= 128 and cfg.INPUT.IMAGE_SIZE % 32 == 0
    assert cfg.INPUT.MIN_SIZE_TEST == cfg.DATASETS.SYNTHETIC.IMAGE_SIZE
    assert cfg.DATASETS.TRAIN == ("synthetic_train",) and cfg.DATASETS.TEST == ("synthetic_val",)
    assert not cfg.SOLVER.AMP.ENABLED and cfg.DATALOADER.NUM_WORKERS <= 2
    assert cfg.TEST.EVAL_PERIOD == 0
    s = cfg.SOLVER
    assert max(s.STEPS) < s.MAX_ITER and s.WARMUP_ITERS < s.MAX_ITER
    assert 0 < cfg.SSL.BURNIN_ITER < s.MAX_ITER
    assert s.CHECKPOINT_PERIOD <= s.MAX_ITER


@pytest.mark.parametrize("rel", ["demo/tiny.yaml", "demo/tiny_instant.yaml"])
def test_tiny_model_builds_and_runs(rel):
    import torch

    from gdseg.modeling import build_model

    torch.manual_seed(0)
    cfg = load(rel)
    model = build_model(cfg).eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 15e6  # ResNet-18 (11.2M) and a small head
    size = cfg.INPUT.IMAGE_SIZE
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    q, k = cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    assert out["pred_logits"].shape == (1, q, k + 1)
    assert out["pred_masks"].shape == (1, q, size // 4, size // 4)
    assert len(out["aux_outputs"]) == cfg.MODEL.MASK_FORMER.DEC_LAYERS - 1


def test_tiny_num_classes_matches_the_synthetic_dataset():
    from gdseg.data import synthetic

    cfg = load("demo/tiny.yaml")
    default = inspect.signature(synthetic.make_synthetic_coco).parameters["num_classes"].default
    expected = cfg.DATASETS.SYNTHETIC.get("NUM_CLASSES", default)
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == expected <= len(synthetic.SHAPES)


def test_tiny_instant_is_a_handful_of_iterations():
    cfg = load("demo/tiny_instant.yaml")
    assert cfg.SOLVER.MAX_ITER <= 10 and cfg.DATASETS.SYNTHETIC.NUM_TRAIN <= 16


# --- model_zoo ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml",
        "configs/coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml",
        "./configs/coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml",
        "coco/instance-segmentation/maskformer2_R50_bs16_50ep",
    ],
)
def test_get_config_file_accepts_published_spellings(name):
    path = Path(get_config_file(name))
    assert path.is_absolute() and path.is_file()
    assert path == CONFIGS_DIR / COCO / "maskformer2_R50_bs16_50ep.yaml"


def test_get_config_file_unknown_lists_close_matches():
    with pytest.raises(FileNotFoundError) as e:
        get_config_file("coco/instance-segmentation/maskformer2_R50_bs16_90k.yaml")
    msg = str(e.value)
    assert "maskformer2_R50_bs16_90k.yaml" in msg
    assert COCO + "maskformer2_R50_bs16_50ep.yaml" in msg.split("Close matches", 1)[1]


def test_get_config_file_wrong_folder_finds_the_file_by_name():
    with pytest.raises(FileNotFoundError) as e:
        get_config_file("cityscapes/maskformer2_swin_tiny_bs16_90k.yaml")
    assert CITY + "swin/maskformer2_swin_tiny_bs16_90k.yaml" in str(e.value)


def test_get_config_file_stays_inside_the_configs_folder(tmp_path):
    outside = tmp_path / "x.yaml"
    outside.write_text("SEED: 1\n")
    with pytest.raises(FileNotFoundError):
        get_config_file(str(Path("..") / ".." / ".." / outside))
