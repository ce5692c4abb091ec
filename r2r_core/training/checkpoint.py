"""Atomic, resumable training state: write to a temporary file in the same folder, fsync, ``os.replace``.

A checkpoint holds everything an interrupted run needs to continue bit-for-bit: the trainable (LoRA)
weights, the optimizer and scheduler states, the step and data cursor, the best dev score so far, and
the Python / NumPy / torch RNG states (LoRA dropout draws from torch's global generator).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from r2r_core.fsutil import _commit, _tmp_path, atomic_json, atomic_text, replace_dir

__all__ = [
    "atomic_json",
    "atomic_save",
    "atomic_save_tensors",
    "atomic_text",
    "capture_rng",
    "load_checkpoint",
    "replace_dir",
    "restore_rng",
]


def atomic_save(obj, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (a reader never sees a half-written file)."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        torch.save(obj, tmp)
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> Path:
    """A safetensors file, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _tmp_path(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def capture_rng() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by :func:`atomic_save` (our own file: full unpickling of RNG states)."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file: say which
        raise ValueError(f"{path}: not a readable r2r training checkpoint ({exc})") from exc
