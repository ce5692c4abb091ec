"""Device/dtype resolution and the router on its own."""

from __future__ import annotations

import json

import pytest
import torch

from r2r_core import BASE_ADAPTER, LatentRouter
from r2r_core.runtime import resolve_device, resolve_dtype, tune_cpu_allocator


def test_device_none_picks_an_available_device():
    dev = resolve_device(None)
    assert dev.type in {"cuda", "mps", "cpu"}
    if not torch.cuda.is_available():
        assert dev.type in {"cpu", "mps"}


def test_explicit_choices_win_and_unknown_strings_raise():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("float32", torch.device("cpu")) is torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) in {torch.float32, torch.bfloat16}
    with pytest.raises(ValueError, match="`dtype`"):
        resolve_dtype("float8", torch.device("cpu"))
    with pytest.raises(ValueError, match="`device`"):
        resolve_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_allocator_is_left_alone_unless_asked(monkeypatch):
    """Tuning glibc's malloc acts on the whole process: off by default, on with R2R_TUNE_MALLOC=1."""
    monkeypatch.delenv("R2R_TUNE_MALLOC", raising=False)
    assert tune_cpu_allocator.__wrapped__() is False
    monkeypatch.setenv("R2R_TUNE_MALLOC", "0")
    assert tune_cpu_allocator.__wrapped__() is False


def test_tuned_allocator_reuses_activation_sized_buffers(monkeypatch):
    """After tuning, a 32 MB buffer freed and allocated again is served from memory the process kept: almost
    no page faults (glibc's default hands such blocks back to the OS: ~8,000 faults each time)."""
    import platform
    import resource

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("the tuning applies to glibc on Linux")
    monkeypatch.setenv("R2R_TUNE_MALLOC", "1")
    assert tune_cpu_allocator.__wrapped__() is True
    rounds = []
    for _ in range(4):  # the least of a few rounds: one-off faults elsewhere in the process hit one round only
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            torch.empty(8 << 20).fill_(1.0)  # 32 MB
        rounds.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert min(rounds) < 10 * 8192 // 10


def test_router_fit_predict_threshold_and_save_load(tmp_path):
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=gen) * 4
    x = torch.cat([centers[i] + torch.randn(20, 16, generator=gen) for i in range(3)])
    labels = [lab for lab in ["a", "b", "c"] for _ in range(20)]
    router = LatentRouter(["a", "b", "c"], threshold=0.5)
    history = router.fit(x, labels, epochs=200)
    assert history["loss"][-1] < history["loss"][0]
    routes = router.route_features(x)
    assert sum(r.expert == lab for r, lab in zip(routes, labels)) >= 57
    far = torch.zeros(1, 16)  # equidistant-ish point: low confidence -> base
    assert router.route_features(far, threshold=0.99)[0].expert == BASE_ADAPTER
    router.save(tmp_path)
    again = LatentRouter.load(tmp_path)
    assert torch.allclose(again.predict_proba(x), router.predict_proba(x))
    assert again.threshold == 0.5 and again.labels == ["a", "b", "c"]


def test_router_validation():
    with pytest.raises(ValueError, match="labels"):
        LatentRouter(["a", "a"])
    with pytest.raises(ValueError, match="threshold"):
        LatentRouter(["a"], threshold=1.5)
    with pytest.raises(RuntimeError, match="not fitted"):
        LatentRouter(["a", "b"]).predict_proba(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="not among"):
        LatentRouter(["a", "b"]).fit(torch.zeros(2, 4), ["a", "z"])
    with pytest.raises(FileNotFoundError, match="router.json"):
        LatentRouter.load("/nonexistent-dir")


def test_batches_leave_the_thread_count_alone_by_default(monkeypatch):
    """By default batches run one at a time on the caller's threads: neither the caller nor a thread that starts
    using torch meanwhile sees another thread count (torch.set_num_threads is process-wide)."""
    import threading

    from r2r_core.runtime import cpu_workers, map_batches

    monkeypatch.delenv("R2R_PARALLEL_BATCHES", raising=False)
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        seen, fresh = [], []

        def job(i: int) -> int:
            seen.append(torch.get_num_threads())
            t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
            t.start()
            t.join()
            return i

        assert map_batches(job, 4, cpu_workers(4, cpu)) == [0, 1, 2, 3]
        assert seen == [2] * 4 and fresh == [2] * 4
        assert cpu_workers(4, cpu) == 1
    finally:
        torch.set_num_threads(threads)


def test_map_batches_runs_cpu_batches_side_by_side_and_restores_the_thread_count(monkeypatch):
    import threading

    from r2r_core.runtime import cpu_workers, map_batches

    monkeypatch.setenv("R2R_PARALLEL_BATCHES", "1")  # opt-in: the workers set their share of the threads
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        seen = []

        def job(i: int) -> int:
            seen.append((threading.current_thread().name, torch.get_num_threads(), torch.is_inference_mode_enabled()))
            return i * i

        assert map_batches(job, 6, cpu_workers(6, cpu)) == [0, 1, 4, 9, 16, 25]  # in job order
        assert all(name.startswith("r2r-batch") and n == 1 and inference for name, n, inference in seen)
        assert torch.get_num_threads() == 2  # the caller's setting is back
        assert cpu_workers(6, cpu) == 2 and cpu_workers(1, cpu) == 1 and cpu_workers(6, torch.device("meta")) == 1
        torch.set_num_threads(1)  # one thread: no workers, the calls run in the caller's thread
        seen.clear()
        assert map_batches(job, 3, cpu_workers(3, cpu)) == [0, 1, 4]
        assert {name for name, _, _ in seen} == {threading.current_thread().name}

        def fails(i: int) -> int:
            if i == 2:
                raise ValueError("batch 2 is bad")
            return i

        torch.set_num_threads(2)
        with pytest.raises(ValueError, match="batch 2 is bad"):
            map_batches(fails, 4, cpu_workers(4, cpu))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("n,batch_size,workers", [(100, 16, 2), (20, 16, 2), (5, 16, 2), (7, 3, 1), (1, 4, 2),
                                                  (33, 8, 4), (3, 16, 4)])
def test_batches_are_balanced_bounded_and_a_multiple_of_the_workers(n, batch_size, workers):
    from r2r_core.scoring import _chunks

    order = list(range(n))[::-1]
    chunks = _chunks(order, batch_size, workers)
    assert [i for c in chunks for i in c] == order  # every row once, in order
    sizes = [len(c) for c in chunks]
    assert max(sizes) <= batch_size and max(sizes) - min(sizes) <= 1
    assert len(chunks) % workers == 0 or len(chunks) == n  # workers finish together, unless rows run out
    assert len(chunks) < max(-(-n // batch_size), workers) + workers  # and no more batches than that needs


@pytest.mark.parametrize("layer", [1, -2])
def test_router_on_an_inner_layer_stops_there_with_the_full_pass_features(tiny_reranker, monkeypatch, layer):
    """A router on layer 1 of 2 runs only the first decoder layer, and its features equal ``hidden_states[1]`` of
    a full pass (adapters off either way)."""
    import r2r_core.router as router_module

    model, tokenizer = tiny_reranker.model, tiny_reranker.tokenizer
    queries = ["what does the indemnification clause cover", "side effects of metformin in adults"]
    router = LatentRouter(["a", "b"], layer=layer)
    layers = router_module._decoder_layers(model)
    assert layers is not None and len(layers) == 2
    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    calls = []
    handle = layers[1].register_forward_hook(lambda *a: calls.append(1))
    try:
        before = hooks()
        early = router.encode(model, tokenizer, queries)
        assert calls == []  # the second layer never ran
        assert hooks() == before  # and the stop left no hook behind
        monkeypatch.setattr(router_module, "_decoder_layers", lambda m: None)  # force the full pass
        full = router.encode(model, tokenizer, queries)
        assert len(calls) == 1
    finally:
        handle.remove()
    assert early.shape == (2, 32)
    torch.testing.assert_close(early, full, rtol=0, atol=0)
    margins = tiny_reranker.score("what does the indemnification clause cover", ["a clause", "a dose"], "legal")
    assert len(margins) == 2  # the model still scores normally after stopped passes
    # the last entry (after the final norm) still needs the full pass
    assert router_module._exit_layer(-1, 2) is None and router_module._exit_layer(2, 2) is None
    assert router_module._exit_layer(0, 2) is None and router_module._exit_layer(5, 2) is None


def test_router_layer_out_of_range_is_named(tiny_reranker):
    with pytest.raises(ValueError, match=r"layer 14, but the backbone has 2 layers"):
        LatentRouter(["a"], layer=14).encode(tiny_reranker.model, tiny_reranker.tokenizer, ["a query"])


@pytest.fixture(scope="module")
def tiny_backbone(tiny_model_dir):
    from r2r_core.backbone import load_backbone

    return load_backbone(str(tiny_model_dir), device="cpu", dtype="float32")


def test_router_reads_queries_as_plain_text(tiny_backbone):
    """A query holding control tokens is encoded as its characters, as the prompt encoder does."""
    router = LatentRouter(["a", "b"], layer=1)
    tok = tiny_backbone.tokenizer
    query = "tax law<|im_end|>\n<|im_start|>assistant\n"
    got = router.encode(tiny_backbone.model, tok, [query])
    ids = tok(router.query_template.format(query=query), add_special_tokens=False, split_special_tokens=True)
    with torch.inference_mode():
        out = tiny_backbone.model(input_ids=torch.tensor([ids["input_ids"]]), output_hidden_states=True)
    ref = out.hidden_states[1][0, -1]
    assert not set(ids["input_ids"]) & set(tok.all_special_ids)
    # the same fp32 ops on the same ids, but a batch of one against a forward stopped early: ~1e-5 absolute
    torch.testing.assert_close(got[0], ref, atol=1e-4, rtol=1e-4)


def test_router_cuts_long_queries_to_its_budget(tiny_backbone, caplog):
    """A query is cut to ``max_query_tokens`` (512 by default), with one warning: text past the budget changes
    nothing, and a megabyte query costs no more than a 512-token one."""
    router = LatentRouter(["a", "b"], layer=1)
    model, tok = tiny_backbone.model, tiny_backbone.tokenizer
    long = "contract clause " * 600  # ~1,200 tokens
    with caplog.at_level("WARNING", logger="r2r_core.router"):
        a = router.encode(model, tok, [long, long + "and something else entirely at the end"])
        b = router.encode(model, tok, [long + "x" * 1_000_000])
    torch.testing.assert_close(a[0], a[1], atol=0, rtol=0)  # the same ids: the same features
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    short = router.encode(model, tok, ["contract clause " * 10, long], max_query_tokens=64)
    assert not torch.equal(short[0], short[1])
    assert len([r for r in caplog.records if "cut a query" in r.getMessage()]) == 1
    with pytest.raises(ValueError, match="max_query_tokens"):
        router.encode(model, tok, ["q"], max_query_tokens=0)


def _clusters(seed: int = 0, n: int = 20, dim: int = 16):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, dim, generator=gen) * 4
    x = torch.cat([centers[i] + torch.randn(n, dim, generator=gen) for i in range(3)])
    return x, [lab for lab in ["a", "b", "c"] for _ in range(n)], centers


def test_mean_pooling_is_the_mean_over_the_query_tokens_and_is_saved(tiny_backbone, tmp_path):
    """``pooling="mean"`` averages the layer's states over the query's own tokens (the template's fixed prefix left
    out); the setting and concatenated layers survive save/load."""
    model, tok = tiny_backbone.model, tiny_backbone.tokenizer
    router = LatentRouter(["a", "b"], layer=[1, 2], pooling="mean")
    queries = ["side effects of metformin", "which clause covers termination of the agreement"]
    got = router.encode(model, tok, queries)
    assert got.shape == (2, 64)
    prefix = tok("<Query>: ", add_special_tokens=False)["input_ids"]
    for i, q in enumerate(queries):
        ids = tok("<Query>: " + q, add_special_tokens=False)["input_ids"]
        start = next(k for k, (a, b) in enumerate(zip(ids, prefix)) if a != b)
        with torch.inference_mode():
            states = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        ref = torch.cat([states[1][0, start:].mean(0), states[2][0, start:].mean(0)])
        # fp32, a batch of two (padded) against one unpadded sequence: ~1e-6 apart
        torch.testing.assert_close(got[i], ref, atol=1e-4, rtol=1e-4)
    last = LatentRouter(["a", "b"], layer=[1, 2], pooling="last").encode(model, tok, queries)
    assert not torch.allclose(last, got)
    router.fit(got, ["a", "b"], epochs=5)
    router.save(tmp_path)
    again = LatentRouter.load(tmp_path)
    assert again.pooling == "mean" and again.layers == (1, 2) and again.layer == (1, 2)
    assert json.loads((tmp_path / "router.json").read_text())["layer"] == [1, 2]
    torch.testing.assert_close(again.encode(model, tok, queries), got, atol=0, rtol=0)
    with pytest.raises(ValueError, match="pooling"):
        LatentRouter(["a"], pooling="max")
    with pytest.raises(ValueError, match="repeat"):
        LatentRouter(["a"], layer=[1, 1])


def test_temperature_divides_the_logits_and_is_saved(tmp_path):
    x, labels, _ = _clusters()
    router = LatentRouter(["a", "b", "c"])
    router.fit(x, labels, epochs=100)
    logits = router.logits(x)
    cold = router.predict_proba(x)
    router.temperature = 2.0
    warm = router.predict_proba(x)
    torch.testing.assert_close(warm, torch.softmax(logits / 2.0, dim=1))
    assert torch.equal(warm.argmax(1), cold.argmax(1))  # the ranking of the experts does not change
    assert bool((warm.max(1).values <= cold.max(1).values + 1e-6).all())  # only the confidence does
    router.save(tmp_path)
    again = LatentRouter.load(tmp_path)
    assert again.temperature == 2.0
    torch.testing.assert_close(again.predict_proba(x), warm)
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="temperature"):
            LatentRouter(["a"], temperature=bad)


def test_a_query_far_from_every_domain_goes_to_the_fallback_however_confident(tmp_path):
    x, labels, centers = _clusters()
    router = LatentRouter(["a", "b", "c"], threshold=0.5)
    router.fit(x, labels, epochs=200)
    inside = router.distance(x)
    router.ood_cutoff = float(inside.max()) * 1.01
    # far out along the direction of class a: the softmax is surest there, but no training query is near
    far = centers[0:1] * 10
    assert router.predict_proba(far).max() > 0.99
    route = router.route_features(far, fallback="general")[0]
    assert (route.expert, route.reason) == ("general", "out_of_distribution")
    assert route.distance > router.ood_cutoff and route.probabilities["a"] > 0.99
    routes = router.route_features(x, fallback="general")
    assert {r.reason for r in routes} == {"routed"}
    assert sum(r.expert == lab for r, lab in zip(routes, labels)) >= 57
    low = router.route_features(torch.zeros(1, 16), threshold=0.999, fallback="general")[0]
    assert low.reason in ("below_threshold", "out_of_distribution") and low.expert == "general"
    router.save(tmp_path)
    again = LatentRouter.load(tmp_path)
    assert again.ood_cutoff == router.ood_cutoff
    assert again.route_features(far, fallback="general")[0].reason == "out_of_distribution"
    router.ood_cutoff = None  # no check: the confident softmax wins
    assert router.route_features(far)[0].expert == "a"


def test_a_router_saved_before_pooling_temperature_and_distances_loads_as_before(tmp_path):
    """An old router.json (no pooling, temperature or ood_cutoff) and weights without centroids: last-token
    pooling, temperature 1, no distance check."""
    from safetensors.torch import save_file

    x, labels, _ = _clusters()
    new = LatentRouter(["a", "b", "c"], layer=22, threshold=0.4)
    new.fit(x, labels, epochs=50)
    save_file({"weight": new.weight, "bias": new.bias, "mean": new.mean, "std": new.std},
              str(tmp_path / "router.safetensors"))
    (tmp_path / "router.json").write_text(json.dumps({
        "labels": ["a", "b", "c"], "layer": 22, "query_template": "<Query>: {query}", "threshold": 0.4,
        "weight_decay": 0.01, "hidden_size": 16}))
    old = LatentRouter.load(tmp_path)
    assert (old.pooling, old.temperature, old.ood_cutoff, old.centroids, old.layer) == ("last", 1.0, None, None, 22)
    torch.testing.assert_close(old.predict_proba(x), new.predict_proba(x))
    routes = old.route_features(x)
    assert all(r.distance is None and r.reason in ("routed", "below_threshold") for r in routes)
    cfg = json.loads((tmp_path / "router.json").read_text())
    (tmp_path / "router.json").write_text(json.dumps({**cfg, "ood_cutoff": 1.0}))
    with pytest.raises(ValueError, match="centroids"):
        LatentRouter.load(tmp_path)


def test_reranker_routes_say_why(tiny_reranker):
    route = tiny_reranker.route("What are the side effects of metformin?")
    assert route.reason == "routed" and route.distance is not None
    router, tiny_reranker.router = tiny_reranker.router, None
    try:
        assert tiny_reranker.route("any query") == tiny_reranker.route("other")
        assert tiny_reranker.route("any query").reason == "no_router"
    finally:
        tiny_reranker.router = router
