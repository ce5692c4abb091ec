"""Weight averaging of LoRA adapters ("model soup", Wortsman et al. 2022; checkpoint averaging).

The mean of several checkpoints of one training run, taken late in its learning-rate decay, scores better on
dev than any one of them: the shipped experts are such means (``benchmarks/RESULTS.md``, issue 15). The trainer
makes one itself with ``average_every`` / ``average_last`` (:class:`r2r_core.training.trainer.TrainConfig`);
``benchmarks/soup.py`` mixes adapters of different runs into a bundle's experts.

Contract: the sources must hold the same tensor names and shapes (one lineage of training: a run's snapshots, or
runs warm-started from one another). The mean is taken per tensor (LoRA A and B apart) in fp32; callers cast it
to the dtype they store.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

__all__ = ["ADAPTER_FILE", "lora_tensors", "mean_tensors", "weighted_mean"]

ADAPTER_FILE = "adapter_model.safetensors"


def mean_tensors(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None,
                 names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The weighted mean (fp32) of ``states``, tensor by tensor; ``weights`` default to equal and are normalised.
    ``names`` label the states in the error raised when their tensor names or shapes differ."""
    if not states:
        raise ValueError("nothing to average: no states given")
    weights = [1.0] * len(states) if weights is None else [float(w) for w in weights]
    if len(weights) != len(states) or any(not w > 0 for w in weights):
        raise ValueError(f"need one weight > 0 per state, got {weights!r} for {len(states)} states")
    names = [f"state {i}" for i in range(len(states))] if names is None else list(names)
    shapes = {k: tuple(v.shape) for k, v in states[0].items()}
    total = sum(weights)
    mean: dict[str, torch.Tensor] = {}
    for state, w, label in zip(states, weights, names):
        if {k: tuple(v.shape) for k, v in state.items()} != shapes:
            raise ValueError(f"{label}: its tensors differ in names or shapes from {names[0]}'s")
        for k, v in state.items():
            term = v.float() * (w / total)
            mean[k] = term if k not in mean else mean[k] + term
    return mean


def lora_tensors(source: str | Path) -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``source`` -- a peft adapter folder, a trainer checkpoint (``checkpoint.pt`` or a copy)
    or a ``.safetensors`` file of trainable weights (``best.safetensors``, a snapshot) -- named as in a saved peft
    adapter (``...lora_A.weight``, no adapter name), in fp32."""
    from safetensors.torch import load_file

    from r2r_core.training.checkpoint import load_checkpoint

    path = Path(source)
    if path.is_dir():
        if not (path / ADAPTER_FILE).is_file():
            raise FileNotFoundError(f"{path}: no {ADAPTER_FILE} (not a peft adapter folder)")
        raw = load_file(str(path / ADAPTER_FILE))
    elif path.suffix == ".safetensors":
        raw = load_file(str(path))
    elif path.is_file():
        raw = load_checkpoint(path)["trainable"]
    else:
        raise FileNotFoundError(f"{path}: no such adapter folder or checkpoint")
    out = {re.sub(r"\.lora_(A|B)\.[^.]+\.weight$", r".lora_\1.weight", k): v.float() for k, v in raw.items()}
    if not out or not all(".lora_" in k for k in out):
        raise ValueError(f"{path}: holds no LoRA tensors")
    return out


def weighted_mean(sources: Sequence[tuple[str | Path, float]]) -> dict[str, torch.Tensor]:
    """The weighted mean of the LoRA tensors of ``(source, weight)`` pairs (see :func:`lora_tensors`)."""
    return mean_tensors([lora_tensors(p) for p, _ in sources], [w for _, w in sources],
                        names=[str(p) for p, _ in sources])
