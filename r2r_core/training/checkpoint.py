"""Atomic, resumable training state: write to a temporary file in the same folder, fsync, ``os.replace``.

A checkpoint holds everything an interrupted run needs to continue bit-for-bit: the trainable (LoRA)
weights, the optimizer and scheduler states, the step and data cursor, the best dev score so far, and
the Python / NumPy / torch RNG states (LoRA dropout draws from torch's global generator).

Nothing is unpickled on resume: :func:`save_checkpoint` writes one file holding a flat ``{name: tensor}`` dict
(trainable weights, the optimizer's state tensors, torch's RNG states) and a JSON string with everything else
(Python and NumPy RNG states, step, scores, scheduler state, the optimizer's hyperparameters), and
:func:`load_checkpoint` reads it with ``torch.load(weights_only=True)``. Checkpoints of older versions (whole
pickled dicts) are read the same way, with only NumPy's array types allowed besides tensors.
"""

from __future__ import annotations

import json
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
    "save_checkpoint",
]

FORMAT = "r2r-checkpoint-2"


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


def save_checkpoint(path: str | Path, *, trainable: dict[str, torch.Tensor], optimizer: dict, scheduler: dict,
                    state: dict, rng: dict | None = None) -> Path:
    """Write a checkpoint atomically: tensors in a flat dict, the rest as JSON (see the module docstring).
    ``optimizer`` and ``scheduler`` are ``state_dict()`` s; ``rng`` defaults to :func:`capture_rng`."""
    rng = capture_rng() if rng is None else rng
    tensors = {f"trainable.{k}": v.detach().cpu().clone() for k, v in trainable.items()}
    opt_state = {}
    for pid, entries in optimizer["state"].items():
        opt_state[str(pid)] = {}
        for k, v in entries.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{pid}.{k}"] = v.detach().cpu().clone()
            else:
                opt_state[str(pid)][k] = v
    tensors["rng.torch"] = rng["torch"]
    for i, t in enumerate(rng.get("cuda", [])):
        tensors[f"rng.cuda.{i}"] = t
    version, internal, gauss = rng["python"]
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    meta = {
        "format": FORMAT,
        "optimizer": {"state": opt_state, "param_groups": optimizer["param_groups"]},
        "scheduler": scheduler,
        "state": state,
        "rng": {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
                "cuda": len(rng.get("cuda", []))},
    }
    return atomic_save({"tensors": tensors, "json": json.dumps(meta, allow_nan=True)}, path)


def _from_saved(saved: dict, path: Path) -> dict:
    meta = json.loads(saved["json"])
    if meta.get("format") != FORMAT:
        raise ValueError(f"unknown checkpoint format {meta.get('format')!r}")
    tensors = saved["tensors"]
    state: dict = {}
    for pid, entries in meta["optimizer"]["state"].items():
        state[int(pid)] = dict(entries)
    for key, t in tensors.items():
        if key.startswith("optimizer."):
            pid, name = key[len("optimizer."):].split(".", 1)
            state.setdefault(int(pid), {})[name] = t
    groups = meta["optimizer"]["param_groups"]
    for group in groups:  # JSON has no tuples; torch's optimizers take them (AdamW's betas)
        for k, v in group.items():
            if isinstance(v, list) and k != "params":
                group[k] = tuple(v)
    version, internal, gauss = meta["rng"]["python"]
    kind, keys, pos, has_gauss, cached = meta["rng"]["numpy"]
    rng = {"python": (version, tuple(internal), gauss),
           "numpy": (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
           "torch": tensors["rng.torch"]}
    if meta["rng"]["cuda"]:
        rng["cuda"] = [tensors[f"rng.cuda.{i}"] for i in range(meta["rng"]["cuda"])]
    return {
        "trainable": {k[len("trainable."):]: t for k, t in tensors.items() if k.startswith("trainable.")},
        "optimizer": {"state": state, "param_groups": groups},
        "scheduler": meta["scheduler"],
        "rng": rng,
        "state": meta["state"],
    }


def _numpy_globals() -> list:
    """What a pickled NumPy array (the NumPy RNG state of a checkpoint of an older version) needs, nothing more."""
    core = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(np.uint32))]
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` without unpickling anything but tensors and plain data
    (``torch.load(weights_only=True)``). Returns ``trainable``, ``optimizer``, ``scheduler`` (``state_dict()`` s),
    ``rng`` (for :func:`restore_rng`) and ``state``. The settings a run was made with are checked on resume
    from the run folder's ``run_settings.json`` (:func:`r2r_core.training.trainer.check_run_settings`)."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):  # checkpoints of older versions only
            saved = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(saved, dict) and set(saved) == {"tensors", "json"}:
            return _from_saved(saved, path)
        if isinstance(saved, dict) and {"trainable", "optimizer", "scheduler", "rng", "state"} <= set(saved):
            return saved  # an older version's checkpoint: the same dict, pickled whole
        raise ValueError("not a dict of r2r training state")
    except Exception as exc:  # a truncated, foreign or unsafe file: say which
        raise ValueError(f"{path}: not a readable r2r training checkpoint ({exc})") from exc
