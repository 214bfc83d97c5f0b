"""The demo pipeline (``gdseg demo``) end to end at a tiny size: both stages train with the real
engine, the teacher checkpoint of stage 1 drives stage 2, and results, plots and overlays are
written."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from gdseg.demo import add_demo_args, format_table, main, run_demo
from gdseg.plots import read_metrics
from tests.threads import torch_threads

# Seconds, not minutes: 64 px images, 8 training images (4 labeled), 2 validation images,
# 4 iterations per stage with the burn-in ending at iteration 2.
TINY = [
    "DATASETS.SYNTHETIC.NUM_TRAIN", "8",
    "DATASETS.SYNTHETIC.NUM_VAL", "2",
    "SSL.PERCENTAGE", "50",
    "SSL.BURNIN_ITER", "2",
    "SOLVER.MAX_ITER", "4",
    "SOLVER.CHECKPOINT_PERIOD", "2",
    "TEST.EVAL_PERIOD", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def one_thread():
    # Two BLAS threads on a shared 2-core machine are many times slower than one.
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("demo")
    out = tmp / "out"
    opts = [*TINY, "DATASETS.SYNTHETIC.CACHE_DIR", str(tmp / "cache")]
    results = run_demo(
        str(out), seed=1, config_file="demo/tiny_instant.yaml", opts=opts, num_overlays=1
    )
    return out, results


def test_results_json_structure(demo_run):
    out, results = demo_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    for model in ("supervised", "guided_distillation", "guided_distillation_teacher"):
        segm = on_disk[model]["segm"]
        for key in ("AP", "AP50", "AP75"):
            assert 0.0 <= segm[key] <= 100.0
    for key in ("AP", "AP50", "AP75"):
        expected = on_disk["guided_distillation"]["segm"][key] - on_disk["supervised"]["segm"][key]
        assert on_disk["gain"][key] == pytest.approx(expected, abs=1e-2)
    s = on_disk["settings"]
    assert s["seed"] == 1
    assert s["labeled_percentage"] == 50.0
    assert (s["num_labeled"], s["num_unlabeled"], s["num_val"]) == (4, 8, 2)
    assert s["burnin_iter"] == 2 and s["iterations_per_stage"] == 4
    assert s["class_threshold"] == 0.7  # the published pseudo-label threshold
    for stage in ("data", "supervised", "guided_distillation", "plots_and_overlays", "total"):
        assert on_disk["timings"][stage]["wall_s"] >= 0
        assert on_disk["timings"][stage]["cpu_s"] >= 0


def test_stages_ran_and_wrote_checkpoints(demo_run):
    out, _ = demo_run
    for stage in ("supervised", "guided_distillation"):
        assert (out / stage / "model_final.pth").is_file()
        assert (out / stage / "config.yaml").is_file()
        windows, evals = read_metrics(out / stage / "metrics.jsonl")
        assert [w["iteration"] for w in windows][-1] == 3
        assert len(evals) == 2  # TEST.EVAL_PERIOD 2 of 4 iterations, and the final one
    windows, _ = read_metrics(out / "guided_distillation" / "metrics.jsonl")
    assert {w["phase"] for w in windows} == {"burn_in", "ema"}
    assert all("pseudo_labels_per_image" in w for w in windows)
    cfg_text = (out / "guided_distillation" / "config.yaml").read_text()
    assert str(out / "supervised" / "model_final.pth") in cfg_text


def test_stage2_teacher_is_the_stage1_model_during_burn_in(demo_run):
    out, _ = demo_run
    load = lambda p: torch.load(p, map_location="cpu", weights_only=True)  # noqa: E731
    stage1 = load(out / "supervised" / "model_final.pth")["model"]
    during_burn_in = load(out / "guided_distillation" / "model_0000001.pth")
    final = load(out / "guided_distillation" / "model_final.pth")
    for k, v in stage1.items():
        assert torch.equal(during_burn_in["teacher"][k], v), k
    # The student starts fresh, not from the teacher; after the burn-in the teacher moves.
    assert any(not torch.equal(final["teacher"][k], v) for k, v in stage1.items())
    assert not all(torch.equal(during_burn_in["model"][k], v) for k, v in stage1.items())


def test_plots_and_overlays_written(demo_run):
    out, results = demo_run
    plots = {os.path.basename(p) for p in results["files"]["plots"]}
    assert plots == {"training_curves.png", "ap_over_iterations.png", "pseudo_labels.png"}
    for p in results["files"]["plots"] + results["files"]["overlays"]:
        assert os.path.getsize(p) > 1000
    assert len(results["files"]["overlays"]) == 1
    assert results["files"]["overlays"][0].startswith(str(out / "overlays"))


def test_table_names_both_models_and_the_gain(demo_run):
    _, results = demo_run
    table = format_table(results)
    assert "supervised only" in table and "guided distillation" in table
    assert f"{results['gain']['AP']:+.1f}" in table


def test_cli_arguments():
    parser = add_demo_args(argparse.ArgumentParser())
    args = parser.parse_args(["--out", "x", "--seed", "3", "SOLVER.MAX_ITER", "5"])
    assert (args.out, args.seed, args.opts) == ("x", 3, ["SOLVER.MAX_ITER", "5"])
    assert callable(main)
