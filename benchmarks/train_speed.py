"""Training throughput of the default recipe against a plain all-layer, 256-token LoRA step (issue #15).

One command, from a clean clone (after the README's set-up, with ``../shared/data`` beside the repo)::

    python benchmarks/train_speed.py --threads 2 --seconds 60

Both settings train on the same curated groups of the shared training data, with the same backbone, LoRA rank,
group size, optimizer and autocast, in one process, alternating in rounds (``--rounds``) so that a change in the
machine's speed hits both alike:

* ``default``: the default recipe as ``r2r train`` runs it (LoRA on the recipe's top layers only, so the layers
  below run without autograd; the recipe's prompt cap; the group's shared prefix run once);
* ``baseline``: LoRA on every layer, prompts capped at 256 tokens, every prompt of the group run whole.

Steady state: the first ``--warmup`` steps of every round are left out. The last line printed is one JSON
object: ``pairs_per_s``, ``baseline_pairs_per_s``, ``speedup`` and the settings.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _settings(recipe, baseline: bool):
    config = copy.deepcopy(recipe.stage_config("stage1"))
    config.eval_at_start = False
    config.eval_every = 10**6
    config.save_every = 10**6
    config.steps = 10**6
    if baseline:
        config.lora.top_layers = None
        config.max_length = 256
        config.shared_prefix = False
    return config


def _round(backbone, template, instruction, groups, config, seconds: float, warmup: int) -> tuple[float, int]:
    """Train for ``seconds`` (plus warm-up steps); pairs/s over the steps after the warm-up."""
    from r2r_core.training.trainer import train_adapter

    config = copy.deepcopy(config)
    config.max_time_s = seconds
    with tempfile.TemporaryDirectory(prefix="r2r-train-speed-") as tmp:
        train_adapter(backbone.model, backbone.tokenizer, template, instruction, groups, config, Path(tmp) / "run",
                      resume=False, progress=False)
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "pairs_per_s" in r][warmup:]
    if not steps:
        raise RuntimeError("no steady-state steps: raise --seconds")
    group_pairs = config.groups_per_batch * config.grad_accum * len(groups[0].docs)
    seconds_spent = sum(group_pairs / r["pairs_per_s"] for r in steps)
    return group_pairs * len(steps) / seconds_spent, len(steps)


def main(argv=None) -> dict:
    import torch

    from r2r_core.backbone import load_backbone
    from r2r_core.training.curation import curate
    from r2r_core.training.pipeline import _recipe_data, _template
    from r2r_core.training.recipe import load_recipe

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "default.toml"))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=60.0, help="steady-state seconds per setting and round")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of the two settings")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out at the start of every round")
    ap.add_argument("--groups-per-domain", type=int, default=100)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe).with_overrides([
        f"data.paths=[{json.dumps(args.data)}]", f"curation.max_groups_per_domain={args.groups_per_domain}"])
    _, train_sets, _ = _recipe_data(recipe)
    groups, _ = curate(train_sets, recipe.curation)
    backbone = load_backbone(recipe.model.base, dtype=recipe.model.dtype)
    template = _template(recipe, backbone.tokenizer)
    instruction = recipe.model.instruction or template.default_instruction
    rates: dict[str, list[float]] = {"default": [], "baseline": []}
    for r in range(args.rounds):
        for name in ("default", "baseline"):
            rate, n = _round(backbone, template, instruction, groups, _settings(recipe, name == "baseline"),
                             args.seconds, args.warmup)
            rates[name].append(rate)
            print(f"round {r + 1}: {name:8s} {rate:.2f} pairs/s over {n} steps", flush=True)
    default_cfg = _settings(recipe, False)
    result = {
        "pairs_per_s": round(statistics.median(rates["default"]), 3),
        "baseline_pairs_per_s": round(statistics.median(rates["baseline"]), 3),
        "speedup": round(statistics.median(rates["default"]) / statistics.median(rates["baseline"]), 3),
        "rounds": {k: [round(v, 3) for v in vs] for k, vs in rates.items()},
        "threads": args.threads,
        "seconds_per_round": args.seconds,
        "default": {"top_layers": default_cfg.lora.top_layers, "max_length": default_cfg.max_length,
                    "shared_prefix": default_cfg.shared_prefix, "r": default_cfg.lora.r,
                    "group_size": len(groups[0].docs), "groups_per_step": default_cfg.groups_per_batch},
        "baseline": {"top_layers": None, "max_length": 256, "shared_prefix": False},
        "backbone": recipe.model.base,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
