"""Writing one benchmark's section of BENCHMARKS.md without touching the others."""

from __future__ import annotations

import re
from pathlib import Path


def write_section(heading: str, text: str, path: Path) -> None:
    """Replace the section that starts with ``heading`` in ``path`` (or append it)."""
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    block = text.rstrip() + "\n\n"
    if pattern.search(current):
        current = pattern.sub(lambda _: block, current)
    else:
        current = current.rstrip() + "\n\n" + block
    path.write_text(current.rstrip() + "\n")
