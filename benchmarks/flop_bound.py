"""How close to the matmul peak r2r's work can get with this machine's kernels (issue #6's 85% target).

One command, from a clean clone (after the README's set-up)::

    python benchmarks/flop_bound.py --out benchmarks/flop_bound.json

It takes one batch of the speed benchmark's ``equal100`` workload as r2r runs it on each worker thread: the
query's prompt prefix (encoded once) and ``--rows`` candidates of 150 document tokens plus the suffix, on the
routed expert, one thread. For each dtype it measures:

* ``r2r``: the engine's own forward passes for that batch (``prefix_cached_margins``), and, from the torch
  profiler, the shares of that time spent in matmuls, in the attention kernel and in everything else;
* ``kernels``: only the kernels that useful work cannot avoid -- every linear layer at the batch's token count
  with the backbone's own weights, and the attention call r2r makes (:func:`grouped_sdpa_attention`, the
  prefix's keys plus the candidates' own, masked) -- times the number of layers;
* the single-thread matmul peak (:func:`benchmarks.matmul_peak`: the square and the model's linear shapes, on
  PyTorch's and oneDNN's kernels).

The engine and the kernels are timed in interleaved rounds, medians of ``--reps``.

From these it reports useful FLOP/s (the speed benchmark's count) as a share of that peak: r2r's, and two
ceilings. ``kernels`` is what r2r would reach if everything besides the linear layers and the attention kernel
(norms, rotary embedding, activations, residual adds, cache copies, the LoRA fold, Python) took no time at all;
the kernels are timed alone, with warm caches, so it is a generous ceiling.
``fused attention`` further assumes an attention kernel that runs at the linear layers' speed and does only the
causal pairs' work. The ceilings leave out the router's pass, which r2r also runs (~2% of a 20-document call).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks import FlopModel, interleaved_times, matmul_peak, peak_shapes  # noqa: E402
from benchmarks.speed_workloads import DOC_TOKENS, QUERY, equal_docs, word_pool  # noqa: E402
from r2r_core import R2RReranker  # noqa: E402
from r2r_core.attention import grouped_sdpa_attention, grouped_sdpa_mask  # noqa: E402
from r2r_core.router import _decoder_layers  # noqa: E402
from r2r_core.scoring import prefix_cached_margins  # noqa: E402

logger = logging.getLogger("flop_bound")


def layer_weights(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base weight of every linear layer of a decoder layer (LoRA factors left out; peft's LoRA wrapper is
    not a ``Linear``, its ``base_layer`` is)."""
    return {name.removesuffix(".base_layer"): m.weight for name, m in layer.named_modules()
            if isinstance(m, torch.nn.Linear) and "lora_" not in name}


def layer_kernels(layer: torch.nn.Module, config, rows: int, length: int, cached: int) -> dict:
    """One decoder layer's unavoidable kernels for ``rows`` sequences of ``length`` new tokens after ``cached``
    cached ones: each linear layer at that token count with the layer's own weights, and r2r's attention call
    with the engine's mask (additive, bottom-right causal)."""
    weights = layer_weights(layer)
    dtype = next(iter(weights.values())).dtype
    fns = {}
    for name, w in weights.items():
        x = torch.randn(rows * length, w.shape[1]).to(dtype)
        fns[f"linear {name}"] = lambda x=x, w=w: torch.nn.functional.linear(x, w)  # r2r's kernel
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads, kv_heads, keys = config.num_attention_heads, config.num_key_value_heads, cached + length
    q = torch.randn(rows, heads, length, head_dim).to(dtype)
    k, v = (torch.randn(rows, kv_heads, keys, head_dim).to(dtype) for _ in range(2))
    with torch.no_grad():
        mask = grouped_sdpa_mask(batch_size=rows, q_length=length, kv_length=keys, q_offset=cached,
                                 attention_mask=torch.ones(rows, keys, dtype=torch.bool), dtype=dtype,
                                 allow_is_causal_skip=False)
    fns["attention"] = lambda: grouped_sdpa_attention(layer.self_attn, q, k, v, mask, scaling=head_dim**-0.5)
    return fns


def measure(rr: R2RReranker, rows: int, reps: int) -> dict:
    model, cfg = rr.model, rr.model.config
    expert = rr.route(QUERY).expert
    docs = equal_docs(rr.tokenizer, rr.template.doc_sep, word_pool(rr.tokenizer, rr.template.doc_sep), rows,
                      DOC_TOKENS, seed=0)
    prefix, tails = rr.encoder.encode(rr._instruction_for(expert), QUERY, docs)
    plen, tlen = len(prefix), len(tails[0])
    flops = FlopModel.from_model(model)
    useful = flops.useful(plen, [len(t) for t in tails])
    linear_useful = 2 * flops.non_embedding_params * (plen + sum(len(t) for t in tails))

    def engine():
        return prefix_cached_margins(model, [prefix], [expert], [(0, t) for t in tails],
                                     rr.tokenizer.pad_token_id, rows)

    layer = _decoder_layers(model)[0]
    fns = {"r2r": engine}
    for part, kernels in (("tail", layer_kernels(layer, cfg, rows, tlen, plen)),
                          ("prefix", layer_kernels(layer, cfg, 1, plen, 0))):
        fns.update({f"{part} {name}": fn for name, fn in kernels.items()})
    with torch.inference_mode():
        med = {name: statistics.median(t) for name, t in interleaved_times(fns, reps)[0].items()}
    n_layers = cfg.num_hidden_layers
    linear_s = n_layers * sum(t for name, t in med.items() if " linear " in name)
    attention_s = n_layers * sum(t for name, t in med.items() if name.endswith(" attention"))
    r2r = med["r2r"]
    linear_rate = linear_useful / linear_s
    in_pass = profiled_shares(engine)
    return {
        "expert": expert, "rows": rows, "prefix_tokens": plen, "tail_tokens": tlen, "useful_gflop": useful / 1e9,
        "attention_share_of_useful": 1 - linear_useful / useful,
        "seconds": {"r2r": r2r, "linear": linear_s, "attention": attention_s, "other": r2r - linear_s - attention_s},
        "gflops": {"r2r": useful / r2r / 1e9, "kernels": useful / (linear_s + attention_s) / 1e9,
                   "fused_attention": useful / (linear_s + (useful - linear_useful) / linear_rate) / 1e9,
                   "linear_layers": linear_rate / 1e9},
        "per_layer_ms": {name: t * 1e3 for name, t in med.items() if name != "r2r"},
        "profiled_share_of_pass": in_pass,
    }


def profiled_shares(engine) -> dict[str, float]:
    """Shares of one engine call's CPU time (torch profiler, self time per op) in matmuls (the LoRA fold's
    ``addmm`` included), in the attention kernel, and in everything else."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine()
    self_time = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(self_time.values())
    matmul = sum(self_time.get(k, 0) for k in ("aten::mm", "aten::addmm", "aten::bmm"))
    matmul /= total
    attention = sum(t for k, t in self_time.items() if "scaled_dot_product" in k) / total
    return {"matmul": matmul, "attention": attention, "other": 1 - matmul - attention}


def table(results: dict) -> str:
    lines = ["| dtype | 1-thread matmul peak | r2r | ceiling: kernels only | ceiling: + fused attention | "
             "r2r's time (profiled): matmul / attention / rest |", "|---|---:|---:|---:|---:|---|"]
    for dtype, r in results["dtypes"].items():
        peak, g, shares = r["peak"]["gflops_peak"], r["gflops"], r["profiled_share_of_pass"]
        pct = {k: 100 * v / peak for k, v in g.items()}
        lines.append(f"| {dtype} | {peak:.0f} GFLOP/s | {g['r2r']:.0f} ({pct['r2r']:.0f}%) | "
                     f"{g['kernels']:.0f} ({pct['kernels']:.0f}%) | {g['fused_attention']:.0f} "
                     f"({pct['fused_attention']:.0f}%) | {100 * shares['matmul']:.0f}% / "
                     f"{100 * shares['attention']:.0f}% / {100 * shares['other']:.0f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="JSON results file")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rows", type=int, default=12, help="candidates per batch (equal100 on 2 workers: 12-13)")
    p.add_argument("--reps", type=int, default=9)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for name in ("transformers", "peft", "r2r_core"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(1)  # as each of r2r's CPU workers runs
    results = {"meta": {"torch": torch.__version__, "threads": 1, "doc_tokens": DOC_TOKENS}, "dtypes": {}}
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        rr = R2RReranker.from_pretrained("default", dtype=dtype, device="cpu")
        peak = matmul_peak(getattr(torch, dtype), peak_shapes(rr.model.config, args.rows * (DOC_TOKENS + 10)),
                           args.reps)
        result = measure(rr, args.rows, args.reps)
        result["peak"] = peak
        results["dtypes"][dtype] = result
        logger.info("%s: peak %.0f, r2r %.0f, kernels %.0f, fused attention %.0f GFLOP/s", dtype,
                    peak["gflops_peak"], *(result["gflops"][k] for k in ("r2r", "kernels", "fused_attention")))
        del rr
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
