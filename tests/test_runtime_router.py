"""Device/dtype resolution and the router on its own."""

from __future__ import annotations

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


def test_allocator_tuning_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("R2R_TUNE_MALLOC", "0")
    assert tune_cpu_allocator.__wrapped__() is False


def test_tuned_allocator_reuses_activation_sized_buffers(monkeypatch):
    """After tuning, a 32 MB buffer freed and allocated again is served from memory the process kept: almost
    no page faults (glibc's default hands such blocks back to the OS: ~8,000 faults each time)."""
    import platform
    import resource

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("the tuning applies to glibc on Linux")
    monkeypatch.delenv("R2R_TUNE_MALLOC", raising=False)
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


def test_map_batches_runs_cpu_batches_side_by_side_and_restores_the_thread_count():
    import threading

    from r2r_core.runtime import cpu_workers, map_batches

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
