"""Measurement helpers shared by the benchmarks: RSS sampling, timing (one call, interleaved rounds, calls in a
given order, paired differences), the machine's matmul peak, a FLOP model of a Llama-style decoder and a rank
correlation. Run the benchmarks as scripts, e.g. ``python benchmarks/speed.py``."""

from __future__ import annotations

import gc
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch

__all__ = ["FlopModel", "PeakRss", "interleaved_times", "matmul_peak", "one_thread", "paired_difference",
           "peak_shapes", "rss_mb", "spearman", "timed", "timed_calls"]

T = TypeVar("T")


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark of this process (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


class PeakRss:
    """Peak RSS of this process while the block runs (MiB). On Linux the kernel's high-water mark is reset on
    entry and read on exit, so nothing competes with torch's threads for the cores while it is timed; elsewhere
    a thread samples the RSS every few milliseconds (torch releases the GIL)."""

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb())

    def __enter__(self) -> PeakRss:
        self.start = self.peak = rss_mb()
        self._kernel = _reset_peak_rss()
        if not self._kernel:
            self._stop, self._thread = threading.Event(), threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._kernel:
            self.peak = max(self.peak, _peak_rss_mb())
        else:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, rss_mb())


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """Wall seconds of ``fn()`` (garbage collected first, outside the timing) and its result."""
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def interleaved_times(fns: dict[str, Callable[[], T]], reps: int, warm_up: bool = True,
                      log: Callable[[str, int, float], None] | None = None, alternate: bool = False
                      ) -> tuple[dict[str, list[float]], dict[str, T]]:
    """Seconds of each callable over ``reps`` rounds that run every callable once, in order (after one warm-up
    round unless ``warm_up=False``), so that drift in the machine's load affects all of them alike; and each
    callable's last result. ``alternate`` reverses the order every other round (A B, B A, ...), so that neither
    side always runs first. ``log(name, rep, seconds)`` is called after every run."""
    if warm_up:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, T] = {}
    for rep in range(reps):
        order = list(fns.items())
        for name, fn in (order[::-1] if alternate and rep % 2 else order):
            t, results[name] = timed(fn)
            times[name].append(t)
            if log is not None:
                log(name, rep, t)
    return times, results


def timed_calls(fn: Callable[[T], object], args: Sequence[T], warm_up: Sequence[T] = ()
                ) -> tuple[list[float], list[float]]:
    """Wall and calling-thread CPU seconds of ``fn(a)`` for each ``a`` of ``args``, in order (after ``fn(a)`` for
    each ``a`` of ``warm_up``). Thread CPU time leaves out the time the core was taken away from the thread."""
    for a in warm_up:
        fn(a)
    wall, cpu = [], []
    for a in args:
        w0, c0 = time.perf_counter(), time.thread_time()
        fn(a)
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    return wall, cpu


def paired_difference(times: Sequence[float]) -> tuple[float, float]:
    """For times taken in pairs (measured, control, measured, control, ...), the median over pairs of measured
    minus control and the standard error of that median (robust, from the MAD). The first pair is left out (it
    follows no control). Paired, so drift in machine load cancels."""
    diffs = [a - b for a, b in zip(times[2::2], times[3::2])]
    med = statistics.median(diffs)
    return med, 1.4826 * 1.2533 * statistics.median(abs(d - med) for d in diffs) / len(diffs) ** 0.5


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch runs on one thread inside the block (every op in the calling thread); the caller's count after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def peak_shapes(config, tokens: int) -> list[tuple[int, int, int]]:
    """The ``(m, k, n)`` shapes :func:`matmul_peak` tries: a 2048³ square and the model's own linear layers at
    ``tokens`` tokens."""
    hidden, inner = config.hidden_size, config.intermediate_size
    return [(2048, 2048, 2048), (tokens, hidden, inner), (tokens, inner, hidden), (tokens, hidden, hidden)]


def _matmul_backends(a: torch.Tensor, b: torch.Tensor) -> dict:
    """The CPU's matmul kernels for ``a @ b``: PyTorch's (MKL for fp32 in the official wheels, oneDNN for bf16)
    and oneDNN's linear op where PyTorch has it (:mod:`benchmarks.onednn_linear`, which can beat MKL in fp32)."""
    from benchmarks.onednn_linear import has_onednn_linear, onednn_linear

    backends = {"aten": lambda: a @ b}
    if has_onednn_linear():
        w = b.t().contiguous()
        backends["onednn"] = lambda: onednn_linear(a, w)
    return backends


def matmul_peak(dtype: torch.dtype, shapes: list[tuple[int, int, int]], reps: int) -> dict:
    """The machine's matmul peak in GFLOP/s: the best rate of ``reps`` runs of each ``(m, k, n)`` matmul, over all
    shapes (a square one and the model's own linear layers, which can run faster than a square matmul) and both
    kernels (:func:`_matmul_backends`)."""
    per_shape = {}
    with torch.inference_mode():
        for m, k, n in shapes:
            a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
            for backend, fn in _matmul_backends(a, b).items():
                fn()
                rates = [2 * m * k * n / timed(fn)[0] / 1e9 for _ in range(reps)]
                per_shape[f"{m}x{k}x{n} {backend}"] = {"best": max(rates), "median": statistics.median(rates)}
    best = max(per_shape, key=lambda s: per_shape[s]["best"])
    return {"gflops_peak": per_shape[best]["best"], "shape": best, "shapes": per_shape}


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation, ties given their average rank."""
    def rank(x):
        t = torch.tensor(x, dtype=torch.float64)
        _, inv = torch.unique(t, return_inverse=True)
        r = t.argsort().argsort().double()
        r = torch.zeros(int(inv.max()) + 1, dtype=torch.float64).index_add_(0, inv, r) / torch.bincount(inv)
        return r[inv] - r[inv].mean()

    ra, rb = rank(a), rank(b)
    norm = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / norm if norm else 1.0


@dataclass
class FlopModel:
    """FLOPs of a Llama-style decoder: ``2 N`` per token plus ``4 L d_attn`` per attended (token, key) pair."""

    non_embedding_params: int
    layers: int
    d_attn: int
    vocab_x_hidden: int

    @classmethod
    def from_model(cls, model) -> FlopModel:
        cfg = model.config
        n = sum(p.numel() for name, p in model.named_parameters()
                if "embed_tokens" not in name and "lm_head" not in name and "lora_" not in name)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(n, cfg.num_hidden_layers, cfg.num_attention_heads * head_dim, cfg.vocab_size * cfg.hidden_size)

    def useful(self, prefix_len: int, tail_lens: list[int]) -> float:
        tokens = prefix_len + sum(tail_lens)
        pairs = prefix_len * (prefix_len + 1) / 2 + sum(t * prefix_len + t * (t + 1) / 2 for t in tail_lens)
        return 2 * self.non_embedding_params * tokens + 4 * self.layers * self.d_attn * pairs

    def executed_reference(self, rows: int, width: int) -> float:
        """A padded batch with the full LM head at every position (the reference's work)."""
        per_token = 2 * (self.non_embedding_params + self.vocab_x_hidden)
        return rows * width * per_token + 4 * self.layers * self.d_attn * rows * width * (width + 1) / 2
