"""Adapter loading and reporting (issue #18): the shared engine cache, loading options passed to the core,
truthful serialisation and events, the core's max_length rule, and the per-call truncation warning.

All on the tiny bundle of ``conftest.py``; the corpus is the adapters' shared one.
"""

from __future__ import annotations

import gc
import logging
import threading
import weakref

import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("langchain_core")

import torch  # noqa: E402
from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload, LlamaDebugHandler  # noqa: E402
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.events.rerank import ReRankStartEvent  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from test_adapters_shared import QUERIES, corpus_texts, make_documents, make_nodes  # noqa: E402
from test_llamaindex import _Collect  # noqa: E402

from r2r_core import R2RReranker  # noqa: E402
from r2r_core.engines import cached_engine_count, shared_engine  # noqa: E402
from r2r_langchain import R2RRerank as LCRerank  # noqa: E402
from r2r_llamaindex import R2RRerank as LIRerank  # noqa: E402


@pytest.fixture
def tiny_options(tiny_bundle_dir):
    return {"model": str(tiny_bundle_dir), "device": "cpu", "dtype": "float32", "batch_size": 4}


# --------------------------------------------------------------------------- engine cache


def test_equal_settings_share_one_engine_different_settings_do_not(tiny_options):
    a = LIRerank(**tiny_options)
    b = LCRerank(**tiny_options, top_n=1)  # top_n is not a loading option
    assert a.engine is b.engine
    c = LIRerank(**tiny_options, instruction="Given a question, find the passage that answers it")
    d = LCRerank(**{**tiny_options, "max_length": 256})
    assert len({id(a.engine), id(c.engine), id(d.engine)}) == 3
    assert c.engine.instruction == "Given a question, find the passage that answers it"
    assert d.engine.encoder.max_length == 256
    assert a.engine.backbone.model is not c.engine.backbone.model  # really separate loads


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="CPU-only machines")
def test_the_key_is_what_was_picked_not_how_it_was_asked_for(tiny_options, tiny_bundle_dir):
    a = LIRerank(**tiny_options)
    # device=None picks the CPU here, and a relative spelling of the path names the same bundle
    b = LCRerank(**{**tiny_options, "device": None, "model": str(tiny_bundle_dir / ".." / tiny_bundle_dir.name)})
    assert a.engine is b.engine


def test_an_engine_is_freed_when_no_adapter_holds_it(tiny_options):
    gc.collect()
    before = cached_engine_count()
    a, b = LIRerank(**tiny_options), LCRerank(**tiny_options)
    assert cached_engine_count() == before + 1
    engine = weakref.ref(a.engine)
    del a
    gc.collect()
    assert engine() is b.engine  # still held by the other adapter
    del b
    gc.collect()
    assert engine() is None and cached_engine_count() == before
    fresh = LIRerank(**tiny_options)  # the next adapter loads it again
    assert sorted(fresh.engine.experts) == ["financial", "legal", "medical"]


def test_concurrent_first_use_loads_once(tiny_options):
    got: list[R2RReranker] = []
    options = {**tiny_options, "max_length": 384}  # a key no other test uses, so the first load happens here

    def build():
        got.append(shared_engine(**options))

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 3 and all(e is got[0] for e in got)


# --------------------------------------------------------------------------- loading options


def test_loading_options_reach_the_core(tiny_options):
    query = next(iter(QUERIES))
    plain = LCRerank(**tiny_options, engine_kwargs={"use_prefix_cache": False}, top_n=None)
    cached = LCRerank(**tiny_options, top_n=None)
    assert plain.engine.use_prefix_cache is False and cached.engine.use_prefix_cache is True
    assert plain.engine is not cached.engine
    got = plain.compress_documents(make_documents(), query)
    want = cached.compress_documents(make_documents(), query)
    assert [d.id for d in got] == [d.id for d in want]
    # fp32, two forward paths (whole prompt vs prefix KV cache) on a 2-layer model: ~1e-5 relative
    assert [d.metadata["relevance_score"] for d in got] == pytest.approx(
        [d.metadata["relevance_score"] for d in want], abs=1e-4)
    chatml = LIRerank(**tiny_options, template="chatml")
    assert chatml.engine.template.name == "chatml"
    assert chatml.engine.load_options["template"] == "chatml"
    assert cached.engine.template.name != "chatml"


@pytest.mark.parametrize("cls", [LIRerank, LCRerank])
def test_bad_loading_options_name_the_problem(cls, tiny_options, tiny_reranker):
    with pytest.raises(ValueError, match=r"engine_kwargs.*\['batch_size'\]"):
        cls(**tiny_options, engine_kwargs={"batch_size": 2})
    with pytest.raises(ValueError, match=r"\['bogus'\].*allowed: \['use_prefix_cache'\]"):
        cls(**tiny_options, engine_kwargs={"bogus": 1})
    for field, value in {"template": "chatml", "instruction": "x", "trust_remote_code": True,
                         "engine_kwargs": {"use_prefix_cache": False}}.items():
        with pytest.raises(ValueError, match=field):
            cls(reranker=tiny_reranker, **{field: value})
    with pytest.raises(KeyError, match="unknown template"):
        cls(**tiny_options, template="no-such-template")


@pytest.mark.parametrize("cls", [LIRerank, LCRerank])
def test_max_length_is_the_cores_rule_and_fails_before_loading(cls):
    # model="default" would load the real backbone: failing here proves the check comes first
    with pytest.raises(ValidationError, match=r"`max_length` must be an int >= 32"):
        cls(max_length=16)
    with pytest.raises(ValueError, match=r"`max_length` must be an int >= 32"):
        R2RReranker.from_pretrained("default", max_length=16)
    with pytest.raises(ValueError, match="batch_size"):
        R2RReranker.from_pretrained("default", batch_size=0)


# --------------------------------------------------------------------------- truthful reporting


def test_to_dict_reports_the_given_engine_not_the_defaults(tiny_reranker, tiny_bundle_dir):
    data = LIRerank(reranker=tiny_reranker, top_n=2).to_dict()
    assert data["model"] == str(tiny_bundle_dir) and data["model"] != "default"
    assert (data["device"], data["dtype"], data["batch_size"], data["max_length"]) == ("cpu", "float32", 4, 512)
    assert "reranker" not in data
    rebuilt = LIRerank.from_dict(data)  # loads the same bundle with the same options
    assert rebuilt.engine.load_options == tiny_reranker.load_options
    lc = LCRerank(reranker=tiny_reranker).model_dump()
    assert lc["model"] == str(tiny_bundle_dir) and lc["dtype"] == "float32"


def test_an_engine_built_directly_is_described_by_what_it_holds(tiny_model_dir):
    from r2r_core import get_template, load_backbone

    engine = R2RReranker(load_backbone(str(tiny_model_dir), device="cpu", dtype="float32"), get_template("chatml"),
                         batch_size=2, max_length=128)
    data = LIRerank(reranker=engine).to_dict()
    assert data["model"] == str(tiny_model_dir)
    assert (data["batch_size"], data["max_length"], data["template"]) == (2, 128, "chatml")


def test_events_name_the_bundle_and_the_expert(tiny_reranker, tiny_bundle_dir):
    query = "How much notice is needed to terminate the agreement?"
    expert = tiny_reranker.route(query).expert
    debug = LlamaDebugHandler()
    rerank = LIRerank(reranker=tiny_reranker, top_n=2, callback_manager=CallbackManager([debug]))
    handler = _Collect(events=[])
    root = get_dispatcher()
    root.add_event_handler(handler)
    try:
        out = rerank.postprocess_nodes(make_nodes(), query_str=query)
        LIRerank(reranker=tiny_reranker, expert="financial").postprocess_nodes(make_nodes(), query_str=query)
    finally:
        root.event_handlers.remove(handler)
    names = [e.model_name for e in handler.events if isinstance(e, ReRankStartEvent)]
    assert names == [f"{tiny_bundle_dir}:{expert}", f"{tiny_bundle_dir}:financial"]
    [(start, end)] = debug.get_event_pairs(CBEventType.RERANKING)
    assert start.payload[EventPayload.MODEL_NAME] == end.payload[EventPayload.MODEL_NAME] == names[0]
    assert {n.node.metadata["r2r_expert"] for n in out} == {expert}
    # routing before the events gives exactly the results of routing inside the core's call
    reference = tiny_reranker.rerank(query, [n.node.get_content(metadata_mode="embed") for n in make_nodes()], top_n=2)
    assert [n.score for n in out] == [r.score for r in reference]


# --------------------------------------------------------------------------- truncation warning


def test_truncation_warns_once_per_call_with_the_count(tiny_reranker, caplog):
    query = next(iter(QUERIES))
    docs = corpus_texts()[:3]
    long_docs = [docs[0] * 40, docs[1], docs[2] * 40]  # ~1,500 tokens each, over max_length=512
    with caplog.at_level(logging.WARNING, logger="r2r_core.reranker"):
        tiny_reranker.rerank(query, docs)
        assert not caplog.records
        tiny_reranker.rerank(query, long_docs)
        tiny_reranker.rerank(query, long_docs)
        tiny_reranker.rerank_batch([query, query], [long_docs, long_docs[:1]])
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert messages[0].startswith("2 of 3 documents") and messages[1].startswith("2 of 3 documents")
    assert messages[2].startswith("3 of 4 documents") and "max_length=512" in messages[2]
