"""``MicroBatcher``: concurrent rerank requests coalesced into one ``rerank_batch`` call.

Requests that arrive while a batch is running, or within ``max_wait_s`` of a lone request, are scored
together by :meth:`R2RReranker.rerank_batch_with_routes`, where candidates of queries routed to different
experts share forward passes. Routes and scores equal those of the request alone up to the dtype's rounding
of differently shaped batches (fp32: ~1e-6; bf16: up to ~1e-2, which can swap near-ties);
``max_queries=1`` turns coalescing off. One batch runs at a time, in a worker thread, so the event loop
keeps accepting requests meanwhile.

Contract of :meth:`MicroBatcher.rerank`: ``(route, results)`` exactly as :meth:`R2RReranker.rerank_with_route`
with ``top_n=None`` (every document, best first; ``route`` is None when ``expert`` fixed the expert). When a
batch fails, its requests are run again one by one, so only the request at fault gets the error. A request
whose caller went away is dropped before its batch runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from r2r_core.reranker import R2RReranker, RerankResult
from r2r_core.router import Route

logger = logging.getLogger(__name__)

__all__ = ["MicroBatcher"]


@dataclass
class _Job:
    query: str
    documents: list[str]
    expert: str | None
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """Coalesce concurrent requests into ``rerank_batch`` calls on one engine (see the module docstring).

    ``max_queries`` and ``max_documents`` bound one batch (a single larger request still runs, alone);
    ``max_wait_s`` is how long a request that finds nothing else queued waits for company.
    """

    def __init__(self, engine: R2RReranker, *, max_queries: int = 32, max_documents: int = 1024,
                 max_wait_s: float = 0.002):
        if max_queries < 1 or max_documents < 1 or max_wait_s < 0:
            raise ValueError(f"need max_queries >= 1, max_documents >= 1, max_wait_s >= 0; got {max_queries}, "
                             f"{max_documents}, {max_wait_s}")
        self.engine = engine
        self.max_queries = max_queries
        self.max_documents = max_documents
        self.max_wait_s = max_wait_s
        self.batches = 0  #: rerank_batch calls made so far
        self.requests = 0  #: requests scored so far
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: deque[_Job] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def rerank(self, query: str, documents: Sequence[str], expert: str | None = None
                     ) -> tuple[Route | None, list[RerankResult]]:
        """Score ``documents`` for ``query`` in the next batch; see the module docstring."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # started lazily, in the loop that serves the requests
            self._loop, self._pending, self._wakeup = loop, deque(), asyncio.Event()
            self._worker = loop.create_task(self._run(), name="r2r-micro-batcher")
        job = _Job(query, list(documents), expert, loop.create_future())
        self._pending.append(job)
        self._wakeup.set()
        return await job.future

    async def close(self) -> None:
        """Stop the worker; requests still queued fail with CancelledError."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.cancel()
        self._loop = self._wakeup = self._worker = None

    async def _collect(self) -> list[_Job]:
        """The next batch: what is queued (after ``max_wait_s`` if only one request is), within the bounds."""
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        if len(self._pending) == 1 and self.max_wait_s > 0:
            await asyncio.sleep(self.max_wait_s)
        batch = [self._pending.popleft()]
        docs = len(batch[0].documents)
        while self._pending and len(batch) < self.max_queries:
            if docs + len(self._pending[0].documents) > self.max_documents:
                break
            batch.append(self._pending.popleft())
            docs += len(batch[-1].documents)
        return batch

    async def _run(self) -> None:
        while True:
            batch = [job for job in await self._collect() if not job.future.done()]
            if not batch:
                continue
            try:
                outcome = await asyncio.to_thread(self._score, batch)
            except Exception:  # run them alone, so one bad request cannot fail the others
                if len(batch) > 1:
                    logger.warning("a batch of %d requests failed; running them one by one", len(batch))
                for job in batch:
                    try:
                        [single] = await asyncio.to_thread(self._score, [job])
                    except Exception as exc:
                        if not job.future.done():
                            job.future.set_exception(exc)
                        continue
                    if not job.future.done():
                        job.future.set_result(single)
                continue
            for job, single in zip(batch, outcome):
                if not job.future.done():
                    job.future.set_result(single)

    def _score(self, batch: list[_Job]) -> list[tuple[Route | None, list[RerankResult]]]:
        experts = [job.expert for job in batch]
        routes, results = self.engine.rerank_batch_with_routes(
            [job.query for job in batch], [job.documents for job in batch],
            experts=experts if any(e is not None for e in experts) else None,
        )
        self.batches += 1
        self.requests += len(batch)
        return list(zip(routes, results))
