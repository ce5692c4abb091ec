"""r2r: Route-to-Rerank -- domain-routed decoder-only reranking with LoRA experts and a latent semantic router."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from r2r_core.backbone import DEFAULT_BASE, load_backbone
from r2r_core.reranker import R2RReranker, RerankResult
from r2r_core.router import LatentRouter, Route
from r2r_core.scoring import BASE_ADAPTER
from r2r_core.templates import PromptTemplate, get_template

try:
    __version__ = version("r2r-rerank")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = [
    "BASE_ADAPTER",
    "DEFAULT_BASE",
    "LatentRouter",
    "PromptTemplate",
    "R2RReranker",
    "RerankResult",
    "Route",
    "get_template",
    "load_backbone",
    "__version__",
]
