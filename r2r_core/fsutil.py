"""Small filesystem helpers shared by bundle writing and training checkpoints."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["replace_dir"]


def replace_dir(src: str | Path, dst: str | Path) -> Path:
    """Move the finished folder ``src`` to ``dst``, replacing an older ``dst`` (removed only after the move)."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
    return dst
