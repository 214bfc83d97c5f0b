"""The trainer on a tiny Mask2Former-shaped model: phases, EMA, resume, failures, metrics."""

import json
import os

import pytest
import torch

from gdseg.engine.checkpoint import Checkpointer, load_file
from gdseg.engine.hooks import MetricsWriter
from gdseg.engine.train import resume_from_last
from gdseg.engine.trainer import HookBase, NonFiniteLossError, split_outputs
from tests.engine.engine_fakes import make_trainer, tiny_cfg


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _Probe(HookBase):
    """Records teacher and student states right after the teacher update of each iteration."""

    def __init__(self):
        self.seen = {}

    def before_step(self):
        t = self.trainer
        self.seen[t.iter] = (_state(t.teacher), _state(t.model))


def test_supervised_smoke_and_metrics(tmp_path):
    cfg = tiny_cfg(max_iter=4)
    cfg.SOLVER.LOG_PERIOD = 2
    trainer = make_trainer(cfg, extra_hooks=[MetricsWriter(str(tmp_path), period=2)])
    before = _state(trainer.model)
    trainer.train(0, 4)
    assert trainer.completed and trainer.iter == 4
    assert not torch.equal(before["backbone.0.weight"], trainer.model.backbone[0].weight)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [1, 3]
    r = lines[-1]
    assert r["phase"] == "supervised"
    for key in (
        "total_loss",
        "loss_ce",
        "loss_mask",
        "loss_dice",
        "loss_ce_0",
        "lr",
        "data_time",
        "time",
        "eta_seconds",
    ):
        assert key in r, key
    assert not any(k.endswith("_unsup") for k in r)


def test_semisup_phases_unsup_losses_and_pseudo_label_count(tmp_path):
    cfg = tiny_cfg(max_iter=4, semisup=True)
    trainer = make_trainer(cfg, extra_hooks=[MetricsWriter(str(tmp_path), period=1)])
    trainer.train(0, 4)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in lines] == ["burn_in", "burn_in", "ema", "ema"]
    for r in lines:
        assert {"loss_ce_unsup", "loss_mask_unsup", "loss_dice_unsup", "loss_ce_0_unsup"} <= set(r)
        assert r["pseudo_labels_per_image"] >= 0
        terms = sum(v for k, v in r.items() if k.startswith("loss_"))
        assert terms == pytest.approx(r["total_loss"], rel=1e-5)


def test_teacher_copy_at_burnin_then_ema_formula():
    cfg = tiny_cfg(max_iter=5, semisup=True)
    probe = _Probe()
    trainer = make_trainer(cfg, extra_hooks=[probe])
    initial_teacher = _state(trainer.teacher)
    trainer.train(0, 5)
    d = cfg.SSL.EMA_DECAY
    # Burn-in (iterations 0, 1): the teacher is the fixed stage-1 model.
    _assert_bitwise_equal(probe.seen[1][0], initial_teacher)
    # Iteration 2 == BURNIN_ITER: teacher := student exactly.
    teacher2, student2 = probe.seen[2]
    _assert_bitwise_equal(teacher2, student2)
    # Iteration 3: one EMA step from (teacher at 2, student after step 2).
    teacher3, student3 = probe.seen[3]
    for k, t in teacher3.items():
        if t.is_floating_point():
            expected = teacher2[k] - (1 - d) * (teacher2[k] - student3[k])
            assert torch.equal(t, expected), k
        else:
            assert torch.equal(t, student3[k])
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    assert not trainer.teacher.training


def test_ema_copies_integer_buffers_of_batchnorm():
    cfg = tiny_cfg(max_iter=4, semisup=True)
    probe = _Probe()
    trainer = make_trainer(cfg, norm="BN", extra_hooks=[probe])
    assert not trainer.batch_student  # batch statistics must not mix labeled and unlabeled
    trainer.train(0, 4)
    teacher3, student3 = probe.seen[3]
    key = "backbone.1.num_batches_tracked"
    assert teacher3[key].item() == student3[key].item() == 6  # two student passes per step


def _run_interrupted(cfg, out, stop_after):
    """Train until ``stop_after`` iterations are done (checkpoint included), then 'crash'."""

    class _Stop(HookBase):
        def after_step(self):
            if self.trainer.iter + 1 == stop_after:
                raise KeyboardInterrupt

    trainer = make_trainer(cfg, output_dir=out)
    trainer.register_hooks([_Stop()])  # after the checkpointer: the checkpoint is written
    with pytest.raises(KeyboardInterrupt):
        trainer.train(0, cfg.SOLVER.MAX_ITER)
    assert not os.path.exists(os.path.join(out, "model_final.pth"))


@pytest.mark.parametrize("semisup", [False, True], ids=["supervised", "semisup"])
def test_resume_continues_exactly(tmp_path, semisup):
    n, k = 5, 3  # in semisup mode the burn-in switch (iteration 2) and EMA are both crossed
    cfg = tiny_cfg(max_iter=n, semisup=semisup)
    cfg.SOLVER.CHECKPOINT_PERIOD = k

    straight = make_trainer(cfg, output_dir=str(tmp_path / "a"))
    straight.train(0, n)

    out = str(tmp_path / "b")
    _run_interrupted(cfg, out, stop_after=k)
    torch.manual_seed(1234)  # the resumed process starts with unrelated RNG state
    resumed = make_trainer(cfg, output_dir=out)
    resume_from_last(resumed, Checkpointer(out))
    assert resumed.start_iter == k
    resumed.train(resumed.start_iter, n)

    _assert_bitwise_equal(_state(straight.model), _state(resumed.model))
    if semisup:
        _assert_bitwise_equal(_state(straight.teacher), _state(resumed.teacher))
    assert resumed.scheduler.last_epoch == straight.scheduler.last_epoch == n
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]
    final = load_file(os.path.join(out, "model_final.pth"))
    assert final["iteration"] == n - 1
    _assert_bitwise_equal(final["model"], _state(straight.model))


def test_checkpoint_contents_load_with_weights_only(tmp_path):
    cfg = tiny_cfg(max_iter=2, semisup=True)
    cfg.SOLVER.CHECKPOINT_PERIOD = 1
    trainer = make_trainer(cfg, output_dir=str(tmp_path))
    trainer.train(0, 2)
    names = sorted(os.listdir(tmp_path))
    assert names == ["last_checkpoint", "metrics.jsonl", "model_0000000.pth", "model_final.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    ckpt = torch.load(tmp_path / "model_0000000.pth", weights_only=True)
    assert ckpt["iteration"] == 0
    for key in ("model", "teacher", "optimizer", "scheduler", "scaler", "rng", "data", "config"):
        assert key in ckpt, key
    assert set(ckpt["data"]) == {"labeled", "unlabeled"}
    assert set(ckpt["rng"]["per_rank"][0]) >= {"torch", "numpy", "python"}
    assert "SSL:" in ckpt["config"]


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    cfg = tiny_cfg(max_iter=6)
    cfg.SOLVER.CHECKPOINT_PERIOD = 2

    class _Poison(HookBase):
        def before_step(self):
            if self.trainer.iter == 3:
                with torch.no_grad():
                    self.trainer.model.sem_seg_head["class_embed"].weight.fill_(float("nan"))

    trainer = make_trainer(cfg, output_dir=str(tmp_path), extra_hooks=[_Poison()])
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train(0, 6)
    msg = str(err.value)
    assert "iteration 3" in msg and "loss_ce=nan" in msg
    for hint in ("SOLVER.BASE_LR", "SOLVER.CLIP_GRADIENTS.ENABLED", "bf16", "--resume"):
        assert hint in msg
    assert not (tmp_path / "model_final.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    good = load_file(tmp_path / "model_0000001.pth")
    assert all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())


def test_batched_student_pass_matches_two_passes():
    cfg = tiny_cfg(max_iter=1, semisup=True)
    losses = []
    for batched in (True, False):
        trainer = make_trainer(cfg, batch_student=batched)
        assert trainer.batch_student == batched
        trainer.train(0, 1)
        losses.append(trainer.step_metrics)
    for key, value in losses[0].items():
        if key.startswith("loss_") or key == "total_loss":
            assert value == pytest.approx(losses[1][key], rel=1e-4, abs=1e-6), key


def test_split_outputs_nested():
    out = {"pred_logits": torch.zeros(5, 2), "aux_outputs": [{"pred_masks": torch.ones(5, 1)}]}
    a, b = split_outputs(out, 2)
    assert a["pred_logits"].shape[0] == 2 and b["aux_outputs"][0]["pred_masks"].shape[0] == 3


def test_semisup_needs_teacher_and_unlabeled_stream():
    cfg = tiny_cfg(semisup=True)
    trainer = make_trainer(cfg)
    from gdseg.engine.trainer import Trainer

    with pytest.raises(ValueError, match="teacher"):
        Trainer(
            trainer.model,
            trainer.criterion,
            trainer.optimizer,
            trainer.labeled_loader,
            trainer.preprocess,
            trainer.precision,
            semisup=trainer.semisup,
        )


def test_unlabeled_batches_every_freq_iterations(tmp_path):
    cfg = tiny_cfg(max_iter=4, semisup=True)
    cfg.SSL.FREQ = 2
    trainer = make_trainer(cfg, extra_hooks=[MetricsWriter(str(tmp_path), period=1)])
    trainer.train(0, 4)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    with_unlabeled = ["loss_ce_unsup" in r for r in lines]
    assert with_unlabeled == [True, False, True, False]
    assert trainer.unlabeled_loader.state_dict()["num_samples"] == 2 * 2  # two batches of 2


def test_bf16_autocast_step_on_cpu():
    from gdseg.engine.amp import resolve_precision

    cfg = tiny_cfg(max_iter=2, semisup=True)
    trainer = make_trainer(cfg)
    trainer.precision = resolve_precision(True, "bf16", "cpu")
    trainer.scaler = trainer.precision.grad_scaler()
    trainer.train(0, 2)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.model.backbone[0].weight.dtype == torch.float32  # master weights stay fp32


def test_metrics_go_to_tensorboard_when_installed(tmp_path, monkeypatch):
    from gdseg.engine import hooks

    scalars = []

    class _Recorder:
        def add_scalar(self, name, value, step):
            scalars.append((name, step))

        def close(self):
            scalars.append(("closed", -1))

    monkeypatch.setattr(hooks, "_tensorboard_writer", lambda _: _Recorder())
    trainer = make_trainer(tiny_cfg(max_iter=2), extra_hooks=[MetricsWriter(str(tmp_path), 1)])
    trainer.train(0, 2)
    assert ("total_loss", 0) in scalars and ("lr", 1) in scalars
    assert scalars[-1] == ("closed", -1)
