"""Speed of two checkouts of r2r on the same inputs, measured in one run with their calls alternating.

For a no-regression check of a change: check the old commit out beside the tree (``git worktree add --detach
/tmp/r2r-old <commit>``), then::

    python benchmarks/compare_versions.py --old /tmp/r2r-old --new . --out /tmp/compare.json

Each checkout runs in a worker process of its own (its ``r2r_core`` first on ``sys.path``) that loads the same
bundle once; the driver then asks them in turn, old, new, new, old, old, new, ..., to rerank one query's documents (the
speed benchmark's equal-length random-word documents), so drift in the machine's load hits both alike. Only one
worker runs at a time. Reported, in wall time and in the workers' process CPU time (which leaves out the time
the machine's cores were taken away by other processes): each side's median seconds, the ratio of the medians
(new / old) and the median of the per-round ratios; and the largest difference between the two sides' margins.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(root: str, bundle: str, dtype: str, threads: int) -> int:
    """Serve rerank requests (one JSON line each on stdin: query, documents) with ``root``'s r2r_core."""
    sys.path.insert(0, root)
    import time

    import torch

    torch.set_num_threads(threads)
    import r2r_core
    from r2r_core import R2RReranker

    rr = R2RReranker.from_pretrained(bundle, device="cpu", dtype=dtype)
    print(json.dumps({"ready": r2r_core.__file__}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        c0 = time.process_time()
        results = rr.rerank(request["query"], request["documents"])
        cpu = time.process_time() - c0
        margins = [0.0] * len(results)
        for r in results:
            margins[r.index] = r.margin
        print(json.dumps({"margins": margins, "expert": results[0].expert, "cpu_s": cpu}), flush=True)
    return 0


class Worker:
    def __init__(self, root: Path, args):
        env = {k: v for k, v in os.environ.items() if not k.startswith("R2R_") or k in ("R2R_CACHE", "R2R_DATA")}
        env.update(OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
        self.root = root.resolve()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(self.root), "--bundle", str(args.bundle), "--dtype",
             args.dtype, "--threads", str(args.threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=str(self.root))
        ready = json.loads(self.proc.stdout.readline())
        if not Path(ready["ready"]).resolve().is_relative_to(self.root):
            raise RuntimeError(f"the worker for {self.root} imported r2r_core from {ready['ready']}")

    def rerank(self, query: str, documents: list[str]) -> dict:
        self.proc.stdin.write(json.dumps({"query": query, "documents": documents}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def revision(root: Path) -> str:
    out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + (" + uncommitted changes" if dirty else "")


def documents(bundle: Path, n: int) -> tuple[str, list[str]]:
    """The speed benchmark's query and ``n`` documents of its equal-length kind, for ``bundle``'s tokenizer."""
    sys.path.insert(0, str(REPO))
    from transformers import AutoTokenizer

    from benchmarks.speed_workloads import DOC_TOKENS, QUERY, equal_docs, word_pool
    from r2r_core.backbone import DEFAULT_BASE, offline_default_checkpoint
    from r2r_core.bundle import read_bundle
    from r2r_core.templates import PromptTemplate

    config = read_bundle(bundle)
    base = config.base_model
    tokenizer = AutoTokenizer.from_pretrained(str(offline_default_checkpoint()) if base == DEFAULT_BASE else base)
    sep = PromptTemplate.from_dict(config.template).doc_sep
    return QUERY, equal_docs(tokenizer, sep, word_pool(tokenizer, sep), n, DOC_TOKENS, seed=0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", type=Path, help="the checkout to compare against")
    p.add_argument("--new", type=Path, default=REPO)
    p.add_argument("--bundle", type=Path, help="bundle both load (default: the old checkout's default bundle)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--docs", type=int, default=12, help="documents per call")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (one call of each side per round)")
    p.add_argument("--out", type=Path)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, str(args.bundle), args.dtype, args.threads)
    if args.old is None:
        p.error("--old is required")
    sys.path.insert(0, str(REPO))
    from benchmarks import interleaved_times

    args.bundle = (args.bundle or args.old / "r2r_core" / "default_bundle").resolve()
    query, docs = documents(args.bundle, args.docs)
    sides = {"old": Worker(args.old, args), "new": Worker(args.new, args)}
    cpu: dict[str, list[float]] = {k: [] for k in sides}

    def call(side: str) -> dict:
        out = sides[side].rerank(query, docs)
        cpu[side].append(out["cpu_s"])
        return out

    try:
        wall, last = interleaved_times({k: (lambda k=k: call(k)) for k in sides}, args.rounds, alternate=True)
    finally:
        for w in sides.values():
            w.close()
    result = {
        "old": revision(args.old), "new": revision(args.new), "bundle": str(args.bundle), "dtype": args.dtype,
        "threads": args.threads, "documents": len(docs), "rounds": args.rounds, "expert": last["new"]["expert"],
        "max_abs_margin_diff": max(abs(a - b) for a, b in zip(last["old"]["margins"], last["new"]["margins"])),
    }
    for clock, times in (("wall", wall), ("cpu", {k: t[1:] for k, t in cpu.items()})):  # cpu[0]: the warm-up
        med = {k: statistics.median(t) for k, t in times.items()}
        result[clock] = {"seconds": times, "median_s": med, "ratio_of_medians": med["new"] / med["old"],
                         "median_of_round_ratios": statistics.median(n / o for n, o in zip(times["new"],
                                                                                           times["old"]))}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
