"""gdseg: semi-supervised instance segmentation with Guided Distillation, in plain PyTorch."""

__version__ = "0.1.0"
