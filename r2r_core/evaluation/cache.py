"""Finished (system, dataset) runs kept on disk so an interrupted ``r2r eval`` resumes where it stopped.

Each finished run is written atomically as ``<dir>/<dataset>.<split>.<system>.json`` with a key that
names everything its scores depend on: the system's identity (policy, expert, bundle files with their
sizes and modification times, dtype, max length, template, instruction), the dataset folder, the
split, the exact query ids and the candidate depth. A stored run is reused only when its key equals
the current one, so a retrained bundle or another subsample is scored again, never mixed in.

The same folder lets several ``r2r eval`` processes split the systems between them (one per core)
and a final ``--resume`` call with every system assemble the full report without scoring again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from ..data import BeirDataset
from ..fsutil import atomic_json
from ..lora_fold import BASE_ADAPTER
from .runs import SystemRun, safe_name
from .systems import FirstStageSystem, MiniLMSystem, RerankerSystem

logger = logging.getLogger(__name__)

__all__ = ["RunCache", "system_identity"]

CACHE_VERSION = 1


def _files_of(source: str | None, under: str = "") -> dict[str, list[int]] | str | None:
    """Size and mtime of every file of a bundle folder, or of its subfolder ``under`` (a model id is kept
    as its name)."""
    if not source:
        return None
    path = Path(source)
    if not path.is_dir():
        return str(source)
    root = path / under if under else path
    return {
        str(f.relative_to(path)): [f.stat().st_size, f.stat().st_mtime_ns]
        for f in sorted(root.rglob("*"))
        if f.is_file()
    }


def _reranker_files(system) -> dict | str | None:
    """The files a reranker system's scores depend on: none beyond the backbone for the base model, the
    expert's own folder for a fixed expert, the whole bundle (experts and router) otherwise."""
    if system.policy == "fixed" and system.expert == BASE_ADAPTER:
        return None
    if system.policy == "fixed" and system.source and (Path(system.source) / "experts" / system.expert).is_dir():
        return _files_of(system.source, f"experts/{system.expert}")
    return _files_of(system.source)


def system_identity(system) -> dict | None:
    """What a system's scores depend on, or None when unknown (such a system is never cached)."""
    if isinstance(system, FirstStageSystem):
        return {"kind": "first-stage"}
    if isinstance(system, MiniLMSystem):
        return {"kind": "minilm", "model": str(system.model_path)}
    if isinstance(system, RerankerSystem):
        reranker = system.reranker
        template = getattr(reranker, "template", None)
        return {
            "kind": "reranker",
            "policy": system.policy,
            "expert": system.expert,
            "base": getattr(getattr(reranker, "backbone", None), "fingerprint", None),
            "files": _reranker_files(system),
            "dtype": str(getattr(getattr(reranker, "model", None), "dtype", None)),
            "max_length": getattr(getattr(reranker, "encoder", None), "max_length", None),
            "template": template.to_dict() if hasattr(template, "to_dict") else repr(template),
            "instruction": getattr(reranker, "instruction", None),
            "threshold": getattr(reranker, "threshold", None),
        }
    return None


class RunCache:
    """Read and write finished :class:`~r2r_core.evaluation.runs.SystemRun` objects under ``root``."""

    def __init__(self, root: str | Path, *, read: bool = True):
        self.root = Path(root)
        self.read = read

    def key(self, system, dataset: BeirDataset, query_ids: Sequence[str], max_candidates: int) -> dict | None:
        identity = system_identity(system)
        if identity is None:
            return None
        qhash = hashlib.sha256("\n".join(query_ids).encode()).hexdigest()
        return {
            "version": CACHE_VERSION,
            "system": system.name,
            "identity": identity,
            "dataset": str(dataset.root.resolve()),
            "split": dataset.split,
            "queries_sha256": qhash,
            "max_candidates": max_candidates,
        }

    def _path(self, system_name: str, dataset: BeirDataset) -> Path:
        return self.root / f"{safe_name(dataset.name)}.{safe_name(dataset.split)}.{safe_name(system_name)}.json"

    def load(self, system, dataset: BeirDataset, key: dict | None) -> SystemRun | None:
        """The stored run for ``key``, or None (missing, unreadable, or made with another key)."""
        if key is None or not self.read:
            return None
        path = self._path(system.name, dataset)
        if not path.is_file():
            return None
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("%s: unreadable cached run (%s); scoring again", path, exc)
            return None
        if stored.get("key") != json.loads(json.dumps(key)):
            logger.info("%s: made with other settings or files; scoring again", path)
            return None
        run = stored["run"]
        logger.info("%s on %s: reusing the finished run in %s", system.name, dataset.name, path)
        return SystemRun.from_json(system.name, dataset.name, run)

    def save(self, run: SystemRun, dataset: BeirDataset, key: dict | None) -> Path | None:
        """Write ``run`` atomically (temporary file, then rename); nothing is written without a key."""
        if key is None:
            return None
        return atomic_json({"key": key, "run": run.to_json()}, self._path(run.system, dataset))
