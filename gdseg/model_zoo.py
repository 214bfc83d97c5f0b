"""The configs shipped inside the package (``gdseg/configs``), found by their published names.

``get_config_file("coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml")`` works after
``pip install`` from any working directory, like detectron2's ``model_zoo.get_config_file``.
"""

from __future__ import annotations

import difflib
from pathlib import Path

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"


def list_config_files() -> list[str]:
    """Every shipped config, as paths relative to the configs folder (sorted, '/'-separated)."""
    return sorted(p.relative_to(CONFIGS_DIR).as_posix() for p in CONFIGS_DIR.rglob("*.yaml"))


def get_config_file(config_path: str) -> str:
    """Absolute path of a shipped config.

    Args:
        config_path: path relative to the configs folder, e.g.
            ``"cityscapes/instance-segmentation/maskformer2_R50_bs16_90k.yaml"``; a leading
            ``"configs/"`` (as in the published command lines) and a missing ``.yaml`` are
            accepted.

    Returns:
        The absolute path of the file, to pass to ``cfg.merge_from_file``.

    Raises:
        FileNotFoundError: no shipped config has that name; the message lists close matches.
    """
    rel = config_path.replace("\\", "/")
    while rel.startswith("./"):
        rel = rel[2:]
    rel = rel.removeprefix("configs/")
    if not rel.endswith((".yaml", ".yml")):
        rel += ".yaml"
    path = (CONFIGS_DIR / rel).resolve()
    if path.is_file() and path.is_relative_to(CONFIGS_DIR):
        return str(path)
    raise FileNotFoundError(_not_found_message(config_path, rel))


def _not_found_message(config_path: str, rel: str) -> str:
    available = list_config_files()
    close = difflib.get_close_matches(rel, available, n=5, cutoff=0.6)
    if not close:  # compare file names alone: the folder is often what is wrong
        by_name: dict[str, list[str]] = {}
        for p in available:
            by_name.setdefault(p.rsplit("/", 1)[-1], []).append(p)
        names = difflib.get_close_matches(rel.rsplit("/", 1)[-1], list(by_name), n=5, cutoff=0.6)
        close = [p for name in names for p in by_name[name]]
    hint = (
        "Close matches:\n  " + "\n  ".join(close)
        if close
        else f"Shipped configs ({len(available)}):\n  " + "\n  ".join(available)
    )
    return f"No config {config_path!r} is shipped with gdseg (looked in {CONFIGS_DIR}). {hint}"
