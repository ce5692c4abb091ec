"""The record of one system's run on one dataset (:class:`SystemRun`), shared by the evaluation loop
(:mod:`~r2r_core.evaluation.harness`) and the on-disk store of finished runs (:mod:`~r2r_core.evaluation.cache`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["SystemRun", "safe_name"]


@dataclass
class SystemRun:
    """What one system produced on one dataset."""

    system: str
    dataset: str
    rankings: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # qid -> best first
    experts: dict[str, str] = field(default_factory=dict)  # qid -> expert used (routed systems)
    seconds: dict[str, float] = field(default_factory=dict)  # qid -> wall time of the rerank call
    n_docs: dict[str, int] = field(default_factory=dict)  # qid -> candidates scored

    def to_json(self) -> dict:
        """The per-query fields as JSON-ready data (what :meth:`from_json` reads back)."""
        return {"rankings": self.rankings, "experts": self.experts, "seconds": self.seconds, "n_docs": self.n_docs}

    @classmethod
    def from_json(cls, system: str, dataset: str, data: dict) -> SystemRun:
        return cls(
            system=system,
            dataset=dataset,
            rankings={q: [(d, float(s)) for d, s in pairs] for q, pairs in data["rankings"].items()},
            experts=dict(data["experts"]),
            seconds={q: float(s) for q, s in data["seconds"].items()},
            n_docs={q: int(n) for q, n in data["n_docs"].items()},
        )


def safe_name(name: str) -> str:
    """A file-name-safe version of a system or dataset name."""
    return re.sub(r"[^A-Za-z0-9._+=-]+", "_", name)
