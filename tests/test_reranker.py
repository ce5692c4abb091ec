"""The R2RReranker facade on a tiny random model: results, routing, experts, bad input, concurrency."""

from __future__ import annotations

import threading

import pytest
from conftest import DOMAIN_QUERIES

from r2r_core import BASE_ADAPTER, R2RReranker, RerankResult

DOCS = [
    "Either party may terminate this agreement with thirty days notice.",
    "Metformin commonly causes nausea and diarrhea.",
    "Revenue increased 12% to $4.2 million in fiscal 2019.",
    "We share personal data with service providers.",
    "High blood pressure is often caused by salt intake and stress.",
]


def test_results_are_sorted_carry_index_document_and_expert(tiny_reranker):
    results = tiny_reranker.rerank("What are the side effects of metformin?", DOCS, expert="medical")
    assert all(isinstance(r, RerankResult) for r in results)
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)
    assert sorted(r.index for r in results) == list(range(len(DOCS)))
    for r in results:
        assert r.document == DOCS[r.index] and r.expert == "medical"
        assert 0.0 < r.score < 1.0


def test_top_n_is_applied_and_clamped(tiny_reranker):
    full = tiny_reranker.rerank("contract termination", DOCS, expert="legal")
    assert tiny_reranker.rerank("contract termination", DOCS, top_n=2, expert="legal") == full[:2]
    assert len(tiny_reranker.rerank("contract termination", DOCS, top_n=50, expert="legal")) == len(DOCS)


def test_score_returns_input_order(tiny_reranker):
    ranked = tiny_reranker.rerank("q", DOCS, expert="financial")
    scores = tiny_reranker.score("q", DOCS, expert="financial")
    for r in ranked:
        assert scores[r.index] == r.score


def test_router_routes_its_training_queries(tiny_reranker):
    for domain, queries in DOMAIN_QUERIES.items():
        for q in queries:
            route = tiny_reranker.route(q)
            assert route.expert == domain
            assert set(route.probabilities) == set(DOMAIN_QUERIES)
            assert sum(route.probabilities.values()) == pytest.approx(1.0, abs=1e-5)


def test_routed_rerank_uses_the_routed_expert(tiny_reranker):
    q = DOMAIN_QUERIES["financial"][0]
    routed = tiny_reranker.rerank(q, DOCS)
    assert {r.expert for r in routed} == {"financial"}
    assert routed == tiny_reranker.rerank(q, DOCS, expert="financial")


def test_low_confidence_falls_back_to_the_base_model(tiny_bundle_dir):
    r = R2RReranker.from_pretrained(tiny_bundle_dir, device="cpu", dtype="float32")
    r.threshold = 0.999999
    route = r.route("completely unrelated text about the weather on mars")
    assert route.expert == BASE_ADAPTER
    results = r.rerank("completely unrelated text about the weather on mars", DOCS)
    assert {x.expert for x in results} == {BASE_ADAPTER}
    assert results == r.rerank("completely unrelated text about the weather on mars", DOCS, expert=BASE_ADAPTER)


def test_experts_change_scores(tiny_reranker):
    q = "which clause covers termination?"
    by_expert = {e: tiny_reranker.score(q, DOCS, expert=e) for e in [BASE_ADAPTER, *tiny_reranker.experts]}
    values = [tuple(round(s, 5) for s in v) for v in by_expert.values()]
    assert len(set(values)) == len(values)


def test_rerank_batch_mixes_experts_per_row(tiny_reranker):
    queries = [DOMAIN_QUERIES[d][i] for i in range(2) for d in DOMAIN_QUERIES]
    docs = [DOCS[i % 3 :] for i in range(len(queries))]
    batched = tiny_reranker.rerank_batch(queries, docs)
    for q, d, res in zip(queries, docs, batched):
        single = tiny_reranker.rerank(q, d)
        assert [r.index for r in res] == [r.index for r in single]
        assert [r.expert for r in res] == [r.expert for r in single]
        # other batch compositions, other GEMM shapes: fp32 chains, ~1e-4
        assert [r.score for r in res] == pytest.approx([r.score for r in single], abs=1e-4)
    assert {res[0].expert for res in batched} == set(DOMAIN_QUERIES)


def test_rerank_batch_with_fixed_experts_and_empty_lists(tiny_reranker):
    out = tiny_reranker.rerank_batch(["a", "b"], [DOCS[:2], []], experts=["legal", None], top_n=1)
    assert len(out[0]) == 1 and out[0][0].expert == "legal" and out[1] == []


@pytest.mark.parametrize("query", ["", "   ", None, 42])
def test_bad_query_raises_value_error_naming_the_parameter(tiny_reranker, query):
    with pytest.raises(ValueError, match="`query`"):
        tiny_reranker.rerank(query, DOCS)


def test_empty_documents_return_empty(tiny_reranker):
    assert tiny_reranker.rerank("q", []) == []


@pytest.mark.parametrize("top_n", [0, -3, 1.5, True])
def test_bad_top_n(tiny_reranker, top_n):
    with pytest.raises(ValueError, match="`top_n`"):
        tiny_reranker.rerank("q", DOCS, top_n=top_n)


def test_non_string_document_raises_type_error_with_index(tiny_reranker):
    with pytest.raises(TypeError, match=r"documents\[2\]"):
        tiny_reranker.rerank("q", ["a", "b", None])
    with pytest.raises(TypeError, match=r"documents\[0\]"):
        tiny_reranker.rerank("q", [3])
    with pytest.raises(TypeError, match="sequence of strings"):
        tiny_reranker.rerank("q", "a single string")


def test_unknown_expert_lists_the_available_ones(tiny_reranker):
    with pytest.raises(KeyError, match="available.*legal"):
        tiny_reranker.rerank("q", DOCS, expert="astrology")


def test_very_long_documents_are_scored(tiny_reranker):
    res = tiny_reranker.rerank("q", ["word " * 20000, "short"], expert="legal")
    assert len(res) == 2


def test_eight_threads_get_exactly_the_sequential_scores(tiny_reranker):
    queries = [DOMAIN_QUERIES[d][i % 4] for i in range(8) for d in [list(DOMAIN_QUERIES)[i % 3]]]
    expected = [tiny_reranker.rerank(q, DOCS) for q in queries]
    got: list = [None] * len(queries)
    barrier = threading.Barrier(len(queries))

    def work(i):
        barrier.wait()
        for _ in range(3):
            got[i] = tiny_reranker.rerank(queries[i], DOCS)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(queries))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected
    assert len({r[0].expert for r in got}) == 3


def test_arerank_matches_rerank(tiny_reranker):
    import asyncio

    async def run():
        return await asyncio.gather(*(tiny_reranker.arerank(q, DOCS) for q in DOMAIN_QUERIES["legal"][:3]))

    out = asyncio.run(run())
    assert out == [tiny_reranker.rerank(q, DOCS) for q in DOMAIN_QUERIES["legal"][:3]]


def test_add_and_remove_experts_at_runtime(tiny_model_dir, tiny_adapters):
    r = R2RReranker.from_pretrained(str(tiny_model_dir), device="cpu", dtype="float32")
    assert r.experts == []
    base = r.score("q", DOCS)
    r.add_expert("medical", tiny_adapters["medical"])
    r.add_expert("legal", tiny_adapters["legal"], instruction="Find the clause")
    assert r.experts == ["medical", "legal"]
    assert r.score("q", DOCS, expert=BASE_ADAPTER) == pytest.approx(base, abs=1e-6)
    assert r.score("q", DOCS, expert="medical") != pytest.approx(base, abs=1e-3)
    with pytest.raises(ValueError, match="already loaded"):
        r.add_expert("medical", tiny_adapters["medical"])
    r.remove_expert("medical")
    assert r.experts == ["legal"]
    with pytest.raises(KeyError, match="available"):
        r.rerank("q", DOCS, expert="medical")
    with pytest.raises(ValueError, match="expert name"):
        r.add_expert("__base__", tiny_adapters["legal"])


def test_a_backbone_already_holding_experts_is_refused(tiny_reranker):
    from r2r_core import R2RReranker

    with pytest.raises(ValueError, match="already carries LoRA experts"):
        R2RReranker(tiny_reranker.backbone, tiny_reranker.template)


def _broken_adapters(src, tmp_path):
    """Two adapters that fail to load: a truncated weights file, and weights that do not fit their config (the
    LoRA layers are already inserted when that shows)."""
    import json
    import shutil

    truncated = tmp_path / "truncated"
    shutil.copytree(src, truncated)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    misfit = tmp_path / "misfit"
    shutil.copytree(src, misfit)
    config = json.loads((misfit / "adapter_config.json").read_text())
    config["r"] *= 2
    (misfit / "adapter_config.json").write_text(json.dumps(config))
    return {"truncated": truncated, "misfit": misfit}


@pytest.mark.parametrize("loaded", [[], ["medical"]])
def test_a_failed_add_expert_leaves_the_model_as_it_was(tiny_model_dir, tiny_adapters, tmp_path, loaded):
    """After an adapter fails to load, every expert (and the bare backbone) scores exactly as before, the error
    names the file, and the name can be used again."""
    from peft.tuners.lora import LoraLayer

    r = R2RReranker.from_pretrained(str(tiny_model_dir), device="cpu", dtype="float32")
    for name in loaded:
        r.add_expert(name, tiny_adapters[name])
    experts = [BASE_ADAPTER, *loaded]
    before = {e: r.score("q", DOCS, expert=e) for e in experts}
    layers = sum(isinstance(m, LoraLayer) for m in r.model.modules())
    for kind, folder in _broken_adapters(tiny_adapters["legal"], tmp_path).items():
        with pytest.raises(ValueError, match=f"{kind}.adapter_model.safetensors"):
            r.add_expert("legal", folder)
        assert r.experts == loaded
        assert sum(isinstance(m, LoraLayer) for m in r.model.modules()) == layers, kind
        assert {e: r.score("q", DOCS, expert=e) for e in experts} == before, kind  # exactly: the same model
    r.add_expert("legal", tiny_adapters["legal"])
    assert r.experts == [*loaded, "legal"]
    assert r.score("q", DOCS, expert=BASE_ADAPTER) == pytest.approx(before[BASE_ADAPTER], abs=1e-6)
    assert r.score("q", DOCS, expert="legal") != pytest.approx(before[BASE_ADAPTER], abs=1e-3)
