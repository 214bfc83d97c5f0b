"""Images per second of the training data pipelines, per number of worker processes.

Measures two loaders exactly as training builds them (``build_train_loader`` /
``build_unlabeled_loader``): the COCO large-scale-jitter pipeline at ``INPUT.IMAGE_SIZE``
(decode, masks, flip, resize, crop/pad) and the unlabeled weak/strong pipeline (the same
geometry, then colour jitter, grayscale and blur for the strong view). Images are generated
COCO-like photos (640x480 JPEGs with 3-12 polygon/RLE instances, see ``gdseg.data.synthetic``)
or, with ``--coco-root``, a real COCO-layout folder (e.g. the tiny_coco subset).

Every process (main and workers) is limited to one torch thread, so "0 workers" is one core in
the training process and N workers use N cores. Results go to BENCHMARKS.md between the
``data_throughput`` markers (the rest of the file is kept).

    python benchmarks/data_throughput.py [--coco-root DIR] [--workers 0 1 2] [--images 48]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import load, machine, write_section

from gdseg.config import get_cfg
from gdseg.data.coco import load_coco_instances
from gdseg.data.loader import build_train_loader, build_unlabeled_loader
from gdseg.data.synthetic import make_synthetic_coco


def _records(args: argparse.Namespace, tmp: str) -> tuple[list[dict], str]:
    if args.coco_root:
        root = Path(args.coco_root)
        json_file = root / "annotations" / f"instances_{args.coco_split}.json"
        records, _ = load_coco_instances(json_file, root / args.coco_split)
        return records, f"real COCO photos ({root.name}/{args.coco_split}, {len(records)} images)"
    json_file, image_root = make_synthetic_coco(
        tmp, num_images=args.images, image_size=(480, 640), min_instances=3, max_instances=12
    )
    records, _ = load_coco_instances(json_file, image_root)
    mean = sum(len(r["annotations"]) for r in records) / len(records)
    return records, f"generated 640x480 JPEGs ({len(records)} images, {mean:.1f} instances/image)"


def _measure(loader, num_batches: int, batch_size: int) -> tuple[float, float]:
    """(images per second, CPU milliseconds per image spent in the training process)."""
    it = iter(loader)
    next(it)  # worker start-up and first decode are not throughput
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        next(it)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    del it
    images = num_batches * batch_size
    return images / elapsed, 1000 * cpu / images


def _machine() -> str:
    return (
        f"{machine()} (load average {load()} at the end), "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--coco-root", default="", help="COCO-layout folder with real photos")
    parser.add_argument("--coco-split", default="train2017")
    parser.add_argument("--images", type=int, default=48, help="generated images")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=12, help="timed batches per setting")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument(
        "--output", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    cfg = get_cfg()
    cfg.SEED = 0
    cfg.INPUT.IMAGE_SIZE = args.image_size
    cfg.SOLVER.IMS_PER_BATCH = args.batch_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        records, source = _records(args, tmp)
        pipelines = {
            f"COCO LSJ {args.image_size} (labeled)": build_train_loader,
            f"weak + strong views {args.image_size} (unlabeled)": build_unlabeled_loader,
        }
        for name, build in pipelines.items():
            for workers in args.workers:
                cfg.DATALOADER.NUM_WORKERS = workers
                loader = build(cfg, records, rank=0, world_size=1)
                ips, cpu_ms = _measure(loader, args.batches, args.batch_size)
                rows.append((name, workers, ips, cpu_ms))
                print(
                    f"{name:45s} workers={workers}: {ips:6.1f} images/s, "
                    f"{cpu_ms:6.1f} CPU ms/image in the training process",
                    flush=True,
                )

    table = "\n".join(f"| {n} | {w} | {ips:.1f} | {ms:.0f} |" for n, w, ips, ms in rows)
    section = f"""## Data throughput (`benchmarks/data_throughput.py`)

{datetime.date.today().isoformat()}, {_machine()}.
Input: {source}; batch {args.batch_size}, {args.batches} timed batches after one warm-up batch,
one torch thread per process. Images/s: wall clock, one training process's loader (depends on
how busy the machine is). CPU ms/image: CPU time the training process itself spends per image
(with 0 workers the whole pipeline's cost on one core; with workers, receiving and unpacking).

| pipeline | workers | images/s | CPU ms/image in the training process |
|---|---|---|---|
{table}
"""
    write_section("data_throughput", section, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
