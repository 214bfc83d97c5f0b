"""Helpers shared by the benchmark scripts: what machine ran them, and their BENCHMARKS.md section.

Each script owns one section of BENCHMARKS.md between ``<!-- name:begin -->`` and
``<!-- name:end -->`` markers; writing it replaces that section and keeps the rest of the file.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def cpu_name() -> str:
    """CPU model from ``/proc/cpuinfo`` (the architecture where that is not readable)."""
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"model name\s*:\s*(.+)", f.read())
    except OSError:
        names = []
    return names[0].strip() if names else platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """Instruction-set flags of the first CPU in ``/proc/cpuinfo`` (empty where unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"^flags\s*:\s*(.+)$", f.read(), re.MULTILINE)
    except OSError:
        return set()
    return set(found.group(1).split()) if found else set()


def machine() -> str:
    """``"<CPU model>, <n> logical CPUs"``."""
    return f"{cpu_name()}, {os.cpu_count()} logical CPUs"


def load() -> str:
    """1, 5 and 15 minute load averages, ``"a, b, c"`` (``"?"`` where unavailable)."""
    if not hasattr(os, "getloadavg"):
        return "?"
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def markers(name: str) -> tuple[str, str]:
    """The begin and end markers of section ``name``."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_section(name: str, text: str, path: Path | str = BENCHMARKS_MD) -> None:
    """Replace (or append) section ``name`` of ``path`` with ``text``, keeping the rest."""
    path = Path(path)
    begin, end = markers(name)
    content = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in content and end in content:
        content = content[: content.index(begin)] + block + content[content.index(end) + len(end) :]
    else:
        content = content.rstrip() + "\n\n" + block + "\n"
    path.write_text(content)
