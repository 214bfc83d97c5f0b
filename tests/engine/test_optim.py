import pytest
import torch
from torch import nn

from gdseg.config import get_cfg
from gdseg.engine.optim import (
    WarmupMultiStepLR,
    WarmupPolyLR,
    build_lr_scheduler,
    build_optimizer,
    clip_gradients,
    get_param_groups,
)


class _Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.query_feat = nn.Embedding(4, 8)
        self.level_embed = nn.Parameter(torch.zeros(3, 8))
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)


class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(5, 2))


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = _Backbone()
        self.sem_seg_head = nn.Sequential(nn.GroupNorm(2, 8), _Decoder())


def _lookup(groups, param):
    for g in groups:
        if any(p is param for p in g["params"]):
            return g["lr"], g["weight_decay"]
    raise AssertionError("parameter not in any group")


def test_param_groups_lr_and_weight_decay():
    m = _Model()
    groups = get_param_groups(m, 1e-4, 0.05, 0.0, 0.0, 0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))
    bb, head = m.backbone, m.sem_seg_head
    assert _lookup(groups, bb.conv.weight) == pytest.approx((1e-5, 0.05))
    assert _lookup(groups, bb.bn.weight) == pytest.approx((1e-5, 0.0))
    assert _lookup(groups, bb.relative_position_bias_table) == pytest.approx((1e-5, 0.0))
    assert _lookup(groups, head[0].weight) == pytest.approx((1e-4, 0.0))  # GroupNorm
    dec = head[1]
    assert _lookup(groups, dec.query_feat.weight) == pytest.approx((1e-4, 0.0))
    assert _lookup(groups, dec.level_embed) == pytest.approx((1e-4, 0.0))
    assert _lookup(groups, dec.norm.bias) == pytest.approx((1e-4, 0.0))
    assert _lookup(groups, dec.proj.weight) == pytest.approx((1e-4, 0.05))


def test_build_optimizer_from_config_is_adamw():
    cfg = get_cfg()
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.01
    opt = build_optimizer(cfg, _Model())
    assert isinstance(opt, torch.optim.AdamW)
    wds = sorted({g["weight_decay"] for g in opt.param_groups})
    assert wds == [0.0, 0.01, 0.05]
    cfg.SOLVER.OPTIMIZER = "LION"
    with pytest.raises(ValueError, match="ADAMW or SGD"):
        build_optimizer(cfg, _Model())


def test_full_model_clipping_uses_one_norm():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))
    a.grad, b.grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    total = clip_gradients([a, b], "full_model", 1.0)
    assert total.item() == pytest.approx((9 * 3 + 16 * 4) ** 0.5)
    new_norm = torch.cat([a.grad, b.grad]).norm()
    assert new_norm.item() == pytest.approx(1.0, rel=1e-5)
    # The direction is kept: both parameters are scaled by the same factor.
    assert (a.grad / 3.0).allclose(b.grad[:3] / 4.0)


def _lrs(sched, n):
    out = []
    for _ in range(n):
        out.append(sched.optimizer.param_groups[0]["lr"])
        sched.optimizer.step()
        sched.step()
    return out


def _opt():
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)


def test_warmup_multistep():
    s = WarmupMultiStepLR(_opt(), [4, 6], gamma=0.1, warmup_factor=0.1, warmup_iters=2)
    lrs = _lrs(s, 8)
    assert lrs == pytest.approx([0.1, 0.55, 1, 1, 0.1, 0.1, 0.01, 0.01])


def test_warmup_poly_with_constant_ending():
    s = WarmupPolyLR(_opt(), max_iters=10, power=1.0, constant_ending=0.25)
    lrs = _lrs(s, 10)
    assert lrs == pytest.approx([1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.25])


def test_scheduler_state_round_trip_with_weights_only(tmp_path):
    cfg = get_cfg()
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS = 20, (5, 10), 3
    for name in ("WarmupMultiStepLR", "WarmupPolyLR"):
        cfg.SOLVER.LR_SCHEDULER_NAME = name
        s1 = build_lr_scheduler(cfg, _opt())
        _lrs(s1, 7)
        torch.save(s1.state_dict(), tmp_path / "s.pth")
        s2 = build_lr_scheduler(cfg, _opt())
        s2.load_state_dict(torch.load(tmp_path / "s.pth", weights_only=True))
        s2.optimizer.param_groups[0]["lr"] = s2.get_last_lr()[0]
        assert _lrs(s2, 5) == pytest.approx(_lrs(s1, 5))
    cfg.SOLVER.LR_SCHEDULER_NAME = "Cosine"
    with pytest.raises(ValueError, match="WarmupPolyLR"):
        build_lr_scheduler(cfg, _opt())
