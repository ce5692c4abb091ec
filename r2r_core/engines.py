"""Sharing loaded engines: one :class:`R2RReranker` per distinct set of loading options, freed when unused.

:func:`shared_engine` is what the adapters call when they are not given ``reranker=``. Building a
postprocessor per request (common in web apps) then costs a dictionary look-up instead of a model load.

Contract:

* Two calls with equal options return the *same* engine; options differ when any of ``model`` (a bundle
  folder by its resolved path), the device and dtype actually picked (``device=None`` and ``"cpu"`` are the
  same on a CPU-only machine), ``batch_size``, ``max_length`` as resolved (``None`` and the length the
  bundle records are the same), ``template``, ``instruction``, ``trust_remote_code`` or any ``engine_kwargs``
  entry differ.
* The cache holds engines weakly: an engine is freed as soon as nothing else (an adapter, the caller) refers to
  it, and the next call loads it again.
* Concurrent calls with equal options load once; the others wait for that load.
* A shared engine is shared state: ``add_expert`` / ``remove_expert`` / ``fallback`` on it are seen by every
  holder. Load your own with :meth:`R2RReranker.from_pretrained` and pass ``reranker=`` to keep one apart.
"""

from __future__ import annotations

import logging
import threading
import weakref
from pathlib import Path
from typing import Any

from r2r_core.reranker import R2RReranker, resolve_max_length
from r2r_core.runtime import resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

__all__ = ["cached_engine_count", "engine_key", "shared_engine"]

_engines: weakref.WeakValueDictionary[tuple, R2RReranker] = weakref.WeakValueDictionary()
_load_locks: dict[tuple, threading.Lock] = {}
_guard = threading.Lock()


def engine_key(model: str = "default", *, device: str | None = None, dtype: str = "auto", **options: Any) -> tuple:
    """The cache key of these loading options (raises TypeError if an option's value is not hashable).

    ``max_length`` enters as :func:`~r2r_core.reranker.resolve_max_length` resolves it (reading the bundle's
    ``r2r.json``), so leaving it out and passing the bundle's own value share one engine."""
    name = str(model)
    if name != "default" and Path(name).exists():
        name = str(Path(name).resolve())
    dev = resolve_device(device)
    options["max_length"] = resolve_max_length(model, options.get("max_length"))
    key = (name, str(dev), str(resolve_dtype(dtype, dev)), *sorted(options.items()))
    hash(key)
    return key


def shared_engine(model: str = "default", **options: Any) -> R2RReranker:
    """The loaded engine for ``R2RReranker.from_pretrained(model, **options)``, shared with every other caller
    that asks for equal options (see the module docstring). Options that cannot be hashed load an unshared
    engine."""
    try:
        key = engine_key(model, **options)
    except TypeError:
        logger.info("loading options of %r are not hashable; loading an engine that is not shared", model)
        return R2RReranker.from_pretrained(model, **options)
    with _guard:
        engine = _engines.get(key)
        if engine is not None:
            return engine
        lock = _load_locks.setdefault(key, threading.Lock())
    with lock:  # one load per key; callers with other keys load in parallel
        with _guard:
            engine = _engines.get(key)
        if engine is None:
            engine = R2RReranker.from_pretrained(model, **options)
            with _guard:
                _engines[key] = engine
            logger.info("loaded engine %r (now %d shared)", model, len(_engines))
    return engine


def cached_engine_count() -> int:
    """How many shared engines are alive now."""
    with _guard:
        return len(_engines)
