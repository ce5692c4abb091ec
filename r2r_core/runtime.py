"""Device and dtype selection: ``device=None`` picks cuda > mps > cpu, ``dtype="auto"`` picks bf16 where
the hardware runs it fast. An explicit choice always wins, and what was picked is logged."""

from __future__ import annotations

import logging
from functools import lru_cache

import torch

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` -> cuda if available, else mps, else cpu. Anything else must name a real device."""
    if device is None:
        if torch.cuda.is_available():
            picked = torch.device("cuda")
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            picked = torch.device("mps")
        else:
            picked = torch.device("cpu")
        logger.info("device=None: picked %s", picked)
        return picked
    try:
        picked = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"`device` must be None, 'cpu', 'cuda[:N]' or 'mps', got {device!r}") from exc
    if picked.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device` is {device!r} but CUDA is not available on this machine; use device=None")
    if picked.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"`device` is {device!r} but MPS is not available on this machine; use device=None")
    return picked


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX), where bf16 matmuls beat fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"`` -> bf16 on CUDA with bf16 support and on CPUs with native bf16, else fp32."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"`dtype` must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if not isinstance(dtype, str):
        raise ValueError(f"`dtype` must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    key = dtype.lower()
    if key == "auto":
        if device.type == "cuda":
            picked = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif device.type == "cpu":
            picked = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
        else:
            picked = torch.float32
        logger.info("dtype='auto' on %s: picked %s", device, picked)
        return picked
    if key not in DTYPES:
        allowed = ", ".join(["auto", *sorted(DTYPES)])
        raise ValueError(f"`dtype` must be one of {allowed}; got {dtype!r}")
    return DTYPES[key]
