"""Atomic files, RNG states, and every teacher / initial-weights format the trainer reads."""

import random
import re

import numpy as np
import pytest
import torch

from gdseg.config import get_cfg
from gdseg.engine.checkpoint import (
    Checkpointer,
    atomic_save,
    get_rng_state,
    has_teacher,
    load_file,
    load_initial_weights,
    load_teacher_weights,
    set_rng_state,
)
from gdseg.model_zoo import get_config_file
from gdseg.modeling import build_model


@pytest.fixture(scope="module")
def cfg():
    c = get_cfg()
    c.merge_from_file(get_config_file("demo/tiny_instant.yaml"))  # ResNet-18 backbone
    return c


def _model(cfg, seed):
    torch.manual_seed(seed)
    return build_model(cfg)


def _equal(model, state):
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_atomic_save_never_leaves_a_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "model_final.pth"
    atomic_save({"a": torch.ones(2)}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"a": torch.zeros(2)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_final.pth"]
    assert torch.equal(load_file(path)["a"], torch.ones(2))


def test_checkpointer_writes_last_checkpoint_only_on_the_writing_rank(tmp_path):
    Checkpointer(str(tmp_path), save_to_disk=False).save("model_0000009", {"iteration": 9})
    assert list(tmp_path.iterdir()) == []
    ck = Checkpointer(str(tmp_path))
    assert ck.last_checkpoint() is None
    ck.save("model_0000009", {"iteration": 9})
    assert ck.last_checkpoint() == str(tmp_path / "model_0000009.pth")
    assert load_file(ck.last_checkpoint())["gdseg_version"]


def test_rng_state_round_trip_through_weights_only(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    torch.save({"rng": get_rng_state()}, tmp_path / "r.pth")
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    set_rng_state(torch.load(tmp_path / "r.pth", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def _to_detectron2_resnet(key):
    """Inverse of gdseg's detectron2 -> torchvision ResNet renaming (for a fabricated file)."""
    if key == "conv1.weight":
        return "stem.conv1.weight"
    if key.startswith("bn1."):
        return "stem.conv1.norm." + key[4:]
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", key)
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
    rest = rest.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
    return f"res{stage}.{block}.{rest}"


def _published(state, prefix):
    out = {}
    for k, v in state.items():
        if k.startswith("backbone."):
            k = "backbone." + _to_detectron2_resnet(k[len("backbone.") :])
        out[prefix + k] = v
    return out


def test_teacher_from_every_supported_file(tmp_path, cfg):
    a, b = _model(cfg, 1).state_dict(), _model(cfg, 2).state_dict()
    files = {
        "stage1.pth": {"model": a, "config": cfg.dump()},
        "stage2.pth": {"model": b, "teacher": a, "config": cfg.dump()},
        "published_gd.pth": {
            "model": {**_published(a, "modelTeacher."), **_published(b, "modelStudent.")}
        },
        "plain.pth": a,
    }
    for name, content in files.items():
        torch.save(content, tmp_path / name)
        teacher = _model(cfg, 3)
        load_teacher_weights(teacher, str(tmp_path / name))
        assert _equal(teacher, a), name
    assert has_teacher(str(tmp_path / "stage2.pth"))
    assert has_teacher(str(tmp_path / "published_gd.pth"))
    assert not has_teacher(str(tmp_path / "stage1.pth"))


def test_teacher_with_another_architecture_is_refused(tmp_path, cfg):
    other = cfg.clone()
    other.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = 7
    torch.save({"model": _model(other, 1).state_dict(), "config": ""}, tmp_path / "t.pth")
    with pytest.raises(RuntimeError, match="does not match the model|size mismatch"):
        load_teacher_weights(_model(cfg, 0), str(tmp_path / "t.pth"))


def test_initial_weights_backbone_only_or_full_model(tmp_path, cfg):
    source = _model(cfg, 1)
    backbone_file = tmp_path / "resnet18_torchvision.pth"
    torch.save(source.backbone.state_dict(), backbone_file)  # torchvision-style names
    student = _model(cfg, 2)
    head_before = {k: v.clone() for k, v in student.sem_seg_head.state_dict().items()}
    load_initial_weights(student, str(backbone_file))
    assert _equal(student.backbone, source.backbone.state_dict())
    assert _equal(student.sem_seg_head, head_before)  # the head stays freshly initialized

    full = tmp_path / "model_final.pth"
    torch.save({"model": source.state_dict(), "config": cfg.dump()}, full)
    student = _model(cfg, 2)
    load_initial_weights(student, str(full))
    assert _equal(student, source.state_dict())
    load_initial_weights(student, "")  # nothing to load: no error


def test_a_backbone_file_is_not_a_teacher(tmp_path, cfg):
    path = tmp_path / "resnet18.pth"
    torch.save(_model(cfg, 1).backbone.state_dict(), path)
    with pytest.raises(RuntimeError, match="whole model"):
        load_teacher_weights(_model(cfg, 0), str(path))
