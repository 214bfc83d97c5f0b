"""The real training path on configs/demo/tiny_instant.yaml: the CLI's setup + build_trainer,
the real Mask2Former, criterion and synthetic data loaders."""

import argparse
import json
import os

import pytest
import torch

from gdseg.config import ConfigError
from gdseg.engine.checkpoint import load_file
from gdseg.engine.launch import launch
from gdseg.engine.train import add_train_args, build_trainer, main, setup
from gdseg.engine.trainer import HookBase
from gdseg.model_zoo import get_config_file
from tests.engine.engine_fakes import distributed_worker

CONFIG = get_config_file("demo/tiny_instant.yaml")


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A stage-1-like teacher: a random tiny model saved as a plain state dict."""
    from gdseg.config import get_cfg
    from gdseg.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(CONFIG)
    torch.manual_seed(123)
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pth")
    torch.save(build_model(cfg).state_dict(), path)
    return path


def _args(opts, output_dir, *flags):
    parser = add_train_args(argparse.ArgumentParser())
    return parser.parse_args(
        ["--config-file", CONFIG, *flags, *opts, "OUTPUT_DIR", str(output_dir)]
    )


def _opts(cache, semisup=False, teacher="", **extra):
    opts = ["DATASETS.SYNTHETIC.CACHE_DIR", cache, "DATASETS.TEST", "()", "SOLVER.LOG_PERIOD", "1"]
    if semisup:
        opts += ["SSL.TRAIN_SSL", "True", "SSL.TEACHER_CKPT", teacher]
    for k, v in extra.items():
        opts += [k.replace("__", "."), str(v)]
    return opts


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"eval"' not in line]


@pytest.mark.parametrize("semisup", [False, True], ids=["supervised", "semisup"])
def test_resume_is_bitwise_identical_on_the_tiny_config(
    tmp_path, synthetic_cache, teacher_ckpt, semisup
):
    n, k = 4, 2  # semisup: the burn-in ends at iteration 1, EMA steps on both sides of k
    opts = _opts(
        synthetic_cache,
        semisup,
        teacher_ckpt,
        SOLVER__MAX_ITER=n,
        SOLVER__CHECKPOINT_PERIOD=k,
        SSL__BURNIN_ITER=1,
    )
    straight = build_trainer(setup(_args(opts, tmp_path / "a")))
    straight.train(0, n)

    class _Stop(HookBase):
        def after_step(self):
            if self.trainer.iter + 1 == k:
                raise KeyboardInterrupt  # "killed" right after the checkpoint of iteration k

    out = tmp_path / "b"
    first = build_trainer(setup(_args(opts, out)))
    first.register_hooks([_Stop()])
    with pytest.raises(KeyboardInterrupt):
        first.train(0, n)
    assert (out / "last_checkpoint").read_text() == f"model_{k - 1:07d}.pth"

    torch.manual_seed(99)  # a new process: unrelated RNG state until the checkpoint's
    resumed = build_trainer(setup(_args(opts, out, "--resume")), resume=True)
    assert resumed.start_iter == k
    resumed.train(resumed.start_iter, n)

    _assert_bitwise_equal(_state(straight.model), _state(resumed.model))
    if semisup:
        _assert_bitwise_equal(_state(straight.teacher), _state(resumed.teacher))
    assert resumed.labeled_loader.state_dict() == straight.labeled_loader.state_dict()
    a, b = _metrics(tmp_path / "a"), _metrics(out)
    assert [r["iteration"] for r in b] == list(range(n))  # no line twice after the resume
    assert [r["total_loss"] for r in a[k:]] == [r["total_loss"] for r in b[k:]]


@pytest.mark.parametrize("semisup", [False, True], ids=["supervised", "semisup"])
def test_loss_goes_down_on_the_tiny_config(tmp_path, synthetic_cache, teacher_ckpt, semisup):
    n = 16
    opts = _opts(
        synthetic_cache,
        semisup,
        teacher_ckpt,
        SOLVER__MAX_ITER=n,
        SOLVER__STEPS=f"({n},)",
        SOLVER__CHECKPOINT_PERIOD=0,
        SOLVER__BASE_LR=1e-3,
        SSL__BURNIN_ITER=12,
        SEED=0,
    )
    trainer = build_trainer(setup(_args(opts, tmp_path)))
    trainer.train(0, n)
    records = _metrics(tmp_path)
    assert [r["phase"] for r in records[:1]] == ["burn_in" if semisup else "supervised"]

    def mean(part):
        return sum(r["total_loss"] for r in part) / len(part)

    # Semi-supervised, the labeled classification term competes with the unlabeled one
    # (no pseudo-label passes a random teacher's threshold: "all queries are no-object"), so
    # the quantity that must fall is the total loss, which is what the optimizer minimizes.
    first, last = mean(records[:4]), mean(records[-4:])
    print(f"total loss: first 4 iterations {first:.2f}, last 4 {last:.2f}")
    assert last < 0.85 * first, (first, last)


def test_published_command_lines_end_to_end(tmp_path, synthetic_cache):
    """Stage 1, stage 2 from its model_final.pth, then --eval-only SSL.EVAL_WHO BOTH."""
    data = ["DATASETS.SYNTHETIC.CACHE_DIR", synthetic_cache]
    main(_args(data, tmp_path / "teacher"))
    teacher = tmp_path / "teacher" / "model_final.pth"
    assert teacher.is_file()
    assert (tmp_path / "teacher" / "eval" / "student" / "synthetic_val" / "metrics.json").is_file()
    stage2 = [*data, "SSL.TRAIN_SSL", "True", "SSL.TEACHER_CKPT", str(teacher)]
    main(_args(stage2, tmp_path / "student"))
    final = load_file(tmp_path / "student" / "model_final.pth")
    assert {"model", "teacher", "optimizer", "scheduler", "rng", "data", "config"} <= set(final)
    # class names travel with the weights (gdseg predict needs no dataset)
    from gdseg.data.catalog import get_metadata

    assert final["metadata"]["thing_classes"] == get_metadata("synthetic_train")["thing_classes"]
    phases = [r["phase"] for r in _metrics(tmp_path / "student")]
    assert phases == ["burn_in", "burn_in", "ema", "ema"]
    # --resume of a finished run: nothing left to train, nothing trained twice.
    main(_args(stage2, tmp_path / "student", "--resume"))
    assert len(_metrics(tmp_path / "student")) == 4
    weights = ["MODEL.WEIGHTS", str(tmp_path / "student" / "model_final.pth")]
    main(_args([*data, *weights, "SSL.EVAL_WHO", "BOTH"], tmp_path / "eval", "--eval-only"))
    for who in ("student", "teacher"):
        path = tmp_path / "eval" / "eval" / who / "synthetic_val" / "metrics.json"
        metrics = json.loads(path.read_text())
        assert set(metrics["segm"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}


@pytest.mark.slow  # spawning two interpreters that import torch takes 20-60 s on 2 busy cores
@pytest.mark.distributed
def test_two_gloo_processes_stay_in_sync(tmp_path, synthetic_cache, teacher_ckpt):
    """Guided distillation across the burn-in switch: student (DDP) and teacher (not)."""
    out, report = tmp_path / "out", tmp_path / "report"
    report.mkdir()
    opts = _opts(synthetic_cache, True, teacher_ckpt, SSL__BURNIN_ITER=1, SOLVER__MAX_ITER=3)
    args = _args(opts, out, "--num-gpus", "2")
    launch(distributed_worker, 2, args=(args, str(report)), backend="gloo")
    r0 = torch.load(report / "rank0.pth", weights_only=True)
    r1 = torch.load(report / "rank1.pth", weights_only=True)
    # Parameters agree (gradients are averaged); BatchNorm statistics of the student follow
    # each process's last batch (DDP resyncs them from rank 0 at every forward), and the
    # teacher, updated from resynced statistics, agrees entirely.
    params = [k for k in r0["student"] if "running_" not in k and "num_batches" not in k]
    _assert_bitwise_equal(
        {k: r0["student"][k] for k in params}, {k: r1["student"][k] for k in params}
    )
    _assert_bitwise_equal(r0["teacher"], r1["teacher"])
    assert r1["writes"] == []
    assert sorted(os.listdir(out)) == [
        "config.yaml",
        "last_checkpoint",
        "log.txt",
        "metrics.jsonl",
        "model_0000001.pth",
        "model_final.pth",
    ]
    ckpt = load_file(out / "model_final.pth")
    assert len(ckpt["rng"]["per_rank"]) == 2
    assert ckpt["data"]["labeled"]["world_size"] == 2


def test_command_line_errors_are_clear(tmp_path, synthetic_cache):
    with pytest.raises(ConfigError, match="SOLVER.BASE_LR"):
        setup(_args(["SOLVER.BASE_LRR", "0.1"], tmp_path))
    with pytest.raises(ValueError, match="EVAL_WHO"):
        setup(_args(["SSL.EVAL_WHO", "EVERYONE"], tmp_path))
    cfg = setup(_args(_opts(synthetic_cache, semisup=True, teacher=""), tmp_path))
    with pytest.raises(ValueError, match="SSL.TEACHER_CKPT"):
        build_trainer(cfg)
    assert (tmp_path / "config.yaml").read_text().count("TRAIN_SSL: true") == 1


def test_train_net_py_takes_the_published_flags():
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(
        [sys.executable, os.path.join(root, "train_net.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
    ).stdout
    for flag in (
        "--config-file",
        "--num-gpus",
        "--num-machines",
        "--machine-rank",
        "--dist-url",
        "--resume",
        "--eval-only",
        "opts",
    ):
        assert flag in out


def test_flags_after_the_config_overrides_are_still_flags():
    from gdseg.engine.train import _flags_from_opts

    parser = add_train_args(argparse.ArgumentParser())
    argv = ["--config-file", "a.yaml", "OUTPUT_DIR", "o", "--eval-only", "SOLVER.STEPS", "(5,)"]
    args = _flags_from_opts(parser.parse_args(argv + ["--num-gpus=2", "SEED", "-1"]))
    assert args.eval_only and args.num_gpus == 2 and not args.resume
    assert args.opts == ["OUTPUT_DIR", "o", "SOLVER.STEPS", "(5,)", "SEED", "-1"]
    with pytest.raises(SystemExit, match="--evaluate"):
        _flags_from_opts(parser.parse_args(["OUTPUT_DIR", "o", "--evaluate"]))
