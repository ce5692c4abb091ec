"""``r2r serve``: one bundle behind an HTTP API that existing Cohere and Text Embeddings Inference clients call.

Endpoints (all JSON):

* ``POST /v2/rerank`` and ``POST /v1/rerank`` -- Cohere's shape. Request ``{"model", "query", "documents":
  [str | {"text": str}], "top_n", "return_documents"}``; ``model`` may be omitted or be one of the names
  ``GET /info`` lists (``model_names``). Response ``{"id", "results": [{"index", "relevance_score",
  "document"?}], "meta", "r2r": {"bundle", "expert", "router_probabilities"}}``, best first.
* ``POST /rerank`` -- TEI's shape. Request ``{"query", "texts", "raw_scores", "return_text", "truncate"}``.
  Response ``[{"index", "score", "text"?, "r2r": {"expert", "router_probabilities"}}]``, best first;
  ``score`` is the probability of relevance, or with ``raw_scores`` the margin ``z_yes - z_no``.
* ``GET /health`` -> ``{"status": "ok"}`` (never needs the API key); ``GET /info`` -> the bundle, its experts,
  fallback and router, the base model, the device and dtype, the limits, r2r's version and ``stats``
  (requests scored and ``rerank_batch`` calls made so far).

``relevance_score`` / ``score`` is ``sigmoid(z_yes - z_no)``, the calibrated probability of relevance the core
returns. The extra key ``"r2r"`` (:data:`EXTRA_KEY`) carries the expert that scored the query and the router's
probabilities (empty when there is no router).

Behaviour: concurrent requests are coalesced into ``rerank_batch`` calls (:class:`MicroBatcher`; scores
equal one-at-a-time ones up to the dtype's rounding, ``--max-batch-queries 1`` turns it off). Bad input
gets a 4xx JSON body naming the field (``{"message", "field"}``; on ``/rerank`` TEI's ``{"error",
"error_type", "field"}``): 400 for a body that is not JSON, 413 for one over ``max_body_bytes``, 422 for an
empty query, a non-list ``documents`` / ``texts``, ``top_n`` < 1 and other bad fields, 404 for an unknown
``model``, 401 without the API key when one is set. The server writes nothing to disk, logs one line per
request (method, path, status, latency, documents, expert; never the texts) on the ``r2r_core.serve`` logger,
and binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(f'r2r serve needs FastAPI and uvicorn ({exc.name} is missing): pip install "r2r-rerank[serve]"'
                      ) from exc

from r2r_core.serve.app import DEFAULT_MAX_BODY_BYTES, EXTRA_KEY, create_app, run
from r2r_core.serve.batcher import MicroBatcher

__all__ = ["DEFAULT_MAX_BODY_BYTES", "EXTRA_KEY", "MicroBatcher", "create_app", "run"]
