"""The gain from unlabeled images: the demo's experiment over several seeds, plus an upper bound.

For every seed (default 0, 1, 2) this runs exactly what ``gdseg demo --seed S`` runs (same
config, same code): a supervised model on the labeled fraction (stage 1, also the teacher) and
a guided-distillation student (stage 2), both evaluated on the same synthetic validation set.
The seed picks the labeled images (``SSL.SPLIT_SEED``) and the training randomness (``SEED``);
the dataset itself is fixed. The upper bound is the same model, same iterations, trained
supervised on 100 % of the labels. Results go to ``<out>/summary.json`` and to BENCHMARKS.md
between the ``semisup_gain`` markers (the rest of the file is kept).

A seed whose ``<out>/seed_<S>/results.json`` already exists is not run again (``--rerun``).

    python benchmarks/semisup_gain.py [--seeds 0 1 2] [--out output/semisup_gain] [KEY VALUE ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import load, machine, write_section

from gdseg.demo import DEFAULT_CONFIG, final_metrics, run_demo, train_stage

REQUIRED_GAIN = 3.0
logger = logging.getLogger("semisup_gain")


def _machine() -> str:
    return (
        f"{machine()} (load average {load()} at the end), "
        f"{torch.get_num_threads()} torch thread(s), Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def _upper_bound(args: argparse.Namespace, seed: int, seed_dir: Path) -> dict:
    """Same model and iterations, supervised on every label; cached in upper_bound.json."""
    cache = seed_dir / "upper_bound.json"
    if cache.is_file() and not args.rerun:
        return json.loads(cache.read_text())
    opts = [
        *args.opts,
        "SEED", str(seed),
        "SSL.SPLIT_SEED", str(seed),
        "SSL.PERCENTAGE", "100",
        "SSL.TRAIN_SSL", "False",
        "OUTPUT_DIR", str(seed_dir / "supervised_100"),
    ]  # fmt: skip
    config = args.config_file
    if not os.path.isfile(config):
        from gdseg.model_zoo import get_config_file

        config = get_config_file(config)
    _, trainer, timing = train_stage(config, opts)
    result = {"segm": final_metrics(trainer), "timing": timing}
    cache.write_text(json.dumps(result, indent=2))
    return result


def _run_seed(args: argparse.Namespace, seed: int) -> dict:
    seed_dir = Path(args.out) / f"seed_{seed}"
    path = seed_dir / "results.json"
    if path.is_file() and not args.rerun:
        logger.info("seed %d: reusing %s", seed, path)
        results = json.loads(path.read_text())
    else:
        results = run_demo(
            str(seed_dir), seed=seed, config_file=args.config_file, opts=args.opts, num_overlays=2
        )
    if args.upper_bound:
        results["supervised_100"] = _upper_bound(args, seed, seed_dir)
    return results


def _row(seed, r: dict) -> str:
    sup, gd = r["supervised"]["segm"], r["guided_distillation"]["segm"]
    ub = r.get("supervised_100", {}).get("segm", {})
    t = r["timings"]
    cells = [
        str(seed),
        f"{sup['AP']:.1f} / {sup['AP50']:.1f} / {sup['AP75']:.1f}",
        f"{gd['AP']:.1f} / {gd['AP50']:.1f} / {gd['AP75']:.1f}",
        f"**{gd['AP'] - sup['AP']:+.1f}**",
        f"{ub['AP']:.1f} / {ub['AP50']:.1f} / {ub['AP75']:.1f}" if ub else "-",
        f"{r['pseudo_labels_per_image'].get('last_window', float('nan')):.2f}",
        f"{t['supervised']['wall_s']:.0f} / {t['guided_distillation']['wall_s']:.0f} / "
        f"{t['total']['wall_s']:.0f}",
        f"{t['supervised']['cpu_s']:.0f} / {t['guided_distillation']['cpu_s']:.0f} / "
        f"{t['total']['cpu_s']:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def _mean_row(runs: dict) -> str:
    def ms(values):
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.1f} ± {sd:.1f}"

    sup = [r["supervised"]["segm"]["AP"] for r in runs.values()]
    gd = [r["guided_distillation"]["segm"]["AP"] for r in runs.values()]
    ub = [r["supervised_100"]["segm"]["AP"] for r in runs.values() if "supervised_100" in r]
    gain = [g - s for g, s in zip(gd, sup)]
    return f"| mean ± sd | {ms(sup)} | {ms(gd)} | **{ms(gain)}** | {ms(ub) if ub else '-'} | | | |"


def _section(args: argparse.Namespace, runs: dict) -> str:
    first = next(iter(runs.values()))
    s = first["settings"]
    gains = {seed: r["gain"]["AP"] for seed, r in runs.items()}
    ok = all(g >= REQUIRED_GAIN for g in gains.values())
    verdict = (
        f"Guided distillation beats supervised-only by >= {REQUIRED_GAIN:g} AP on every seed: "
        f"**{'yes' if ok else 'NO'}** (gains {', '.join(f'{g:+.1f}' for g in gains.values())})."
    )
    rows = "\n".join(_row(seed, r) for seed, r in runs.items())
    command = "python benchmarks/semisup_gain.py " + " ".join(
        ["--seeds", *map(str, runs)] + (["--config-file", args.config_file]
                                         if args.config_file != DEFAULT_CONFIG else [])
        + list(args.opts)
    )  # fmt: skip
    return f"""## Gain from unlabeled images (`benchmarks/semisup_gain.py`)

{datetime.date.today().isoformat()}, {_machine()}.
Command: `{command.strip()}`; every seed runs exactly `gdseg demo --seed S` (config
`{args.config_file}`{", overrides " + " ".join(args.opts) if args.opts else ""}).

Settings: synthetic shapes, {s["image_size"]} px, {s["num_val"]} validation images;
{s["labeled_percentage"]:g} % labels = {s["num_labeled"]} labeled images, all
{s["num_unlabeled"]} training images as unlabeled images; {s["backbone"]} (weights:
{s.get("backbone_weights", "none (random init)")}) +
Mask2Former head (hidden {s["hidden_dim"]}, {s["num_queries"]} queries,
{s["decoder_layers"]} decoder layers); {s["iterations_per_stage"]} iterations per stage, batch
{s["ims_per_batch"]} labeled (+ {s["ims_per_batch"] if s["ims_per_batch_unlabeled"] < 0 else s["ims_per_batch_unlabeled"]}
unlabeled in stage 2), AdamW lr {s["base_lr"]:g}, steps {s["lr_steps"]}; burn-in
{s["burnin_iter"]} iterations, EMA decay {s["ema_decay"]:g}; pseudo-labels: class threshold
{s["class_threshold"]:g}, mask threshold {s["mask_threshold"]:g}, min mask area
{s["min_mask_area"]:g}; unlabeled loss weight {s["unsup_loss_weight"]:g}.
The seed sets the labeled images and the training randomness; the data set is fixed. Both
models: same architecture, same iterations, same labeled batches and schedule, same
evaluation (COCO mask AP of the final weights on the validation set). The 100 % row is the
same model and iterations trained supervised on every label (upper bound).

| seed | supervised only AP / AP50 / AP75 | guided distillation AP / AP50 / AP75 | gain (AP) | 100 % labels AP / AP50 / AP75 | pseudo-labels per image (end) | wall s: stage 1 / stage 2 / demo total | CPU s: stage 1 / stage 2 / demo total |
|---|---|---|---|---|---|---|---|
{rows}
{_mean_row(runs)}

{verdict}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="output/semisup_gain", help="output folder")
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument(
        "--no-upper-bound", dest="upper_bound", action="store_false",
        help="skip the 100 %% labels run",
    )  # fmt: skip
    parser.add_argument("--rerun", action="store_true", help="ignore finished seeds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument(
        "--output", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S"
    )
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    runs = {seed: _run_seed(args, seed) for seed in args.seeds}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(runs, indent=2))
    section = _section(args, runs)
    write_section("semisup_gain", section, args.output)
    print(section)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
