"""Training-step, inference and guided-distillation speed: gdseg vs transformers' Mask2Former.

The work (issue 6): ResNet-50 Mask2Former with the published COCO settings (80 classes, 100
queries, 6 deformable encoder layers, 9 decoder layers, 12544 points, deep supervision), fp32,
batch 2 at 384x384 with 5 instances per image, one AdamW step (gradient clipping at 0.01 on
the whole model's norm, as published, on both sides). Both models start from random weights;
nothing is downloaded. transformers' model is built from
``Mask2FormerConfig(backbone_config=ResNetConfig(R-50), num_labels=80, use_timm_backbone=False)``.

Rows (timings are wall clock with ``--threads`` torch threads, default 2; A and B alternate in
one process, the order flipping every pair, and the ratio is the median of the per-pair ratios):

- ``train``: gdseg's real ``Trainer.run_step`` (supervised) vs transformers' forward with labels
  + backward + clipping + AdamW step.
- ``infer``: one 512x512 image, eval mode, ``no_grad``, the full network output.
- ``gd``: one guided-distillation iteration with the real ``Trainer.run_step`` (teacher forward
  on the weak views, pseudo-labels, the student on labeled + strong views -- two passes on the
  CPU, the trainer's default there --, one backward, one step) plus the EMA teacher update of
  the hook, vs gdseg's supervised step on the same batch.
  The random teacher's class threshold is set so that about 5 pseudo-labels per image pass.
- ``memory``: peak resident memory of each of the above, one fresh subprocess per case
  (``VmHWM`` after two steps; growth = that minus ``VmRSS`` once the models and data are
  built, the peak having been reset through ``/proc/self/clear_refs``).
- opt-in rows vs gdseg fp32: ``bf16`` (CPU autocast), ``channels_last``, ``compile``
  (``torch.compile`` of the model, compile time reported).
- allocator: the process runs with gdseg's CPU allocator setting (``KEEP_FREED_MEMORY``,
  which ``gdseg train`` applies: glibc keeps freed memory instead of page-faulting it in again
  every step), for both models alike; ``--malloc default`` keeps glibc's defaults.
- ``breakdown``: forward/backward time per part (backbone, pixel decoder, transformer decoder,
  criterion) of both models, timed by module and tensor hooks inside real steps.

    python benchmarks/train_step.py [--rows train infer gd memory bf16 channels_last compile
        breakdown] [--pairs 5] [--threads 2] [--malloc gdseg|default] [--note TEXT]
        [--save run.json] [--write]
    python benchmarks/train_step.py --render run.json [--note TEXT] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import cpu_flags, load, machine, write_section  # noqa: E402

from gdseg.config import get_cfg  # noqa: E402
from gdseg.engine.amp import resolve_precision  # noqa: E402
from gdseg.engine.host_memory import keep_freed_memory  # noqa: E402
from gdseg.engine.optim import build_optimizer  # noqa: E402
from gdseg.engine.trainer import Preprocess, SemisupSettings, Trainer  # noqa: E402
from gdseg.modeling import build_criterion, build_model  # noqa: E402
from gdseg.modeling.preprocess import batch_images  # noqa: E402
from gdseg.semisup.ema import ema_update  # noqa: E402

CONFIG = ROOT / "gdseg/configs/coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml"
CLIP = ("full_model", 0.01, 2.0)  # published SOLVER.CLIP_GRADIENTS


# -- the work ------------------------------------------------------------------------------
def gdseg_cfg():
    cfg = get_cfg()
    cfg.merge_from_file(str(CONFIG))
    cfg.MODEL.WEIGHTS = ""
    return cfg


def make_batch(batch: int, size: int, instances: int, seed: int) -> list[dict]:
    """Loader-style labeled batch: uint8 images, ``instances`` ellipses per image."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = []
    for _ in range(batch):
        image = torch.randint(0, 256, (3, size, size), generator=gen, dtype=torch.uint8)
        masks = []
        for _ in range(instances):
            cy, cx = (torch.rand(2, generator=gen) * size).tolist()
            ry, rx = (torch.rand(2, generator=gen) * size / 4 + size / 16).tolist()
            masks.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1)
        labels = torch.randint(0, 80, (instances,), generator=gen)
        out.append({"image": image, "instances": {"labels": labels, "masks": torch.stack(masks)}})
    return out


def unlabeled_batch(labeled: list[dict]) -> list[dict]:
    """Weak view = the labeled image; strong view = a photometric change of it."""
    return [
        {"image_weak": d["image"], "image_strong": (d["image"].float() * 0.8 + 20).byte()}
        for d in labeled
    ]


def normalized(images: list[torch.Tensor]) -> torch.Tensor:
    cfg = gdseg_cfg()
    return batch_images(images, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, 32)[0]


def gdseg_trainer(
    model, labeled, teacher=None, unlabeled=None, semisup=None, precision="fp32", optimizer=None
):
    cfg = gdseg_cfg()
    prec = resolve_precision(
        precision != "fp32", "bf16" if precision == "fp32" else precision, "cpu"
    )
    return Trainer(
        model,
        build_criterion(cfg),
        optimizer or build_optimizer(cfg, model),
        itertools.repeat(labeled),
        Preprocess(cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, 32),
        prec,
        "cpu",
        teacher=teacher,
        unlabeled_loader=None if unlabeled is None else itertools.repeat(unlabeled),
        semisup=semisup,
        clip=CLIP,
    )


def hf_model():
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig

    backbone = ResNetConfig(
        depths=[3, 4, 6, 3],
        hidden_sizes=[256, 512, 1024, 2048],
        layer_type="bottleneck",
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(backbone_config=backbone, num_labels=80, use_timm_backbone=False)
    return Mask2FormerForUniversalSegmentation(config)


def hf_step_fn(model, labeled):
    images = normalized([d["image"] for d in labeled])
    masks = [d["instances"]["masks"].float() for d in labeled]
    labels = [d["instances"]["labels"] for d in labeled]
    # fused, as transformers' Trainer defaults to ("adamw_torch_fused") and as gdseg uses
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    model.train()

    def step():
        loss = model(pixel_values=images, mask_labels=masks, class_labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP[1], CLIP[2])
        optimizer.step()

    return step


def calibrated_semisup(teacher, unlabeled, per_image: int = 5) -> SemisupSettings:
    """Class threshold under which ~``per_image`` queries per image of the random teacher pass
    (the batch's ``per_image * B``-th highest object score, a trained teacher's typical count)."""
    with torch.no_grad():
        out = teacher(normalized([d["image_weak"] for d in unlabeled]))
    probs = out["pred_logits"].softmax(-1)
    scores, labels = probs.max(-1)
    scores = scores.masked_fill(labels == probs.shape[-1] - 1, 0).flatten().sort(descending=True)
    k = per_image * len(unlabeled)
    threshold = (scores.values[k - 1] + scores.values[k]).item() / 2
    return SemisupSettings(burnin_iter=0, ema_decay=0.9996, class_threshold=threshold)


# -- timing --------------------------------------------------------------------------------
def alternate(a, b, pairs: int, warmup: int = 1) -> dict:
    """Run ``a`` and ``b`` alternately (order flipping each pair).

    Returns median wall seconds of each, the median of the per-pair wall-time ratios A/B, and
    the same from process CPU time (``cpu_*``), which other processes on the machine disturb
    less than wall time.
    """
    for _ in range(warmup):
        a()
        b()
    times = {"a": [], "b": [], "cpu_a": [], "cpu_b": []}
    for i in range(pairs):
        for key, fn in (("a", a), ("b", b)) if i % 2 == 0 else (("b", b), ("a", a)):
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            times[key].append(time.perf_counter() - start)
            times["cpu_" + key].append(time.process_time() - cpu)
    ratios = [x / y for x, y in zip(times["a"], times["b"])]
    cpu_ratios = [x / y for x, y in zip(times["cpu_a"], times["cpu_b"])]
    return {
        **{k: statistics.median(v) for k, v in times.items()},
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "cpu_ratio": statistics.median(cpu_ratios),
    }


def _no_grad(fn):
    def run():
        with torch.no_grad():
            fn()

    return run


def row_train(args) -> dict:
    labeled = make_batch(args.batch, args.size, args.instances, seed=0)
    torch.manual_seed(0)
    ours = gdseg_trainer(build_model(gdseg_cfg()), labeled)
    hf_step = hf_step_fn(hf_model(), labeled)
    return alternate(ours.run_step, hf_step, args.pairs)


def row_infer(args) -> dict:
    images = normalized([d["image"] for d in make_batch(1, args.infer_size, 1, seed=1)])
    torch.manual_seed(0)
    ours, hf = build_model(gdseg_cfg()).eval(), hf_model().eval()
    return alternate(
        _no_grad(lambda: ours(images)), _no_grad(lambda: hf(pixel_values=images)), args.pairs
    )


def gd_setup(args, precision="fp32"):
    labeled = make_batch(args.batch, args.size, args.instances, seed=0)
    unlabeled = unlabeled_batch(make_batch(args.batch, args.size, args.instances, seed=2))
    torch.manual_seed(0)
    student = build_model(gdseg_cfg())
    teacher = build_model(gdseg_cfg()).eval()
    semisup = calibrated_semisup(teacher, unlabeled)
    sup = gdseg_trainer(student, labeled, precision=precision)
    gd = gdseg_trainer(
        student, labeled, teacher, unlabeled, semisup, precision, optimizer=sup.optimizer
    )

    def gd_step():
        ema_update(teacher, student, semisup.ema_decay)  # the EMA hook's before_step
        gd.run_step()

    return gd, gd_step, sup.run_step


def row_gd(args) -> dict:
    gd, gd_step, sup_step = gd_setup(args)
    res = alternate(gd_step, sup_step, args.pairs)
    res["pseudo_labels_per_image"] = gd.step_metrics.get("pseudo_labels_per_image", float("nan"))
    return res


def row_variant(args, variant: str) -> dict:
    """gdseg supervised step with an opt-in (A) vs plain fp32 gdseg (B)."""
    labeled = make_batch(args.batch, args.size, args.instances, seed=0)
    torch.manual_seed(0)
    base = gdseg_trainer(build_model(gdseg_cfg()), labeled)
    torch.manual_seed(0)
    model = build_model(gdseg_cfg())
    extra = {}
    if variant == "bf16":
        opt = gdseg_trainer(model, labeled, precision="bf16")
    elif variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        opt = gdseg_trainer(model, labeled)
        opt._batch = _channels_last_batch(opt._batch)
    elif variant == "compile":
        opt = gdseg_trainer(torch.compile(model), labeled)
        start = time.perf_counter()
        opt.run_step()  # compiles forward and backward
        extra["compile_s"] = time.perf_counter() - start
    else:
        raise ValueError(variant)
    res = alternate(opt.run_step, base.run_step, args.pairs)
    res.update(extra)
    return res


def _channels_last_batch(batch_fn):
    def run(images):
        x, sizes = batch_fn(images)
        return x.contiguous(memory_format=torch.channels_last), sizes

    return run


# -- memory (one subprocess per case) ------------------------------------------------------
def _rss_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, MiB. Not ``ru_maxrss``: Linux
    carries the parent's peak into a child through fork and exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(args) -> None:
    case = args.memory_child
    if case == "gdseg_train":
        labeled = make_batch(args.batch, args.size, args.instances, seed=0)
        fn = gdseg_trainer(build_model(gdseg_cfg()), labeled).run_step
    elif case == "hf_train":
        fn = hf_step_fn(hf_model(), make_batch(args.batch, args.size, args.instances, seed=0))
    elif case == "gdseg_gd":
        fn = gd_setup(args)[1]
    elif case in ("gdseg_infer", "hf_infer"):
        images = normalized([d["image"] for d in make_batch(1, args.infer_size, 1, seed=1)])
        if case == "gdseg_infer":
            model = build_model(gdseg_cfg()).eval()
            fn = _no_grad(lambda: model(images))
        else:
            model = hf_model().eval()
            fn = _no_grad(lambda: model(pixel_values=images))
    else:
        raise ValueError(case)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    base = _rss_mb("VmRSS")
    fn()
    fn()
    print(json.dumps({"base_mb": base, "peak_mb": _rss_mb("VmHWM")}))


def row_memory(args) -> dict:
    out = {}
    for case in ("gdseg_train", "hf_train", "gdseg_gd", "gdseg_infer", "hf_infer"):
        cmd = [
            sys.executable,
            __file__,
            "--memory-child",
            case,
            "--size",
            str(args.size),
            "--infer-size",
            str(args.infer_size),
            "--batch",
            str(args.batch),
            "--instances",
            str(args.instances),
            "--threads",
            str(args.threads),
            "--malloc",
            args.malloc,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[case] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"  memory {case}: {out[case]}", flush=True)
    return out


# -- breakdown -----------------------------------------------------------------------------
def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


def _detached(x):
    """Same structure, every float tensor a fresh leaf that requires grad."""
    if isinstance(x, torch.Tensor):
        return x.detach().requires_grad_(x.requires_grad)
    if isinstance(x, dict):
        return {k: _detached(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_detached(v) for v in x)
    return x


def staged_step(stages, inputs, optimizer, clock=time.process_time) -> dict:
    """One training step run stage by stage, the stages cut apart by ``detach``.

    ``stages``: (name, fn) in forward order; each fn maps the previous stage's output to its
    own, the last one to the loss. Backward then runs stage by stage from the loss down,
    feeding each stage's input gradients to the previous one, so every part's forward and
    backward time is measured exactly (the same work as one fused backward).
    """
    row, outs, ins = {}, [], []
    x = inputs
    for name, fn in stages:
        ins.append(x)
        start = clock()
        x = fn(x)
        row[f"{name} fwd"] = clock() - start
        outs.append(x)
        x = _detached(x)
    optimizer.zero_grad(set_to_none=True)
    grads = None
    for i in range(len(stages) - 1, -1, -1):
        pairs = list(zip(_tensors(outs[i]), grads)) if grads is not None else None
        start = clock()
        if pairs is None:
            outs[i].backward()
        else:
            pairs = [(t, g) for t, g in pairs if t.requires_grad and g is not None]
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        row[f"{stages[i][0]} bwd"] = clock() - start
        grads = [t.grad for t in _tensors(ins[i])] if i else None
    start = clock()
    optimizer.step()
    row["optimizer"] = clock() - start
    return row


def row_breakdown(args) -> dict:
    labeled = make_batch(args.batch, args.size, args.instances, seed=0)
    images = normalized([d["image"] for d in labeled])
    torch.manual_seed(0)
    cfg = gdseg_cfg()
    ours = build_model(cfg).train()
    ours_tr = gdseg_trainer(ours, labeled)
    targets = ours_tr._labeled_inputs(labeled)[1]
    criterion = build_criterion(cfg)
    head = ours.sem_seg_head
    ours_stages = [
        ("backbone", ours.backbone),
        ("pixel decoder", lambda f: list(head.pixel_decoder(f))),
        ("transformer decoder", lambda o: head.predictor(o[1], o[0])),
        ("criterion", lambda o: sum(criterion(o, targets).values())),
    ]
    hf = hf_model().train()
    plm, tm = hf.model.pixel_level_module, hf.model.transformer_module
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)
    masks = [d["instances"]["masks"].float() for d in labeled]
    labels = [d["instances"]["labels"] for d in labeled]

    def hf_decoder(o):
        t = tm(multi_scale_features=o[1], mask_features=o[0], output_hidden_states=True)
        return [list(t.intermediate_hidden_states), list(t.masks_queries_logits)]

    def hf_loss(o):  # transformers' top module: class head, then the loss
        classes = [hf.class_predictor(h.transpose(0, 1)) for h in o[0]]
        aux = hf.get_auxiliary_logits(classes, o[1])
        return hf.get_loss(hf.get_loss_dict(o[1][-1], classes[-1], masks, labels, aux))

    hf_stages = [
        ("backbone", lambda x: list(plm.encoder(x).feature_maps)),
        ("pixel decoder", _hf_pixel_decoder(plm)),
        ("transformer decoder", hf_decoder),
        ("criterion", hf_loss),
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(args.breakdown_threads)
    clock = time.process_time if args.breakdown_clock == "cpu" else time.perf_counter
    stat = statistics.median if args.breakdown_stat == "median" else min
    rows = {"gdseg": [], "transformers": []}
    for i in range(args.pairs + 1):
        r1 = staged_step(ours_stages, images, ours_tr.optimizer, clock)
        r2 = staged_step(hf_stages, images, hf_opt, clock)
        if i:  # the first step is warm-up
            rows["gdseg"].append(r1)
            rows["transformers"].append(r2)
    torch.set_num_threads(threads)
    return {k: {n: stat(r[n] for r in v) for n in v[0]} for k, v in rows.items()}


def _hf_pixel_decoder(plm):
    def run(features):
        out = plm.decoder(features)
        return [out.mask_features, list(out.multi_scale_features)]

    return run


# -- report --------------------------------------------------------------------------------
ROW_NAMES = {
    "train": ("gdseg train step", "transformers train step"),
    "infer": ("gdseg forward", "transformers forward"),
    "gd": ("gdseg GD iteration", "gdseg supervised step"),
    "bf16": ("gdseg step, bf16 autocast", "gdseg step fp32"),
    "channels_last": ("gdseg step, channels-last", "gdseg step fp32"),
    "compile": ("gdseg step, torch.compile", "gdseg step fp32"),
}
TARGETS = {"train": 0.6, "infer": 0.7, "gd": 2.4}  # issue 6 acceptance (A/B at most)


def environment(threads: int, malloc: str) -> str:
    """Machine, versions and allocator of this process (kept in --save files, so --render
    reports the machine that ran, not the one that renders)."""
    import transformers

    allocator = (
        "gdseg's allocator setting (glibc: 32 MiB mmap threshold, no trimming; both models)"
        if malloc == "gdseg"
        else "glibc's default allocator settings"
    )
    return (
        f"{machine()}, torch {torch.__version__} ({threads} thread(s)), transformers "
        f"{transformers.__version__}, Python {platform.python_version()}, {allocator}"
    )


def render(args, results: dict, loads: dict, date: str, env: str) -> str:
    """The BENCHMARKS.md section: header, ratio table, memory, breakdown."""
    lines = [
        "## Training step, inference, guided distillation (`benchmarks/train_step.py`)",
        "",
        f"{date}, {env}. Load average (1/5/15 min) before the run: {loads['start']}.",
        f"Work: ResNet-50 Mask2Former, published COCO settings, 80 classes, fp32, batch "
        f"{args.batch} at {args.size}x{args.size}, {args.instances} instances/image, fused AdamW + "
        f"clipping; inference: 1 image at {args.infer_size}x{args.infer_size}, eval, no_grad. "
        f"Random weights. A/B alternate in one process ({args.pairs} pairs after 1 warm-up "
        "pair, order flipping); A s / B s = median wall seconds, A/B = median of the per-pair "
        "wall-time ratios; CPU A/B = the same from process CPU time. Load = load average when "
        "the row finished: with other processes on the machine, absolute times are inflated "
        "and ratios noisier (both sides of a pair share the same conditions). Targets "
        "(issue 6): " + ", ".join(f"{k} <= {v}" for k, v in TARGETS.items()) + ".",
    ]
    if args.note:
        lines += ["", args.note]
    lines += ["", *_ratio_table(results, loads)]
    if "bf16" in results:
        flags = cpu_flags()
        has = "avx512_bf16" in flags or "amx_bf16" in flags
        lines += [
            "",
            "bf16: this CPU "
            + (
                "has native bf16 instructions (AVX-512 BF16 / AMX)."
                if has
                else "has no native bf16 instructions (no AVX-512 BF16 or AMX; "
                f"{'AVX-512' if 'avx512f' in flags else 'AVX2 only'}), so bf16 autocast "
                "converts and computes in emulation and is slower than fp32 here; it is an "
                "opt-in for CPUs and GPUs that have bf16 units."
            ),
        ]
    if "memory" in results:
        lines += ["", *_memory_table(results["memory"])]
    if "breakdown" in results and "error" not in results["breakdown"]:
        lines += ["", *_breakdown_table(args, results["breakdown"])]
    return "\n".join(lines)


def _ratio_table(results: dict, loads: dict) -> list[str]:
    lines = [
        "| row | A | B | A s | B s | A/B | per-pair A/B | CPU A/B | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, (a, b) in ROW_NAMES.items():
        if key not in results:
            continue
        r = results[key]
        if "error" in r:
            lines.append(f"| {key} | {a} | {b} | | | failed: {r['error']} | | | {loads[key]} |")
            continue
        per = " ".join(f"{x:.2f}" for x in r["ratios"])
        note = ""
        if key == "gd":
            note = f" ({r['pseudo_labels_per_image']:.1f} pseudo-labels/image)"
        if key == "compile":
            note = f" (compile {r['compile_s']:.0f} s)"
        lines.append(
            f"| {key} | {a}{note} | {b} | {r['a']:.2f} | {r['b']:.2f} | **{r['ratio']:.2f}** "
            f"| {per} | {r['cpu_ratio']:.2f} | {loads[key]} |"
        )
    return lines


def _memory_table(m: dict) -> list[str]:
    if "error" in m:
        return [f"Peak memory: failed: {m['error']}"]
    lines = [
        "Peak memory: one fresh process per case; `VmHWM` (peak resident set) after two "
        "steps, and its growth over the process once models and data are built (activations,"
        " gradients, optimizer state, allocator caches).",
        "",
        "| case | peak RSS MiB | growth MiB |",
        "|---|---|---|",
    ]
    labels = {
        "gdseg_train": "gdseg train step",
        "hf_train": "transformers train step",
        "gdseg_gd": "gdseg GD iteration (student + teacher)",
        "gdseg_infer": "gdseg forward",
        "hf_infer": "transformers forward",
    }
    for case, v in m.items():
        lines.append(f"| {labels[case]} | {v['peak_mb']:.0f} | {v['peak_mb'] - v['base_mb']:.0f} |")
    return lines


def _breakdown_table(args, bd: dict) -> list[str]:
    lines = [
        f"Breakdown of one training step: {args.breakdown_clock} seconds, "
        f"{args.breakdown_threads} thread(s), {args.breakdown_stat} of {args.pairs} steps. The "
        "step runs stage by stage, cut apart by `detach`, and backward stage by stage (same "
        "work as one fused backward); transformers' class head counts as criterion.",
        "",
        "| part | gdseg | transformers |",
        "|---|---|---|",
    ]
    for part in bd["gdseg"]:
        lines.append(
            f"| {part} | {bd['gdseg'][part]:.3f} | "
            f"{bd['transformers'].get(part, float('nan')):.3f} |"
        )
    lines.append(
        f"| total | {sum(bd['gdseg'].values()):.3f} | {sum(bd['transformers'].values()):.3f} |"
    )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--rows",
        nargs="+",
        default=["train", "infer", "gd", "memory", "breakdown"],
        choices=["train", "infer", "gd", "memory", "bf16", "channels_last", "compile", "breakdown"],
    )
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--size", type=int, default=384)
    p.add_argument("--infer-size", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--instances", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--breakdown-clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="breakdown clock: process CPU time (robust to other load) or wall time",
    )
    p.add_argument("--breakdown-stat", choices=["median", "min"], default="median")
    p.add_argument(
        "--breakdown-threads",
        type=int,
        default=1,
        help="threads for the breakdown (1: CPU time is then close to the work done)",
    )
    p.add_argument(
        "--malloc",
        choices=["gdseg", "default"],
        default="gdseg",
        help="gdseg: the allocator setting gdseg train applies (KEEP_FREED_MEMORY); default: glibc's",
    )
    p.add_argument("--note", default="", help="a paragraph added to the section (e.g. load)")
    p.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    p.add_argument("--save", default="", help="also keep the results in this json (per row)")
    p.add_argument(
        "--render", default="", help="no run: render (and --write) the results of a --save json"
    )
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.malloc == "gdseg" and not args.render and not keep_freed_memory():
        print("note: gdseg's allocator setting does not apply here (not glibc, or MALLOC_* set)")
    if args.memory_child:
        memory_child(args)
        return
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        options = {**saved["args"], "note": args.note or saved["args"]["note"], "write": args.write}
        # older files: no environment saved
        env = saved.get("environment") or environment(options["threads"], "default")
        _report(argparse.Namespace(**options), saved["results"], saved["loads"], saved["date"], env)
        return
    fns = {
        "train": row_train,
        "infer": row_infer,
        "gd": row_gd,
        "memory": row_memory,
        "breakdown": row_breakdown,
        "bf16": lambda a: row_variant(a, "bf16"),
        "channels_last": lambda a: row_variant(a, "channels_last"),
        "compile": lambda a: row_variant(a, "compile"),
    }
    results, loads = {}, {"start": load()}
    for row in args.rows:
        start = time.perf_counter()
        try:
            results[row] = fns[row](args)
        except Exception as exc:  # an opt-in failing must not lose the other rows
            if row in ("train", "infer", "gd"):
                raise
            results[row] = {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
        loads[row] = load()
        summary = {k: v for k, v in results[row].items() if not isinstance(v, dict)}
        print(
            f"{row} ({time.perf_counter() - start:.0f} s, load {loads[row]}): {summary}", flush=True
        )
        if row == "breakdown" and "error" not in results[row]:
            for k, v in results[row].items():
                print(f"  {k}: " + ", ".join(f"{n} {t:.3f}" for n, t in v.items()), flush=True)
        if args.save:
            saved = {"args": vars(args), "results": results, "loads": loads}
            env = environment(args.threads, args.malloc)
            saved.update(date=str(datetime.date.today()), environment=env)
            Path(args.save).write_text(json.dumps(saved))
    _report(
        args, results, loads, str(datetime.date.today()), environment(args.threads, args.malloc)
    )


def _report(args, results: dict, loads: dict, date: str, env: str) -> None:
    text = render(args, results, loads, date, env)
    print(text)
    if args.write:
        write_section("train_step", text)


if __name__ == "__main__":
    main()
