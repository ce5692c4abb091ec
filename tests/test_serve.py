"""``r2r serve`` (issue #18): a real server process on a free local port, serving the tiny bundle, called by
the real ``cohere`` SDK (v2 and v1 clients), langchain-cohere's ``CohereRerank`` in a retrieval pipeline,
and plain ``httpx`` for TEI's shape; every bad-input case with its status; auth; the request log; no disk
writes. The micro-batcher is also tested in-process on the engine itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_adapters_shared import CORPUS, QUERIES, corpus_texts, make_documents  # noqa: E402

from r2r_core.serve import EXTRA_KEY, MicroBatcher, create_app  # noqa: E402

API_KEY = "test-key-123"
MAX_BODY = 20_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_bundle_dir, tmp_path_factory):
    """``r2r serve`` in a subprocess, with an API key and a small body limit, run from an empty folder."""
    cwd = tmp_path_factory.mktemp("serve-cwd")
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    port = _free_port()
    cmd = [sys.executable, "-m", "r2r_core.cli", "serve", "--bundle", str(tiny_bundle_dir), "--port", str(port),
           "--device", "cpu", "--dtype", "float32", "--batch-size", "4", "--api-key", API_KEY,
           "--max-body-bytes", str(MAX_BODY)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"r2r serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"r2r serve did not answer /health within 180 s:\n{log.read_text()}")
        time.sleep(0.25)
    yield SimpleNamespace(url=url, cwd=cwd, log=log, auth={"Authorization": f"Bearer {API_KEY}"})
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _reference(engine, query, texts):
    return engine.rerank(query, texts), engine.route(query)


# --------------------------------------------------------------------------- real clients


def test_cohere_client_v2_reranks_with_the_bundle(server, tiny_reranker):
    cohere = pytest.importorskip("cohere")
    client = cohere.ClientV2(api_key=API_KEY, base_url=server.url)
    for query in QUERIES:
        reference, route = _reference(tiny_reranker, query, corpus_texts())
        response = client.rerank(model="r2r", query=query, documents=corpus_texts(), top_n=3)
        assert [r.index for r in response.results] == [r.index for r in reference[:3]]
        # another process, the same fp32 kernels: scores agree to float rounding
        assert [r.relevance_score for r in response.results] == pytest.approx(
            [r.score for r in reference[:3]], abs=1e-4)
        extra = response.model_extra[EXTRA_KEY]
        assert extra["expert"] == route.expert
        assert extra["router_probabilities"] == pytest.approx(route.probabilities, abs=1e-4)


def test_cohere_v1_client_with_document_objects(server, tiny_reranker):
    cohere = pytest.importorskip("cohere")
    client = cohere.Client(api_key=API_KEY, base_url=server.url)
    query = next(iter(QUERIES))
    reference, _ = _reference(tiny_reranker, query, corpus_texts())
    response = client.rerank(model="r2r", query=query, documents=[{"text": t} for t in corpus_texts()],
                             return_documents=True)
    assert [r.index for r in response.results] == [r.index for r in reference]
    assert [r.document.text for r in response.results] == [r.document for r in reference]


def test_cohere_client_sees_our_errors(server):
    cohere = pytest.importorskip("cohere")
    client = cohere.ClientV2(api_key=API_KEY, base_url=server.url)
    with pytest.raises(cohere.core.ApiError) as info:
        client.rerank(model="rerank-v3.5", query="q", documents=["a"])
    assert info.value.status_code == 404 and info.value.body["field"] == "model"
    assert "r2r" in info.value.body["message"]  # names what is served


def test_langchain_cohere_rerank_in_a_pipeline(server, tiny_reranker):
    pytest.importorskip("langchain_cohere")
    pytest.importorskip("langchain_classic")
    from langchain_classic.retrievers import ContextualCompressionRetriever
    from langchain_cohere import CohereRerank
    from langchain_core.embeddings import DeterministicFakeEmbedding
    from langchain_core.vectorstores import InMemoryVectorStore

    from r2r_langchain import R2RRerank

    base = InMemoryVectorStore.from_documents(make_documents(), DeterministicFakeEmbedding(size=64)).as_retriever(
        search_kwargs={"k": 8})
    remote = ContextualCompressionRetriever(
        base_compressor=CohereRerank(model="r2r", base_url=server.url, cohere_api_key=API_KEY, top_n=3),
        base_retriever=base)
    local = ContextualCompressionRetriever(
        base_compressor=R2RRerank(reranker=tiny_reranker, top_n=3), base_retriever=base)
    for query in QUERIES:
        got, want = remote.invoke(query), local.invoke(query)
        assert [d.page_content for d in got] == [d.page_content for d in want]
        assert [d.metadata["relevance_score"] for d in got] == pytest.approx(
            [d.metadata["relevance_score"] for d in want], abs=1e-4)


def test_tei_shape_through_httpx(server, tiny_reranker):
    query = next(iter(QUERIES))
    reference, route = _reference(tiny_reranker, query, corpus_texts())
    body = {"query": query, "texts": corpus_texts(), "return_text": True, "truncate": True}
    items = httpx.post(f"{server.url}/rerank", json=body, headers=server.auth).json()
    assert [i["index"] for i in items] == [r.index for r in reference]
    assert [i["score"] for i in items] == pytest.approx([r.score for r in reference], abs=1e-4)
    assert [i["text"] for i in items] == [r.document for r in reference]
    assert {i[EXTRA_KEY]["expert"] for i in items} == {route.expert}
    raw = httpx.post(f"{server.url}/rerank", json={"query": query, "texts": corpus_texts(), "raw_scores": True},
                     headers=server.auth).json()
    assert [i["score"] for i in raw] == pytest.approx([r.margin for r in reference], abs=1e-3)
    assert "text" not in raw[0]


def test_concurrent_requests_are_batched_and_equal_sequential_ones(server):
    queries = list(QUERIES) * 6
    body = {"model": "r2r", "documents": corpus_texts()}
    sequential = {q: httpx.post(f"{server.url}/v2/rerank", json={**body, "query": q}, headers=server.auth).json()
                  for q in QUERIES}
    before = httpx.get(f"{server.url}/info", headers=server.auth).json()["stats"]

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, headers=server.auth, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v2/rerank", json={**body, "query": q}) for q in queries))

    responses = asyncio.run(burst())
    after = httpx.get(f"{server.url}/info", headers=server.auth).json()["stats"]
    for query, response in zip(queries, responses, strict=True):
        assert response.status_code == 200
        got, want = response.json(), sequential[query]
        assert [r["index"] for r in got["results"]] == [r["index"] for r in want["results"]]
        assert [r["relevance_score"] for r in got["results"]] == pytest.approx(
            [r["relevance_score"] for r in want["results"]], abs=1e-4)  # batched with others: fp32 rounding
        assert got[EXTRA_KEY]["expert"] == want[EXTRA_KEY]["expert"]
    assert after["requests"] - before["requests"] == len(queries)
    assert after["batches"] - before["batches"] < len(queries)  # requests that arrived together shared batches


# --------------------------------------------------------------------------- bad input, auth, info, log


BAD = [
    ("/v2/rerank", {"query": "", "documents": ["a"]}, 422, "query"),
    ("/v2/rerank", {"documents": ["a"]}, 422, "query"),
    ("/v2/rerank", {"query": "q", "documents": "not a list"}, 422, "documents"),
    ("/v2/rerank", {"query": "q", "documents": ["a", 3]}, 422, "documents[1]"),
    ("/v2/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, 422, "top_n"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": "3"}, 422, "top_n"),
    ("/v2/rerank", {"model": "rerank-english-v3.0", "query": "q", "documents": ["a"]}, 404, "model"),
    ("/v2/rerank", {"query": "q", "documents": ["x" * MAX_BODY]}, 413, "body"),
    ("/v2/rerank", "{not json", 400, "body"),
    ("/v2/rerank", "[" * 15_000, 400, "body"),  # nested too deeply for the JSON parser
    ("/v2/rerank", {"query": "q", "documents": ["fine", "lone \ud800 surrogate"]}, 422, "documents[1]"),
    ("/v2/rerank", [1, 2], 422, "body"),
    ("/rerank", {"query": "   ", "texts": ["a"]}, 422, "query"),
    ("/rerank", {"query": "q", "texts": {"a": 1}}, 422, "texts"),
    ("/rerank", {"query": "\udfff", "texts": ["a"]}, 422, "query"),
    ("/rerank", {"query": "q", "texts": ["a"], "raw_scores": "yes"}, 422, "raw_scores"),
    ("/rerank", {"query": "q", "texts": ["a"], "truncation_direction": "Left"}, 422, "truncation_direction"),
    ("/rerank", {"query": "q", "texts": ["y" * MAX_BODY]}, 413, "body"),
]


@pytest.mark.parametrize(("path", "body", "status", "field"), BAD, ids=[f"{p}-{f}-{s}" for p, _, s, f in BAD])
def test_bad_input_gets_a_4xx_naming_the_field(server, path, body, status, field):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(f"{server.url}{path}", content=content,
                          headers={**server.auth, "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    data = response.json()
    assert data["field"] == field
    assert (data["error"] if path == "/rerank" else data["message"])  # a message says what is allowed


def test_a_chunked_body_over_the_limit_is_refused_too(server):
    def chunks():  # no Content-Length: the limit must hold while the body streams in
        yield b'{"query": "q", "documents": ["'
        for _ in range(MAX_BODY // 1000 + 1):
            yield b"z" * 1000
        yield b'"]}'

    response = httpx.post(f"{server.url}/v2/rerank", content=chunks(), headers=server.auth)
    assert response.status_code == 413 and response.json()["field"] == "body"


def test_api_key_is_required_except_for_health(server):
    body = {"query": "q", "documents": ["a"]}
    assert httpx.post(f"{server.url}/v2/rerank", json=body).status_code == 401
    wrong = httpx.post(f"{server.url}/rerank", json={"query": "q", "texts": ["a"]},
                       headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["field"] == "Authorization"
    assert wrong.headers["WWW-Authenticate"] == "Bearer"
    assert httpx.get(f"{server.url}/info").status_code == 401
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.post(f"{server.url}/v2/rerank", json=body, headers=server.auth).status_code == 200


def test_info_describes_the_bundle(server, tiny_reranker, tiny_bundle_dir):
    import r2r_core

    info = httpx.get(f"{server.url}/info", headers=server.auth).json()
    assert info["bundle"] == str(tiny_bundle_dir) and "r2r" in info["model_names"]
    assert info["experts"] == tiny_reranker.experts and info["base_model"] == tiny_reranker.backbone.model_id
    assert info["router"]["labels"] == list(tiny_reranker.router.labels)
    assert info["version"] == r2r_core.__version__ and info["max_body_bytes"] == MAX_BODY


def test_one_log_line_per_request_and_no_files_written(server):
    marker = "a query only this test sends"
    for _ in range(3):
        httpx.post(f"{server.url}/v2/rerank", json={"query": marker, "documents": corpus_texts()},
                   headers=server.auth)
    httpx.post(f"{server.url}/v2/rerank", json={"query": marker, "documents": "x"}, headers=server.auth)
    time.sleep(0.2)
    lines = server.log.read_text().splitlines()
    ok = [ln for ln in lines if "POST /v2/rerank 200" in ln and f"docs={len(CORPUS)}" in ln]
    assert len(ok) >= 3 and all(" ms docs=" in ln and "expert=" in ln for ln in ok)
    assert any("POST /v2/rerank 422" in ln and "field=documents" in ln for ln in lines)
    assert not any(marker in ln for ln in lines)  # texts are never logged
    assert list(server.cwd.iterdir()) == []


# --------------------------------------------------------------------------- in-process


def test_without_an_api_key_requests_need_no_header(tiny_reranker):
    from r2r_core.cli import build_parser

    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    app = create_app(tiny_reranker, name="tiny")

    async def call():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://r2r") as client:
            return await client.post("/v2/rerank", json={"model": "tiny", "query": "q", "documents": ["a", "b"]})

    response = asyncio.run(call())
    assert response.status_code == 200 and len(response.json()["results"]) == 2


def test_micro_batcher_coalesces_and_equals_single_calls(tiny_reranker):
    queries = list(QUERIES) * 3
    docs = corpus_texts()

    async def run(batcher, calls):
        try:
            return await asyncio.gather(*(batcher.rerank(*c) for c in calls), return_exceptions=True)
        finally:
            await batcher.close()

    one = MicroBatcher(tiny_reranker)
    got = asyncio.run(run(one, [(q, docs) for q in queries]))
    assert (one.batches, one.requests) == (1, len(queries))  # all were queued before the first batch ran
    for query, (route, results) in zip(queries, got, strict=True):
        want_route, want = tiny_reranker.rerank_with_route(query, docs)
        assert route.expert == want_route.expert and [r.index for r in results] == [r.index for r in want]
        # the router encodes the batch's queries together: fp32 rounding
        assert route.probabilities == pytest.approx(want_route.probabilities, abs=1e-5)
        assert [r.score for r in results] == pytest.approx([r.score for r in want], abs=1e-4)

    small = MicroBatcher(tiny_reranker, max_queries=4)
    asyncio.run(run(small, [(q, docs) for q in queries]))
    assert small.batches == 3  # 9 requests, at most 4 per batch
    capped = MicroBatcher(tiny_reranker, max_documents=len(docs) * 2)
    asyncio.run(run(capped, [(q, docs) for q in queries]))
    assert capped.batches == 5  # at most 2 requests of 12 documents per batch

    failing = MicroBatcher(tiny_reranker, max_queries=2)
    out = asyncio.run(run(failing, [("q", ["a"], "no-such-expert"), ("q", ["a"], None), ("q", ["b"], None)]))
    assert isinstance(out[0], KeyError)  # the request at fault gets the error ...
    assert out[1][1][0].document == "a"  # ... its batch-mate is run again alone and succeeds
    assert out[2][1][0].document == "b"  # and the worker kept serving
