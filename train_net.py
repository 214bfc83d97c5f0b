#!/usr/bin/env python3
"""The published command line, unchanged: ``python train_net.py --config-file F [flags] KEY VALUE``.

Thin on purpose: it parses the published flags and hands over to :mod:`gdseg.engine.train`
(the same code as ``gdseg train``).
"""

import argparse
import logging

from gdseg.engine.train import add_train_args, main

if __name__ == "__main__":
    parser = add_train_args(
        argparse.ArgumentParser(description="gdseg training (Guided Distillation)")
    )
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%m/%d %H:%M:%S"
    )
    main(parser.parse_args())
