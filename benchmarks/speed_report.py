"""The report of ``benchmarks/speed.py``: the issue's targets, PASS / FAIL, and the markdown tables."""

from __future__ import annotations

__all__ = ["markdown", "targets"]


def targets(results: dict, default_dtype: str) -> list[dict]:
    """The issue's targets, each PASS / FAIL, or SKIP when its workload was not run."""
    wls = {w["workload"]: w["systems"] for w in results["workloads"]}

    def r2r(wl, dtype, key, ref="reference/float32"):
        entry = wls.get(wl, {}).get(f"r2r/{dtype}", {})
        return entry.get(key, entry.get(f"vs_{ref}", {}).get(key))

    big = "equal1000" if "equal1000" in wls else "equal100"
    diffs = [s["r2r/float32"]["vs_reference/float32"]["max_abs_margin_diff"] for s in wls.values()
             if "vs_reference/float32" in s.get("r2r/float32", {})]
    rows = [("fp32 speed-up, 100 equal-length docs", ">= 1.7x", r2r("equal100", "float32", "speedup"), 1.7, "{:.2f}x"),
            ("fp32 speed-up, 100 natural-length docs", ">= 2.5x", r2r("natural100", "float32", "speedup"), 2.5,
             "{:.2f}x"),
            (f"{default_dtype} (auto dtype) vs fp32 reference, 100 docs", ">= 4x",
             r2r("equal100", default_dtype, "speedup") if default_dtype != "float32" else None, 4, "{:.2f}x")]
    rows += [(f"useful FLOP/s, {d}, {big}", ">= 85% of matmul peak", r2r(big, d, "pct_of_matmul_peak"), 85, "{:.0f}%")
             for d in results["meta"]["dtypes"]]
    rows.append(("fp32 max |margin diff| vs reference, all workloads", "<= 1e-3", max(diffs) if diffs else None,
                 -1e-3, "{:.1e}"))
    for d, rs in results.get("router", {}).items():
        rows.append((f"router overhead, {rs['documents']} docs, {d}", "<= 3%", rs["router_overhead_pct"], -3,
                     "{:.2f}%"))
        if "in_model" in rs:
            rows.append((f"expert switch cost, {d}, in the model", "< 1 ms", rs["in_model"]["switch_cost_call_ms"], -1,
                         "{:.2f} ms"))
        rows.append((f"expert switch cost, {d}", "< 1 ms", rs.get("switch_cost_cpu_ms", rs["switch_cost_ms"]), -1,
                     "{:.2f} ms"))
    mem = results.get("memory", {})
    if "rss_mb" in mem:
        limit = 1.25 * mem["adapter_mb_each"] + 2
        rows.append(("RSS per expert (10 experts)", f"<= 1.25 x adapter weights ({mem['adapter_mb_each']:.1f} MiB) "
                     "+ 2 MiB", (mem["rss_mb"]["10"] - mem["rss_mb"]["0"]) / 10, -limit, "{:.1f} MiB"))
    # bound > 0: value must be >= bound; bound < 0: value must be <= -bound
    out = [{"target": name, "goal": goal, "measured": None if v is None else fmt.format(v),
            "status": "SKIP" if v is None else "PASS" if (v >= bound if bound > 0 else v <= -bound) else "FAIL"}
           for name, goal, v, bound, fmt in rows]
    for row in out:  # a switch cost measured with more than 1 ms of noise decides nothing
        d = row["target"].removeprefix("expert switch cost, ")
        if d == row["target"]:
            continue
        if d.endswith(", in the model"):
            rs = results["router"][d.removesuffix(", in the model")]["in_model"]
            noise = rs["switch_noise_call_ms"]
            row["measured"] += (f" (± {noise:.2f}; {rs['switch_cost_layer_us']:.1f} ± "
                                f"{rs['switch_noise_layer_us']:.1f} µs per layer)")
        else:  # a whole call: thread CPU time where measured, else wall time
            rs = results["router"][d]
            noise = rs.get("switch_noise_cpu_ms", rs["switch_noise_ms"])
            row["measured"] += f" (± {noise:.2f}, whole call, thread CPU time)" if "switch_noise_cpu_ms" in rs else ""
        if noise >= 1:
            row["status"] = "NOISY"
    return out


def markdown(results: dict) -> str:
    m = results["meta"]
    lines = [f"# r2r speed ({'QUICK MODE - not results' if m['quick'] else 'full run'})", "",
             f"{m['cpu']}; {m['threads']} threads; torch {m['torch']}; transformers {m['transformers']}; "
             f"backbone {m['backbone']}; batch size {m['batch_size']}; max_length {m['max_length']}; "
             f"median of {m['reps']} repetitions.", "",
             "Matmul peak (GFLOP/s, best run over a square and the model's own matmul shapes): " + ", ".join(
                 f"{d} {p['gflops_peak']:.0f} ({p['shape']})" for d, p in results["matmul_peak"].items()), "",
             f"Useful FLOPs: {m['flops_formula']}", "",
             "| workload | system | docs | median s | docs/s | speed-up vs ref fp32 | useful GFLOP/s | % peak "
             "| max abs margin diff vs ref fp32 | Spearman vs ref fp32 | peak RSS MiB (working) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in results["workloads"]:
        for key, s in w["systems"].items():
            v = s.get("vs_reference/float32", {})
            sp = f"{v['speedup']:.2f}x" if v else "1.00x" if key == "reference/float32" else ""
            diff = f"{v['max_abs_margin_diff']:.1e}" if v else ""
            rho = f"{v['spearman_per_query_mean']:.4f}" if v else ""
            lines.append(f"| {w['workload']} | {key} | {w['documents']} | {s['median_s']:.2f} | {s['docs_per_s']:.1f} "
                         f"| {sp} | {s['useful_gflops_per_s']:.1f} | {s['pct_of_matmul_peak']:.0f}% | {diff} | {rho} "
                         f"| {s['peak_rss_mb']:.0f} (+{s['peak_rss_above_start_mb']:.0f}) |")
    if results.get("router"):
        lines += ["", "| dtype | router layer | route() ms | rerank() ms (docs) | router overhead "
                  "| same-expert call ms | switching call ms | switch cost ms, wall (± noise) "
                  "| switch cost ms, thread CPU (± noise) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for d, r in results["router"].items():
            cpu = (f"{r['switch_cost_cpu_ms']:.2f} (± {r['switch_noise_cpu_ms']:.2f})" if "switch_cost_cpu_ms" in r
                   else "-")
            lines.append(f"| {d} | {r.get('router_layer', '-')} | {r['route_ms']:.1f} | {r['rerank_ms']:.0f} "
                         f"({r['documents']}) | {r['router_overhead_pct']:.2f}% | {r['same_call_ms']:.1f} "
                         f"| {r['switch_call_ms']:.1f} | {r['switch_cost_ms']:.2f} (± {r['switch_noise_ms']:.2f}) "
                         f"| {cpu} |")
        for d, r in results["router"].items():
            im = r.get("in_model")
            if im:
                lines.append(f"\nIn the model, {d}: one decoder layer on the {im['tokens']}-token prompt prefix, "
                             f"{im['pairs']} pairs on one thread: {im['layer_ms']:.2f} ms per layer, switch "
                             f"{im['switch_cost_layer_us']:.1f} ± {im['switch_noise_layer_us']:.1f} µs per layer, "
                             f"{im['switch_cost_call_ms']:.2f} ± {im['switch_noise_call_ms']:.2f} ms per call "
                             f"(2 passes x {im['layers']} layers).")
    mem = results.get("memory", {})
    if "error" in mem:
        lines += ["", f"Memory probe failed: {mem['error']}"]
    if "rss_mb" in mem:
        r = mem["rss_mb"]
        lines += ["", f"RSS ({mem['dtype']}, fresh process): 0 experts {r['0']:.0f} MiB, 3 experts {r['3']:.0f} MiB, "
                  f"10 experts {r['10']:.0f} MiB; one q/k/v/o LoRA adapter (rank {m['lora_rank']}) holds "
                  f"{mem['adapter_mb_each']:.1f} MiB."]
    lines += ["", "| target | goal | measured | status |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['goal']} | {t['measured'] or '-'} | {t['status']} |" for t in results["targets"]]
    notes = [f"- {w['workload']}: {w['note']}" for w in results["workloads"]] + [f"- {n}" for n in m["notes"]]
    return "\n".join([*lines, "", "Notes:", *notes, ""])
