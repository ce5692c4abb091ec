"""Load test (issue #17): 32 concurrent async rerank requests of mixed domains, against one caller.

One command, from a clean clone (after the README's set-up, with the ``[serve]`` extra for ``--modes server``)::

    python benchmarks/load_test.py --requests 32 --docs 8 --out load_test.json

Modes (``--modes``, comma-separated):

* ``arerank``: :meth:`R2RReranker.arerank`, first one caller awaiting each request in turn, then all requests
  at once with ``asyncio.gather`` (each runs in a worker thread; the engine serialises forward passes).
* ``server``: ``r2r serve``'s app under uvicorn in a background thread on a free local port, called over HTTP
  with httpx (``POST /v2/rerank``): one caller in turn, then all requests at once; concurrent requests are
  coalesced into ``rerank_batch`` calls by the server's micro-batcher.

Per run it reports throughput (requests/s and documents/s over the wall time of the whole run), latency per
request (p50, p95 by nearest rank, max; for concurrent runs measured from the moment all were sent), and
whether the concurrent results equal the one-caller ones (same ranking; the largest score difference, which
is float rounding of batched kernels). Nothing is lost or reordered silently: a request that fails or a
ranking that differs is counted and printed.

The workload is built here (hand-written passages of the three domains, no project data): request ``i`` has
query ``i`` of a list cycling through the domains and ``--docs`` passages drawn with ``--seed`` from all of
them, so every batch mixes experts. Timings depend on what else runs on the machine: run nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import socket
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runs from a clean clone without an installed package too
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUERIES = {
    "medical": [
        "What are the side effects of metformin?",
        "How is high blood pressure treated?",
        "When should adults get a flu vaccine?",
        "What helps with a migraine attack?",
    ],
    "legal": [
        "How much notice is needed to terminate the agreement?",
        "Which law governs this contract?",
        "Is liability under the agreement capped?",
        "Can the website share my personal data with third parties?",
    ],
    "financial": [
        "What was the total revenue in fiscal 2019?",
        "How much was the quarterly dividend per share?",
        "How did long-term debt change during the year?",
        "Why did the gross margin improve?",
    ],
}

PASSAGES = [
    "Metformin is a first-line medicine for type 2 diabetes; common side effects are nausea, diarrhoea and "
    "stomach pain, and rarely it causes lactic acidosis in patients with kidney impairment.",
    "High blood pressure is treated with lifestyle changes such as less salt and more exercise, and with "
    "medicines such as ACE inhibitors, calcium channel blockers or thiazide diuretics.",
    "Influenza vaccination is recommended every autumn for adults over 65, pregnant women and people with "
    "chronic heart or lung disease.",
    "Migraine attacks cause a throbbing headache on one side, often with nausea and sensitivity to light; "
    "triptans can stop an attack if taken early.",
    "Asthma inhalers: a reliever inhaler opens the airways within minutes, a preventer inhaler reduces airway "
    "inflammation when used every day.",
    "Either party may terminate this Agreement for convenience upon ninety (90) days prior written notice to "
    "the other party.",
    "This Agreement shall be governed by and construed in accordance with the laws of the State of Delaware, "
    "without regard to its conflict of laws principles.",
    "In no event shall either party's aggregate liability arising out of this Agreement exceed the fees paid in "
    "the twelve months preceding the claim.",
    "We may share your personal information with service providers who process data on our behalf, and with "
    "authorities where the law requires it.",
    "We use cookies to remember your preferences; you can disable cookies in your browser settings, but some "
    "features may stop working.",
    "Total revenue for fiscal 2019 was $4.2 billion, up 12% from $3.75 billion in fiscal 2018, driven by growth "
    "in subscription services.",
    "The Board declared a quarterly cash dividend of $0.25 per share, payable on March 15 to shareholders of "
    "record on February 28.",
    "Long-term debt decreased to $1.1 billion at year end after the company repaid its 2020 senior notes with "
    "cash from operations.",
    "Gross margin improved to 41.3% from 39.8%, mainly because of lower component costs and a favourable "
    "product mix.",
    "Operating expenses rose 8% year over year, reflecting higher research and development headcount.",
]


def workload(n_requests: int, n_docs: int, seed: int) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    queries = [q for group in zip(*QUERIES.values()) for q in group]  # medical, legal, financial, medical, ...
    return [(queries[i % len(queries)], rng.sample(PASSAGES, min(n_docs, len(PASSAGES)))) for i in range(n_requests)]


def summarize(latencies: list[float], wall: float, n_docs: int) -> dict:
    ordered = sorted(latencies)
    p95 = ordered[math.ceil(0.95 * len(ordered)) - 1]  # nearest rank
    return {"requests": len(latencies), "wall_s": round(wall, 3),
            "requests_per_s": round(len(latencies) / wall, 3), "docs_per_s": round(n_docs / wall, 2),
            "p50_ms": round(1000 * ordered[len(ordered) // 2], 1), "p95_ms": round(1000 * p95, 1),
            "max_ms": round(1000 * ordered[-1], 1)}


def compare(reference: list[list[tuple[int, float]]], got: list[list[tuple[int, float]]]) -> dict:
    differ = sum([i for i, _ in a] != [i for i, _ in b] for a, b in zip(reference, got))
    diff = max((abs(x - y) for a, b in zip(reference, got) for (_, x), (_, y) in zip(a, b)), default=0.0)
    return {"rankings_differing": differ, "max_abs_score_diff": float(f"{diff:.2e}")}


# --------------------------------------------------------------------------- arerank


async def sequential(one, work) -> tuple[list, list, float]:
    """One warm-up call (not timed), then ``work`` one request at a time: (latencies, results, wall seconds)."""
    await one(*work[0], time.perf_counter())
    latencies, results = [], []
    t0 = time.perf_counter()
    for query, docs in work:
        lat, res = await one(query, docs, time.perf_counter())
        latencies.append(lat)
        results.append(res)
    return latencies, results, time.perf_counter() - t0


async def arerank_runs(engine, work) -> tuple[dict, dict, list, list]:
    async def one(query, docs, t0):
        results = await engine.arerank(query, docs)
        return time.perf_counter() - t0, [(r.index, r.score) for r in results]

    seq_lat, seq_res, seq_wall = await sequential(one, work)
    t0 = time.perf_counter()
    out = await asyncio.gather(*(one(q, d, t0) for q, d in work))
    con_wall = time.perf_counter() - t0
    n_docs = sum(len(d) for _, d in work)
    return (summarize(seq_lat, seq_wall, n_docs), summarize([lat for lat, _ in out], con_wall, n_docs),
            seq_res, [res for _, res in out])


# --------------------------------------------------------------------------- server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def server_runs(url: str, work) -> tuple[dict, dict, list, list, dict]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(query, docs, t0):
            r = await client.post("/v2/rerank", json={"model": "r2r", "query": query, "documents": docs})
            r.raise_for_status()
            return time.perf_counter() - t0, [(x["index"], x["relevance_score"]) for x in r.json()["results"]]

        seq_lat, seq_res, seq_wall = await sequential(one, work)
        before = (await client.get("/info")).json()["stats"]
        t0 = time.perf_counter()
        out = await asyncio.gather(*(one(q, d, t0) for q, d in work))
        con_wall = time.perf_counter() - t0
        after = (await client.get("/info")).json()["stats"]
    n_docs = sum(len(d) for _, d in work)
    batches = {"requests": after["requests"] - before["requests"], "batches": after["batches"] - before["batches"]}
    return (summarize(seq_lat, seq_wall, n_docs), summarize([lat for lat, _ in out], con_wall, n_docs),
            seq_res, [res for _, res in out], batches)


def start_server(engine):
    import uvicorn

    from r2r_core.serve import create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the benchmark's uvicorn server did not start")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="default")
    parser.add_argument("--requests", type=int, default=32, help="requests sent at once (and one by one)")
    parser.add_argument("--docs", type=int, default=8, help="documents per request")
    parser.add_argument("--modes", default="arerank,server")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - {"arerank", "server"})
    if unknown or args.requests < 1 or args.docs < 1:
        parser.error(f"--modes takes arerank and/or server (got {unknown or modes}); --requests and --docs >= 1")

    import torch

    from r2r_core import R2RReranker, __version__

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    engine = R2RReranker.from_pretrained(args.bundle, device=args.device, dtype=args.dtype)
    work = workload(args.requests, args.docs, args.seed)
    report = {
        "command": " ".join(["python", "benchmarks/load_test.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "r2r": __version__, "torch": torch.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch_threads": torch.get_num_threads(), "load_average_at_start": os.getloadavg(),
        "engine": repr(engine), "load_s": round(time.perf_counter() - t0, 1),
        "requests": args.requests, "docs_per_request": args.docs,
        "experts_routed": sorted({engine.route(q).expert for q, _ in work}),
    }
    print(json.dumps(report, indent=1), flush=True)
    if "arerank" in modes:
        one, many, seq, con = asyncio.run(arerank_runs(engine, work))
        report["arerank"] = {"one_caller": one, f"concurrent_{args.requests}": many, "check": compare(seq, con)}
        print(json.dumps({"arerank": report["arerank"]}, indent=1), flush=True)
    if "server" in modes:
        server, thread, url = start_server(engine)
        try:
            one, many, seq, con, batches = asyncio.run(server_runs(url, work))
        finally:
            server.should_exit = True
            thread.join(timeout=30)
        report["server"] = {"one_caller": one, f"concurrent_{args.requests}": many, "check": compare(seq, con),
                            "micro_batching": batches}
        print(json.dumps({"server": report["server"]}, indent=1), flush=True)
    report["load_average_at_end"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
