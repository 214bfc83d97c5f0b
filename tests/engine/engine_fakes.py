"""Tiny stand-ins for the trainer tests: a Mask2Former-shaped model and resumable streams.

The model has the real output contract (pred_logits [B,Q,K+1], pred_masks [B,Q,H/4,W/4],
aux_outputs) in a few thousand parameters; the streams are pure functions of (seed,
position), like gdseg's loaders, so resuming them is exact.
"""

from __future__ import annotations

import torch
from torch import nn

from gdseg.config import get_cfg
from gdseg.engine import distributed as comm
from gdseg.engine.amp import resolve_precision
from gdseg.engine.checkpoint import Checkpointer
from gdseg.engine.hooks import LRScheduler, MetricsWriter, PeriodicCheckpointer, TeacherUpdate
from gdseg.engine.optim import build_lr_scheduler, build_optimizer
from gdseg.engine.trainer import Preprocess, SemisupSettings, Trainer
from gdseg.modeling.criterion import build_criterion

K, Q, SIZE = 3, 6, 64


class TinyMaskFormer(nn.Module):
    """Mask2Former's interface on a 2-conv backbone and a linear query head."""

    def __init__(self, dim: int = 16, num_aux: int = 2, norm: str = "GN") -> None:
        super().__init__()
        norm_layer = nn.BatchNorm2d(dim) if norm == "BN" else nn.GroupNorm(4, dim)
        self.backbone = nn.Sequential(
            nn.Conv2d(3, dim, 4, stride=4), norm_layer, nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1)
        )
        self.sem_seg_head = nn.ModuleDict(
            {
                "query_feat": nn.Embedding(Q, dim),
                "layers": nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_aux + 1)),
                "class_embed": nn.Linear(dim, K + 1),
                "mask_embed": nn.Linear(dim, dim),
            }
        )

    def forward(self, images: torch.Tensor) -> dict:
        feats = self.backbone(images)  # [B, C, H/4, W/4]
        h = self.sem_seg_head
        q = h["query_feat"].weight[None] + feats.mean((2, 3))[:, None]  # [B, Q, C]
        preds = []
        for layer in h["layers"]:
            q = q + torch.relu(layer(q))
            masks = torch.einsum("bqc,bchw->bqhw", h["mask_embed"](q), feats)
            preds.append({"pred_logits": h["class_embed"](q), "pred_masks": masks})
        return {**preds[-1], "aux_outputs": preds[:-1]}


def make_image(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An image with 1-2 coloured rectangles; the colour channel is the class."""
    image = torch.randint(0, 60, (3, SIZE, SIZE), generator=gen, dtype=torch.uint8)
    n = int(torch.randint(1, 3, (1,), generator=gen))
    labels, masks = [], []
    for _ in range(n):
        cls = int(torch.randint(0, K, (1,), generator=gen))
        y, x = (int(v) for v in torch.randint(0, SIZE - 24, (2,), generator=gen))
        hh, ww = (int(v) for v in torch.randint(12, 24, (2,), generator=gen))
        m = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        m[y : y + hh, x : x + ww] = True
        image[cls][m] = 230
        labels.append(cls)
        masks.append(m)
    return image, torch.tensor(labels, dtype=torch.long), torch.stack(masks)


class FakeStream:
    """Infinite labeled or unlabeled batches; batch i is a pure function of (seed, i)."""

    def __init__(self, batch_size: int = 2, unlabeled: bool = False, seed: int = 0) -> None:
        self.batch_size, self.unlabeled, self.seed = batch_size, unlabeled, seed
        self.position = 0

    def state_dict(self) -> dict:
        return {"num_samples": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.seed = int(state["num_samples"]), int(state["seed"])

    def __iter__(self):
        while True:
            batch = []
            for _ in range(self.batch_size):
                gen = torch.Generator().manual_seed(self.seed * 100003 + self.position)
                image, labels, masks = make_image(gen)
                if self.unlabeled:
                    strong = (image.float() * 0.8 + 20).to(torch.uint8)
                    batch.append({"image_weak": image, "image_strong": strong, "image_id": 0})
                else:
                    inst = {"labels": labels, "masks": masks}
                    batch.append({"image": image, "instances": inst, "image_id": 0})
                self.position += 1
            yield batch


def tiny_cfg(max_iter: int = 6, semisup: bool = False):
    cfg = get_cfg()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = K
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 3
    cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = 64
    cfg.SOLVER.BASE_LR = 1e-3
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.STEPS = (max_iter - 1,)
    cfg.SOLVER.WARMUP_ITERS = 2
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1.0
    cfg.SSL.TRAIN_SSL = semisup
    cfg.SSL.BURNIN_ITER = 2
    cfg.SSL.EMA_DECAY = 0.9
    cfg.SSL.CLASS_THRESHOLD = 0.3  # a random teacher is not confident; keep some labels
    cfg.SSL.MIN_MASK_AREA = 1.0
    return cfg


def make_trainer(
    cfg,
    output_dir: str | None = None,
    seed: int = 0,
    norm: str = "GN",
    batch_student: bool = True,
    extra_hooks=(),
    rank: int = 0,
) -> Trainer:
    """A Trainer on TinyMaskFormer with the real criterion, optimizer, schedule and hooks.

    With ``torch.distributed`` initialized the student is DDP-wrapped, each rank reads its own
    stream and only rank 0 writes checkpoints and metrics.
    """
    torch.manual_seed(seed)
    student = TinyMaskFormer(norm=norm)
    teacher = None
    if cfg.SSL.TRAIN_SSL:
        torch.manual_seed(seed + 1)
        teacher = TinyMaskFormer(norm=norm)  # stands for the loaded stage-1 model
    torch.manual_seed(seed + 2)
    optimizer = build_optimizer(cfg, student)
    semisup = None
    if cfg.SSL.TRAIN_SSL:
        s = cfg.SSL
        semisup = SemisupSettings(
            s.BURNIN_ITER,
            s.EMA_DECAY,
            s.FREQ,
            s.UNSUP_LOSS_WEIGHT,
            s.CLASS_THRESHOLD,
            s.MASK_THRESHOLD,
            s.MIN_MASK_AREA,
        )
    model = student
    if comm.get_world_size() > 1:
        model = nn.parallel.DistributedDataParallel(student)
    trainer = Trainer(
        model=model,
        criterion=build_criterion(cfg),
        optimizer=optimizer,
        labeled_loader=FakeStream(2, seed=seed + 1000 * rank),
        preprocess=Preprocess(cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, 32),
        precision=resolve_precision(False, "fp16", "cpu"),
        teacher=teacher,
        unlabeled_loader=FakeStream(2, True, seed + 7 + 1000 * rank) if semisup else None,
        semisup=semisup,
        scheduler=build_lr_scheduler(cfg, optimizer),
        clip=("full_model", cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE, 2.0),
        batch_student=batch_student,
    )
    hooks = []
    if semisup is not None:
        hooks.append(TeacherUpdate(cfg.SSL.BURNIN_ITER, cfg.SSL.EMA_DECAY))
    hooks.append(LRScheduler())
    hooks.extend(extra_hooks)
    if output_dir is not None:
        checkpointer = Checkpointer(output_dir, save_to_disk=comm.is_main_process())
        hooks.append(PeriodicCheckpointer(checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, cfg.dump()))
        if comm.is_main_process():
            hooks.append(MetricsWriter(output_dir, cfg.SOLVER.LOG_PERIOD))
    trainer.register_hooks(hooks)
    return trainer


def _record_writes_under(folder: str) -> list[str]:
    """Start recording (audit hook) every file this process writes or renames under folder."""
    import os
    import sys

    folder = os.path.abspath(folder)
    writes: list[str] = []

    def audit(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (
                any(c in mode for c in "wax+")
                if isinstance(mode, str)
                else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            )
        elif event in ("os.rename", "os.remove", "os.mkdir"):
            path, writing = args[0], True
        else:
            return
        path = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
        if writing and os.path.abspath(path).startswith(folder):
            writes.append(path)

    sys.addaudithook(audit)
    return writes


def distributed_worker(args, report_dir: str) -> None:
    """Per-process body of the two-process test: the CLI's setup + build_trainer + train,
    then a report of this rank's weights and of the files it wrote (ranks > 0 only)."""
    import os

    from gdseg.engine.train import build_trainer, setup

    rank = comm.get_rank()
    output_dir = args.opts[args.opts.index("OUTPUT_DIR") + 1]
    writes = _record_writes_under(output_dir) if rank != 0 else []
    cfg = setup(args)
    trainer = build_trainer(cfg)
    trainer.train(0, cfg.SOLVER.MAX_ITER)
    state = {"student": comm.unwrap_model(trainer.model).state_dict(), "writes": list(writes)}
    if trainer.teacher is not None:
        state["teacher"] = trainer.teacher.state_dict()
    torch.save(state, os.path.join(report_dir, f"rank{rank}.pth"))
