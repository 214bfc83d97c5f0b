"""The ``gdseg`` command: demo | train | evaluate | predict | split | convert.

Each sub-command only parses arguments and delegates to the library. A sub-command's module
is imported only when that sub-command is used, so ``gdseg --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (help, module, function adding the arguments, function running the command)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "demo": (
        "end-to-end demo on generated data: supervised teacher vs guided distillation",
        "gdseg.demo",
        "add_demo_args",
        "main",
    ),
    "train": (
        "train a teacher or a guided-distillation student, or evaluate (train_net.py flags)",
        "gdseg.engine.train",
        "add_train_args",
        "main",
    ),
    "evaluate": (
        "COCO mask AP of a COCO results file",
        "gdseg.evaluation.coco",
        "add_evaluate_args",
        "evaluate_cli_main",
    ),
    "predict": (
        "predict instances on images, folders or globs",
        "gdseg.predict",
        "add_predict_args",
        "predict_main",
    ),
    "split": (
        "seeded, nested labeled-fraction splits (COCO json, Cityscapes)",
        "gdseg.data.split_cli",
        "add_split_args",
        "main",
    ),
    "convert": (
        "import published Mask2Former / Guided Distillation / transformers weights",
        "gdseg.convert",
        "add_convert_args",
        "convert_main",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only ``command``'s own arguments are loaded (all if None)."""
    parser = argparse.ArgumentParser(
        prog="gdseg",
        description="Semi-supervised instance segmentation with Guided Distillation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, module, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command in (None, name):
            mod = importlib.import_module(module)
            getattr(mod, add_args)(p)
            p.set_defaults(func=getattr(mod, run))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), "")
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="[%(asctime)s %(name)s] %(message)s",
        datefmt="%H:%M:%S",
    )
    result = args.func(args)
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
