"""Inference speed of r2r's engine against a straightforward decoder reranker (issue #6).

One command, from a clean clone (after the README's set-up)::

    python benchmarks/speed.py --out benchmarks/speed_results.json --markdown benchmarks/speed_table.md

``--quick`` shrinks every workload (a few documents, 2 repetitions) to check that the script works in ~3 minutes;
its numbers are not results. A full run takes about 2-2.5 hours on a quiet 2-core CPU (equal1000 is over half of
it; the log prints an estimate after each workload); ``--workloads equal20,equal100,natural100,router,switch,memory``
covers every target in about 20-30 minutes. Run nothing else meanwhile: timings are medians of interleaved
repetitions, but a loaded machine (and OpenMP threads oversubscribing its cores) still distorts them.

Systems, compared in one process on the same backbone (the offline default SmolLM2-135M), dtype, thread count
and inputs:

* ``r2r``: ``R2RReranker.rerank`` / ``rerank_batch`` (prefix KV cache, yes/no-only LM head, length-sorted
  batches run side by side on the CPU threads, per-row LoRA experts, grouped-query attention folded into the
  sequence);
* ``reference``: what Qwen3-Reranker's model card does -- the whole prompt string per pair
  (``template.render``), tokenized with left padding and truncation to ``max_length``, a full forward
  (transformers' SDPA attention, torch's linear layers) with the full-vocabulary LM head of a separately
  loaded copy of the backbone, fixed-size batches in input order,
  ``logits[:, -1, yes] - logits[:, -1, no]``. Experts: in the one-query workloads ``r2r`` routes the query
  itself (the product path) and the reference has that expert merged into its weights (peft
  ``merge_and_unload``: the fastest way to serve one domain, so the strictest baseline); in ``batch64`` the
  reference switches peft adapters with ``set_adapter`` per expert group.

The script reads top-down: experts and reference systems are set up, then each workload runs every system in
interleaved repetitions. The workloads are built in ``speed_workloads.py``, the reference in ``reference.py``, the
targets and tables in ``speed_report.py``, and the timing helpers shared by all benchmarks are in
``benchmarks/__init__.py``.

Experts come from the bundle (the shipped default has financial, legal and medical and a router); for a bare
``--backbone`` they are random rank-``--lora-rank`` adapters in a routed bundle built for the run.

Useful FLOPs count only work that must be done: ``2 * N * tokens + 4 * L * d_attn * attended_pairs``, with
``N`` the non-embedding parameters, ``tokens`` the prompt prefix once per query plus document and suffix tokens
of every candidate, and ``attended_pairs`` the causal (query token, key) pairs of those tokens. The same count
is used for both systems, so useful FLOP/s ratios equal throughput ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runs from a clean clone without an installed package too
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from benchmarks import (  # noqa: E402
    FlopModel,
    PeakRss,
    interleaved_times,
    matmul_peak,
    one_thread,
    paired_difference,
    peak_shapes,
    rss_mb,
    spearman,
    timed,
    timed_calls,
)
from benchmarks.reference import Reference  # noqa: E402
from benchmarks.speed_report import markdown, targets  # noqa: E402
from benchmarks.speed_workloads import (  # noqa: E402
    DOC_TOKENS,
    DOMAIN_QUERIES,
    EXPERTS,
    QUERY,
    SIZES,
    Workload,
    build_workloads,
    equal_docs,
    word_pool,
)
from r2r_core import BASE_ADAPTER, DEFAULT_BASE, LatentRouter, R2RReranker  # noqa: E402
from r2r_core.backbone import load_backbone, offline_default_checkpoint  # noqa: E402
from r2r_core.runtime import resolve_dtype  # noqa: E402

logger = logging.getLogger("speed")

SECTIONS = ["equal20", "equal100", "equal1000", "natural100", "batch64", "router", "switch", "memory"]


# ----------------------------------------------------------------------------------------------- adapters
def make_adapters(model_id: str, names: list[str], out_dir: Path, r: int, std: float = 0.02) -> dict[str, Path]:
    """Random, nonzero LoRA adapters (q/k/v/o, rank ``r``) on the backbone, in peft format."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    checkpoint = offline_default_checkpoint() if model_id == DEFAULT_BASE else model_id
    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    paths = {}
    for seed, name in enumerate(names, start=1):
        torch.manual_seed(seed)
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                            init_lora_weights=False)
        model = get_peft_model(base, config)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_" in pname:
                    p.normal_(0, std)
        model.save_pretrained(out_dir / name)
        base = model.unload()
        paths[name] = out_dir / name
    del base
    gc.collect()
    return paths


def bundle_path(backbone: str) -> Path | None:
    """The bundle folder ``--backbone`` names (``"default"``: the shipped one), or None for a bare causal LM."""
    from r2r_core.bundle import is_bundle
    from r2r_core.reranker import DEFAULT_BUNDLE_DIR

    path = DEFAULT_BUNDLE_DIR if backbone == "default" else Path(backbone)
    return path if is_bundle(path) else None


def base_expert_dirs(backbone: str) -> dict[str, Path]:
    from r2r_core.bundle import read_bundle

    path = bundle_path(backbone)
    return {name: path / sub for name, sub in read_bundle(path).experts.items()}


def make_routed_bundle(rr: R2RReranker, adapters: dict[str, Path], path: Path) -> Path:
    from r2r_core.bundle import write_bundle

    router = LatentRouter(EXPERTS)
    queries = [q for qs in DOMAIN_QUERIES.values() for q in qs]
    labels = [d for d, qs in DOMAIN_QUERIES.items() for _ in qs]
    router.fit(router.encode(rr.model, rr.tokenizer, queries), labels, epochs=300)
    return write_bundle(path, base_model=rr.backbone.model_id, base_fingerprint=rr.backbone.fingerprint,
                        template=rr.template, instruction=rr.instruction,
                        experts={e: adapters[e] for e in EXPERTS}, router=router)


# ----------------------------------------------------------------------------------------------- running
def r2r_margins(rr: R2RReranker, wl: Workload) -> list[list[float]]:
    if len(wl.queries) == 1 and wl.experts is None:
        results = [rr.rerank(wl.queries[0], wl.docs[0])]
    else:
        results = rr.rerank_batch(wl.queries, wl.docs, experts=wl.experts)
    out = []
    for res in results:
        row = [0.0] * len(res)
        for r in res:
            row[r.index] = r.margin
        out.append(row)
    return out


@dataclass
class System:
    kind: str  # "r2r" or "reference"
    dtype: torch.dtype
    fn: object  # Workload -> margins per query, in input order
    reference: Reference | None = None


def run_workload(wl: Workload, systems: dict[str, System], reps: int,
                 flops: FlopModel, peaks: dict) -> dict:
    """Repetitions interleaved across systems (so load drift hits all alike); median time per system."""
    useful = sum(flops.useful(p, t) for p, t in zip(wl.tokens["prefix"], wl.tokens["tails"]))
    record = {"workload": wl.name, "note": wl.note, "queries": len(wl.queries), "documents": wl.n_docs,
              "prefix_tokens_mean": statistics.mean(wl.tokens["prefix"]),
              "tail_tokens_mean": statistics.mean(x for t in wl.tokens["tails"] for x in t),
              "tail_tokens_max": max(x for t in wl.tokens["tails"] for x in t),
              "useful_gflop": useful / 1e9, "systems": {}}
    rss = {k: (0.0, 0.0) for k in systems}

    def measured(key: str, system: System):
        with PeakRss() as mem:
            out = system.fn(wl)
        rss[key] = (max(rss[key][0], mem.peak), max(rss[key][1], mem.peak - mem.start))
        return out

    for system in systems.values():  # warm-up on two documents
        system.fn(Workload(wl.name, wl.queries[:1], [wl.docs[0][:2]], wl.experts[:1] if wl.experts else None))
    times, margins = interleaved_times(
        {key: lambda key=key, system=system: measured(key, system) for key, system in systems.items()}, reps,
        warm_up=False, log=lambda key, rep, t: logger.info("%s %s rep %d/%d: %.2f s (%.1f docs/s)", wl.name, key,
                                                           rep + 1, reps, t, wl.n_docs / t))
    for key, system in systems.items():
        med = statistics.median(times[key])
        dname = str(system.dtype).replace("torch.", "")
        entry = {"system": system.kind, "dtype": dname, "times_s": times[key], "median_s": med,
                 "docs_per_s": wl.n_docs / med, "useful_gflops_per_s": useful / med / 1e9,
                 "pct_of_matmul_peak": 100 * useful / med / 1e9 / peaks[dname]["gflops_peak"],
                 "peak_rss_mb": rss[key][0], "peak_rss_above_start_mb": rss[key][1]}
        if system.reference is not None and system.reference.padded_batches:
            shapes = system.reference.padded_batches
            entry["executed_gflops_per_s"] = sum(flops.executed_reference(r, w) for r, w in shapes) / med / 1e9
            entry["padded_tokens"] = sum(r * w for r, w in shapes)
        record["systems"][key] = entry
    ref_keys = [k for k in systems if systems[k].kind == "reference"]
    for key in systems:
        if systems[key].kind != "r2r":
            continue
        for rk in ref_keys:
            a = [x for row in margins[key] for x in row]
            b = [x for row in margins[rk] for x in row]
            record["systems"][key][f"vs_{rk}"] = {
                "speedup": statistics.median(times[rk]) / statistics.median(times[key]),
                "max_abs_margin_diff": max(abs(x - y) for x, y in zip(a, b)),
                "max_abs_score_diff": max(abs(torch.sigmoid(torch.tensor(x)) - torch.sigmoid(torch.tensor(y))).item()
                                          for x, y in zip(a, b)),
                "reference_margin_std": statistics.pstdev(b) if len(b) > 1 else 0.0,
                "spearman_per_query_mean": statistics.mean(spearman(x, y) for x, y in zip(margins[key], margins[rk])),
            }
    return record


def token_fidelity(rr: R2RReranker, ref: Reference, wl: Workload) -> int:
    """Pairs whose whole-prompt tokenization (reference) differs from the engine's prefix + tail ids."""
    bad = 0
    for q, docs in zip(wl.queries, wl.docs):
        prefix, tails = rr.encoder.encode(rr.instruction, q, docs)
        texts = [ref.prompt(rr.instruction, q, d) for d in docs]
        full = ref.tokenizer(texts, add_special_tokens=False)["input_ids"]
        bad += sum(prefix + t != f for t, f in zip(tails, full))
    return bad


def router_and_switch(rr: R2RReranker, docs: list[str], reps: int, switch_calls: int) -> dict:
    """route() vs rerank() of ``docs`` (rerank routes too), and :func:`switch_cost`."""
    rr.rerank(QUERY, docs[:2])
    route_t, rerank_t = [], []
    for _ in range(reps):
        route_t.append(timed(lambda: rr.route(QUERY))[0])
        rerank_t.append(timed(lambda: rr.rerank(QUERY, docs))[0])
    return {
        "documents": len(docs), "route_ms": 1e3 * statistics.median(route_t),
        "rerank_ms": 1e3 * statistics.median(rerank_t),
        "router_overhead_pct": 100 * statistics.median(route_t) / statistics.median(rerank_t),
        "router_layer": rr.router.layer if rr.router is not None else None,
        **switch_cost(rr, docs[0], switch_calls),
        "in_model": switch_cost_layer(rr, 15 * switch_calls),
    }


def switch_pattern(calls: int) -> list[str]:
    """Experts A A B B C C A A ...: call ``2k`` switches expert, call ``2k + 1`` repeats it (the pairs of
    :func:`benchmarks.paired_difference`)."""
    return [EXPERTS[(i // 2) % 3] for i in range(calls)]


def switch_cost(rr: R2RReranker, doc: str, calls: int) -> dict:
    """The cost of changing expert between consecutive queries: calls on experts A A B B C C ... (the same query
    and one short document, on one thread), and the median over pairs of (a call that switched expert) minus
    (the next call, same expert again), with the standard error of that median; in wall time and in the calling
    thread's CPU time, which leaves out the time the VM's core was taken away (this machine's largest noise)."""
    small = " ".join(doc.split()[:12])
    pattern = switch_pattern(2 * calls)
    with one_thread():  # every op in the calling thread, so its CPU time is the call's
        wall, cpu = timed_calls(lambda expert: rr.rerank(QUERY, [small], expert=expert), pattern, pattern[:6])
    cost, noise = paired_difference(wall)
    cpu_cost, cpu_noise = paired_difference(cpu)
    return {
        "switch_call_ms": 1e3 * statistics.median(wall[2::2]), "same_call_ms": 1e3 * statistics.median(wall[3::2]),
        "switch_cost_ms": 1e3 * cost, "switch_noise_ms": 1e3 * noise, "pairs": len(wall) // 2 - 1,
        "switch_cost_cpu_ms": 1e3 * cpu_cost, "switch_noise_cpu_ms": 1e3 * cpu_noise,
    }


def switch_cost_layer(rr: R2RReranker, pairs: int) -> dict:
    """The switch cost inside the model, resolved far below a whole call's jitter: one decoder layer (its LoRA
    q/k/v/o experts folded per call, attention, MLP) run on the query's prompt prefix with experts A A B B C C
    ..., on one thread, ``2 * pairs`` times; the median paired difference (switched minus same expert again) per
    layer, and that times the layers of the two passes of a call (prefix, then documents) as the estimate for a
    call. The layer's weights stay in cache here; in a whole call every weight streams from memory whichever
    expert ran last, so a switch finds no colder data there either."""
    from r2r_core.lora_fold import thread_routing
    from r2r_core.router import _decoder

    decoder = _decoder(rr.model)
    layers = decoder.layers
    ids = rr.tokenizer(rr.template.render_prefix(rr.instruction, QUERY), add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([ids])
    position_ids = torch.arange(len(ids))[None]
    layer = layers[len(layers) // 2]
    pattern = switch_pattern(2 * pairs)
    with one_thread(), torch.inference_mode():
        hidden = decoder.embed_tokens(input_ids)
        rope = decoder.rotary_emb(hidden, position_ids)

        def run(expert: str) -> None:
            with thread_routing([expert]):
                layer(hidden, position_ids=position_ids, position_embeddings=rope)

        times, _ = timed_calls(run, pattern, pattern[:12])
    med, noise = paired_difference(times)
    return {"tokens": len(ids), "pairs": len(times) // 2 - 1, "layer_ms": 1e3 * statistics.median(times[3::2]),
            "switch_cost_layer_us": 1e6 * med, "switch_noise_layer_us": 1e6 * noise, "layers": len(layers),
            "switch_cost_call_ms": 2e3 * med * len(layers), "switch_noise_call_ms": 2e3 * noise * len(layers)}


def memory_probe(backbone: str, adapters: dict[str, Path], dtype: str) -> dict:
    """RSS of a fresh process with the reranker and 0, 3 and 10 experts (run as a subprocess)."""
    from r2r_core.bundle import read_bundle
    from r2r_core.templates import get_template

    bundle = bundle_path(backbone)
    model_id = read_bundle(bundle).base_model if bundle else backbone
    rr = R2RReranker(load_backbone(model_id, device="cpu", dtype=dtype), get_template("qwen3"))  # no experts yet
    gc.collect()
    out = {"dtype": str(rr.backbone.dtype).replace("torch.", ""), "rss_mb": {0: rss_mb()}}
    names = list(adapters)
    for i, name in enumerate(names):
        rr.add_expert(name, adapters[name])
        if i + 1 in (3, 10):
            gc.collect()
            out["rss_mb"][i + 1] = rss_mb()
    first = names[0]
    out["adapter_mb_each"] = sum(p.numel() * p.element_size() for n, p in rr.model.named_parameters()
                                 if f".{first}." in n) / 2**20
    return out


# ----------------------------------------------------------------------------------------------- main
def dtype_name(d) -> str:
    return str(resolve_dtype(d.strip() if isinstance(d, str) else d, torch.device("cpu"))).replace("torch.", "")


def parse_args(argv=None) -> argparse.Namespace:
    auto = dtype_name("auto")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="JSON results file")
    p.add_argument("--markdown", type=Path, help="markdown table file")
    p.add_argument("--quick", action="store_true", help="tiny workloads, 2 repetitions: checks the script only")
    p.add_argument("--reps", type=int, help="repetitions per measurement (default 5; quick 2)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: all)")
    p.add_argument("--dtypes", default=",".join(dict.fromkeys(["float32", auto])),
                   help=f"r2r dtypes (default: float32 and this CPU's auto dtype, {auto})")
    p.add_argument("--reference-dtypes", default="float32", help="reference dtypes (float32 always runs)")
    p.add_argument("--workloads", default=",".join(SECTIONS), help=f"subset of {','.join(SECTIONS)}")
    p.add_argument("--batch-size", type=int, default=16, help="batch size of both systems")
    p.add_argument("--batch-docs", type=int, default=SIZES["batch64"][0][1], help="documents per batch64 query")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--data-root", default=os.environ.get("R2R_DATA", "/work/shared/data"),
                   help="folder holding medical/mediqa (BEIR format) for natural100")
    p.add_argument("--backbone", default="default", help="'default' (SmolLM2-135M bundle) or a causal LM folder/id")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--work-dir", type=Path, help="where adapters and the bundle are written (default: a temp dir)")
    p.add_argument("--onednn-linears", action="store_true",
                   help="experiment: r2r's fp32 linear layers on oneDNN's private op (benchmarks/onednn_linear.py)")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.reps = args.reps or (2 if args.quick else 5)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if unknown := sorted(set(args.workloads) - set(SECTIONS)):
        p.error(f"unknown workloads {unknown}; choose from {SECTIONS}")
    args.dtypes = [dtype_name(d) for d in args.dtypes.split(",") if d.strip()]
    args.reference_dtypes = list(dict.fromkeys(["float32", *(dtype_name(d) for d in args.reference_dtypes.split(",")
                                                             if d.strip())]))
    args.default_dtype = auto
    return args


def memory_section(args, adapters: dict[str, Path]) -> dict:
    spec = json.dumps({"adapters": {k: str(v) for k, v in adapters.items()}, "dtype": args.default_dtype})
    proc = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--backbone", args.backbone,
                           "--memory-probe", spec], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-800:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_meta(args) -> dict:
    """What the results were measured with (the report's first lines)."""
    import transformers

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), cpu)
    return {"quick": args.quick, "reps": args.reps, "threads": args.threads, "dtypes": args.dtypes,
            "reference_dtypes": args.reference_dtypes, "cpu": cpu, "torch": torch.__version__,
            "transformers": transformers.__version__, "batch_size": args.batch_size, "max_length": args.max_length,
            "lora_rank": args.lora_rank, "onednn_linears": args.onednn_linears, "notes": [],
            "flops_formula": "2*N_nonemb*(prefix tokens once per query + doc and suffix tokens of every candidate) "
                             "+ 4*layers*d_attn*(causal token-key pairs of those tokens)"}


@dataclass
class Experts:
    """The experts of the run: ``dirs`` (name -> peft folder) and ``routed`` (dtype -> a reranker with those
    experts and a router; empty when no workload needs one), plus the adapters of the memory probe."""

    dirs: dict[str, Path] = field(default_factory=dict)
    routed: dict[str, R2RReranker] = field(default_factory=dict)
    memory_adapters: dict[str, Path] = field(default_factory=dict)


def experts_for(args, rrs: dict[str, R2RReranker], work: Path, load: dict) -> Experts:
    """The bundle's own experts when it has the three domains and a router (the shipped default does), else random
    adapters in a routed bundle built here (only where a workload needs experts)."""
    base_rr = rrs[args.dtypes[0]]
    out = Experts()
    if set(EXPERTS) <= set(base_rr.experts) and base_rr.router is not None:
        out.dirs, out.routed = base_expert_dirs(args.backbone), rrs
    if "memory" in args.workloads:
        out.memory_adapters = make_adapters(base_rr.backbone.model_id, EXPERTS + [f"extra{i}" for i in range(3, 10)],
                                            work / "adapters", args.lora_rank)
    if not out.routed and {"batch64", "router", "switch"} & set(args.workloads):
        adapters = out.memory_adapters or make_adapters(base_rr.backbone.model_id, EXPERTS, work / "adapters",
                                                        args.lora_rank)
        out.dirs = {e: adapters[e] for e in EXPERTS}
        bundle = make_routed_bundle(base_rr, out.dirs, work / "bundle")
        out.routed = {d: R2RReranker.from_pretrained(bundle, dtype=d, **load) for d in args.dtypes}
    return out


class References:
    """The reference systems, loaded once per (dtype, what they serve): "peft" (every expert, switched with
    ``set_adapter``), :data:`BASE_ADAPTER`, or the name of the one expert merged into its weights."""

    def __init__(self, args, base_rr: R2RReranker, expert_dirs: dict[str, Path]):
        self.args, self.base_rr, self.expert_dirs = args, base_rr, expert_dirs
        self._loaded: dict[tuple[str, str], Reference] = {}

    def get(self, dtype: str, serves: str) -> Reference:
        if (dtype, serves) not in self._loaded:
            ref = Reference(self.base_rr.backbone.model_id, getattr(torch, dtype), self.base_rr.template,
                            self.args.batch_size, self.args.max_length)
            if serves == "peft":
                ref.load_experts(self.expert_dirs)
            elif serves != BASE_ADAPTER:
                ref.merge_expert(serves, self.expert_dirs[serves])
            self._loaded[(dtype, serves)] = ref
        return self._loaded[(dtype, serves)]


def systems_for(wl: Workload, args, rrs: dict[str, R2RReranker], experts: Experts, refs: References
                ) -> tuple[dict[str, System], str | None, str]:
    """The systems that run ``wl``, the expert a one-query workload is routed to (None: fixed per query) and the
    references' key. A one-query workload takes the product path (``rerank`` routes the query); its reference has
    the routed expert merged into its weights. A batch of queries with fixed experts: peft's ``set_adapter``."""
    if wl.experts is None:
        expert = experts.routed[args.dtypes[0]].route(wl.queries[0]).expert if experts.routed else BASE_ADAPTER
        serves = expert
    else:
        expert, serves = None, "peft"
    systems = {}
    for d in args.reference_dtypes:
        ref = refs.get(d, serves)
        systems[f"reference/{d}"] = System("reference", ref.dtype, lambda w, ref=ref, e=expert: ref.margins(
            refs.base_rr.instruction, w.queries, w.docs, w.experts or [e]), ref)
    for d in args.dtypes:
        rr = experts.routed[d] if experts.routed else rrs[d]
        systems[f"r2r/{d}"] = System("r2r", getattr(torch, d), lambda w, rr=rr: r2r_margins(rr, w))
    return systems, expert, serves


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for name in ("transformers", "peft", "r2r_core"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.memory_probe:  # internal: RSS measured in a fresh process
        spec = json.loads(args.memory_probe)
        adapters = {k: Path(v) for k, v in spec["adapters"].items()}
        print(json.dumps(memory_probe(args.backbone, adapters, spec["dtype"])))
        return 0

    t_start = time.perf_counter()
    work_ctx = tempfile.TemporaryDirectory(prefix="r2r-speed-") if args.work_dir is None else None
    work = Path(work_ctx.name) if work_ctx else args.work_dir
    meta = machine_meta(args)
    results = {"meta": meta, "matmul_peak": {}, "workloads": []}
    load = dict(device="cpu", batch_size=args.batch_size, max_length=args.max_length)
    rrs = {d: R2RReranker.from_pretrained(args.backbone, dtype=d, **load) for d in args.dtypes}
    base_rr = rrs[args.dtypes[0]]
    shapes = peak_shapes(base_rr.model.config, args.batch_size * (DOC_TOKENS + 10))  # one batch of candidates
    for d in dict.fromkeys([*args.dtypes, *args.reference_dtypes]):
        results["matmul_peak"][d] = matmul_peak(getattr(torch, d), shapes, 3 if args.quick else 7)
        logger.info("matmul peak %s: %.1f GFLOP/s (%s)", d, results["matmul_peak"][d]["gflops_peak"],
                    results["matmul_peak"][d]["shape"])
    meta["backbone"] = base_rr.backbone.model_id
    flops = FlopModel.from_model(base_rr.model)
    meta["non_embedding_params"] = flops.non_embedding_params

    pool = word_pool(base_rr.tokenizer, base_rr.template.doc_sep)
    workloads = build_workloads(base_rr, args, pool)
    if "natural100" in args.workloads and "natural100" not in workloads:
        meta["notes"].append(f"natural100 skipped: no MEDIQA data under {args.data_root} (use --data-root)")
    experts = experts_for(args, rrs, work, load)
    if args.onednn_linears:  # the experiment: r2r's fp32 linear layers on oneDNN's private op
        from benchmarks.onednn_linear import use_onednn_linears

        for rr in {id(r): r for r in [*rrs.values(), *experts.routed.values()]}.values():
            use_onednn_linears(rr.model)
    refs = References(args, base_rr, experts.dirs)

    useful = {n: sum(flops.useful(p, t) for p, t in zip(w.tokens["prefix"], w.tokens["tails"])) / 1e9
              for n, w in workloads.items()}
    for done, (name, wl) in enumerate(workloads.items()):
        systems, expert, serves = systems_for(wl, args, rrs, experts, refs)
        logger.info("workload %s: %d queries, %d documents, %d reps, expert %s", name, len(wl.queries), wl.n_docs,
                    args.reps, expert or "per query")
        record = run_workload(wl, systems, args.reps, flops, results["matmul_peak"])
        record["expert"] = expert or "fixed per query"
        record["token_mismatches_vs_reference"] = token_fidelity(base_rr, refs.get("float32", serves), wl)
        results["workloads"].append(record)
        per_gflop = sum(e["median_s"] for e in record["systems"].values()) / useful[name]
        left = per_gflop * args.reps * sum(useful[n] for n in list(workloads)[done + 1 :])
        logger.info("elapsed %.0f min; workloads left: about %.0f min", (time.perf_counter() - t_start) / 60, left / 60)

    if {"router", "switch"} & set(args.workloads):
        n = SIZES["router"][1 if args.quick else 0]
        docs = equal_docs(base_rr.tokenizer, base_rr.template.doc_sep, pool, n, DOC_TOKENS, seed=7)
        results["router"] = {d: router_and_switch(experts.routed[d], docs, args.reps, 6 if args.quick else 200)
                             for d in args.dtypes}
    if "memory" in args.workloads:
        results["memory"] = memory_section(args, experts.memory_adapters)
    results["targets"] = targets(results, args.default_dtype)
    meta["notes"].append("speed-ups and score differences compare each r2r dtype with the fp32 reference; the "
                         "reference takes fixed-size batches in input order (no length sorting)")
    meta["elapsed_min"] = (time.perf_counter() - t_start) / 60
    text = markdown(results)
    print(text)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    if work_ctx:
        work_ctx.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
