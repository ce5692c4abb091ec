"""The FastAPI application of ``r2r serve``: routes, auth, the body limit and the request log.

See :mod:`r2r_core.serve` for the endpoints and their contract. ``create_app`` takes an already loaded engine;
``run`` serves it with uvicorn.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from r2r_core.reranker import R2RReranker, RerankResult
from r2r_core.router import Route
from r2r_core.serve.batcher import MicroBatcher
from r2r_core.serve.schemas import RequestError, parse_cohere, parse_json, parse_tei

logger = logging.getLogger("r2r_core.serve")

__all__ = ["DEFAULT_MAX_BODY_BYTES", "EXTRA_KEY", "create_app", "run"]

#: The key under which responses carry r2r's own information (the expert and the router's probabilities).
EXTRA_KEY = "r2r"
DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
_OPEN_PATHS = frozenset({"/health"})  # reachable without the API key, for load balancers' probes


def create_app(engine: R2RReranker, *, name: str = "default", api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_documents: int = 1000,
               max_batch_queries: int = 32, batch_wait_ms: float = 2.0) -> FastAPI:
    """The app serving ``engine`` as bundle ``name``.

    ``api_key``: when set, every endpoint but ``/health`` needs ``Authorization: Bearer <api_key>``.
    ``max_body_bytes`` bounds a request body (413 above it); ``max_documents`` the documents of one request
    (422 above it). Concurrent requests are coalesced by a :class:`MicroBatcher` (``max_batch_queries`` per
    batch, waiting ``batch_wait_ms`` for company).
    """
    if max_body_bytes < 1 or max_documents < 1:
        raise ValueError(f"max_body_bytes and max_documents must be >= 1, got {max_body_bytes}, {max_documents}")
    if api_key is not None and not api_key.strip():
        raise ValueError("`api_key` must be a non-empty string or None")
    from r2r_core import __version__

    batcher = MicroBatcher(engine, max_queries=max_batch_queries, max_wait_s=batch_wait_ms / 1000)
    model_names = sorted({name, name.rstrip("/").rsplit("/", 1)[-1], "r2r"})

    async def lifespan(app: FastAPI):
        yield
        await batcher.close()

    app = FastAPI(title="r2r serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.batcher = batcher
    app.state.engine = engine

    @app.middleware("http")
    async def log_and_authorize(request: Request, call_next):
        start = time.perf_counter()
        request.state.note = ""
        if api_key is not None and request.url.path not in _OPEN_PATHS and not _authorized(request, api_key):
            response = _error(request, RequestError(401, "Authorization", "this server needs the header "
                                                    "`Authorization: Bearer <api key>` with its --api-key"))
            response.headers["WWW-Authenticate"] = "Bearer"
        else:
            try:
                response = await call_next(request)
            except Exception:  # a fault of the server, not of the input; logged with its traceback
                logger.exception("%s %s failed", request.method, request.url.path)
                response = JSONResponse({"message": "internal server error"}, status_code=500)
        ms = (time.perf_counter() - start) * 1000
        logger.info("%s %s %d %.1f ms%s", request.method, request.url.path, response.status_code, ms,
                    request.state.note)
        return response

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        request.state.note = f" field={exc.field}"
        return _error(request, exc)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info")
    async def info():
        router = engine.router
        return {
            "bundle": name, "model_id": name, "model_names": model_names, "version": __version__,
            "base_model": engine.backbone.model_id, "experts": engine.experts, "fallback": engine.fallback,
            "router": None if router is None else {"labels": list(router.labels), "threshold": engine.threshold},
            "device": str(engine.backbone.device), "dtype": str(engine.backbone.dtype).removeprefix("torch."),
            "max_length": engine.encoder.max_length, "max_documents": max_documents,
            "max_body_bytes": max_body_bytes, "extra_key": EXTRA_KEY,
            "stats": {"requests": batcher.requests, "batches": batcher.batches},
            "endpoints": ["POST /v2/rerank", "POST /v1/rerank", "POST /rerank", "GET /health", "GET /info"],
        }

    async def cohere(request: Request, version: str) -> dict[str, Any]:
        req = parse_cohere(parse_json(await _read_body(request, max_body_bytes)), max_documents)
        if req.model is not None and req.model not in model_names:
            raise RequestError(404, "model", f"unknown model {req.model!r}; this server serves {model_names}")
        route, results = await _rerank(request, batcher, engine, req.query, req.documents)
        out = []
        for r in results[: req.top_n]:
            item: dict[str, Any] = {"index": r.index, "relevance_score": r.score}
            if req.return_documents:
                item["document"] = {"text": r.document}
            out.append(item)
        return {"id": str(uuid.uuid4()), "results": out,
                "meta": {"api_version": {"version": version}, "billed_units": {"search_units": 1}},
                EXTRA_KEY: {"bundle": name, **_extra(route, results)}}

    @app.post("/v2/rerank")
    async def cohere_v2(request: Request):
        return await cohere(request, "2")

    @app.post("/v1/rerank")
    async def cohere_v1(request: Request):
        return await cohere(request, "1")

    @app.post("/rerank")
    async def tei(request: Request):
        req = parse_tei(parse_json(await _read_body(request, max_body_bytes)), max_documents)
        route, results = await _rerank(request, batcher, engine, req.query, req.texts)
        extra = _extra(route, results)
        out = []
        for r in results:
            item: dict[str, Any] = {"index": r.index, "score": r.margin if req.raw_scores else r.score}
            if req.return_text:
                item["text"] = r.document
            item[EXTRA_KEY] = extra
            out.append(item)
        return out

    return app


async def _rerank(request: Request, batcher: MicroBatcher, engine: R2RReranker, query: str, documents: list[str]
                  ) -> tuple[Route | None, list[RerankResult]]:
    route, results = await batcher.rerank(query, documents) if documents else (None, [])
    expert = results[0].expert if results else None
    request.state.note = f" docs={len(documents)}" + (f" expert={expert}" if expert else "")
    return route, results


def _extra(route: Route | None, results: list[RerankResult]) -> dict[str, Any]:
    return {"expert": results[0].expert if results else None,
            "router_probabilities": dict(route.probabilities) if route is not None else {}}


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` (by its Content-Length or while
    it streams in)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, "body", f"the body is {declared} bytes; this server accepts at most {limit} "
                                        "(r2r serve --max-body-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "body", f"the body is over {limit} bytes, the most this server accepts "
                                            "(r2r serve --max-body-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def _authorized(request: Request, api_key: str) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def _error(request: Request, exc: RequestError) -> JSONResponse:
    if request.url.path == "/rerank":  # TEI's error shape, so TEI clients show the message
        body = {"error": exc.message, "error_type": "Validation", "field": exc.field}
    else:  # Cohere's
        body = {"message": exc.message, "field": exc.field}
    return JSONResponse(body, status_code=exc.status)


def run(engine: R2RReranker, *, host: str = "127.0.0.1", port: int = 8080, **app_options: Any) -> None:
    """Serve ``engine`` with uvicorn until interrupted (``app_options`` go to :func:`create_app`)."""
    import uvicorn

    app = create_app(engine, **app_options)
    logger.info("serving %s on http://%s:%d (experts: %s)", app_options.get("name", "default"), host, port,
                ", ".join(engine.experts) or "none")
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning")
