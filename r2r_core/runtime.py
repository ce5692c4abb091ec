"""Where and how the model runs: ``device=None`` picks cuda > mps > cpu, ``dtype="auto"`` picks bf16 where
the hardware runs it fast (an explicit choice always wins, and what was picked is logged).

Nothing here changes process-wide state unless asked to. Two CPU tunings are opt-in, because both act on the
whole process: ``R2R_TUNE_MALLOC=1`` tunes glibc's allocator (:func:`tune_cpu_allocator`), and
``R2R_PARALLEL_BATCHES=1`` runs batches side by side, one per torch thread, which sets torch's thread count
while they run (:func:`map_batches`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)
T = TypeVar("T")

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


_MMAP_THRESHOLD = 64 << 20
_TRIM_THRESHOLD = 256 << 20
_ALLOCATOR_ENV = "R2R_TUNE_MALLOC"
_PARALLEL_ENV = "R2R_PARALLEL_BATCHES"
_YES = {"1", "true", "yes", "on"}


@lru_cache(maxsize=1)
def tune_cpu_allocator() -> bool:
    """Keep freed activation buffers in the process instead of handing them back to the OS after every batch.

    glibc serves large blocks with ``mmap`` and returns them on ``free``, so every CPU forward pass page-faults its
    activations in again. With an mmap threshold of 64 MiB and a trim threshold of 256 MiB they are reused; the
    cost is up to ~256 MiB of freed memory kept by the process. Process-wide, so opt-in: applied (once, glibc on
    Linux only) when ``R2R_TUNE_MALLOC=1``; by default the allocator is left as it is (the process may preload
    jemalloc or tcmalloc, or tune it itself). Returns whether it was applied. Measurements:
    ``benchmarks/RESULTS.md``.
    """
    import ctypes
    import platform

    if os.environ.get(_ALLOCATOR_ENV, "").strip().lower() not in _YES:
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        applied = libc.mallopt(m_mmap_threshold, _MMAP_THRESHOLD) == 1 and \
            libc.mallopt(m_trim_threshold, _TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        return False
    if applied:
        logger.info("%s=1: glibc malloc mmap threshold %d MiB, trim threshold %d MiB (activation buffers are "
                    "reused)", _ALLOCATOR_ENV, _MMAP_THRESHOLD >> 20, _TRIM_THRESHOLD >> 20)
    return applied


def cpu_workers(jobs: int, device: torch.device) -> int:
    """How many batches to run at once: one, unless ``R2R_PARALLEL_BATCHES=1`` asks for batches side by side;
    then, on the CPU, one per torch thread (at most ``jobs``)."""
    if device.type != "cpu" or jobs < 2 or os.environ.get(_PARALLEL_ENV, "").strip().lower() not in _YES:
        return 1
    return max(1, min(torch.get_num_threads(), jobs))


def map_batches(fn: Callable[[int], T], jobs: int, workers: int) -> list[T]:
    """``[fn(0), ..., fn(jobs - 1)]``, each call in inference mode, on ``workers`` threads at once (from
    :func:`cpu_workers`; 1 runs them in the caller's thread, on its torch threads, and changes nothing).

    Several workers (opt-in, ``R2R_PARALLEL_BATCHES=1``) take a batch at a time, each with its share of the torch
    threads (one each when there are as many workers as threads): a small decoder's layers are many short kernels,
    each paying OpenMP's fork/join, so batches side by side on one thread each can get more done than one batch at
    a time on all of them (measurements: ``benchmarks/RESULTS.md``). Jobs are taken in order (submit the longest
    first). The model must route experts by thread (:func:`r2r_core.lora_fold.routes_by_thread`).

    ``torch.set_num_threads`` is process-wide: while the workers run, threads that start using torch get their
    share too, which is why this is opt-in; the caller's setting is put back before this returns.
    """
    workers = max(1, min(workers, jobs))
    if workers == 1:
        with torch.inference_mode():
            return [fn(i) for i in range(jobs)]
    threads = torch.get_num_threads()
    share = max(1, threads // workers)

    def run(i: int) -> T:
        if torch.get_num_threads() != share:
            torch.set_num_threads(share)
        with torch.inference_mode():
            return fn(i)

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="r2r-batch") as pool:
            return list(pool.map(run, range(jobs)))
    finally:
        torch.set_num_threads(threads)
