"""``gdseg split``: seeded, nested labeled-fraction splits of COCO jsons and Cityscapes."""

from __future__ import annotations

import argparse

from .splits import split_cityscapes, split_coco


def add_split_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kind", metavar="{coco,cityscapes}", required=True)
    coco = sub.add_parser("coco", help="subsets of a COCO-format json: <stem>_<suffix>.json")
    coco.add_argument("--json", required=True, help="full COCO json, e.g. instances_train2017.json")
    cs = sub.add_parser("cityscapes", help="list files of Cityscapes training images")
    cs.add_argument("--root", required=True, help="Cityscapes root (leftImg8bit/, gtFine/)")
    for p in (coco, cs):
        p.add_argument(
            "--percentages",
            type=float,
            nargs="+",
            required=True,
            help="labeled fractions in percent, e.g. 0.4 1 2 5 10 (250 = 0.4 as published)",
        )
        p.add_argument("--seed", type=int, default=0, help="split seed (same seed, same split)")
        p.add_argument("--out", default=None, help="output folder (default: beside the input)")


def main(args: argparse.Namespace) -> int:
    if args.kind == "coco":
        written = split_coco(args.json, args.percentages, seed=args.seed, out_dir=args.out)
    else:
        written = split_cityscapes(args.root, args.percentages, seed=args.seed, out_dir=args.out)
    for p, path in written.items():
        print(f"{p:g}%\t{path}")
    return 0
