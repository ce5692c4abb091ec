"""Weight averaging ("model soup") of LoRA adapters into the experts of a bundle (issue 15).

The shipped experts are such averages: ``financial``/``medical``/``general`` = the mean of run v7's Stage 1
checkpoints at steps 600, 700 and 800; ``legal`` = half run v3's adapter, half that mean. Every source is a peft
adapter folder (e.g. an expert of a bundle), a trainer checkpoint (``checkpoint.pt`` or a copy) or a trainer
``best.safetensors``, all of the same LoRA shapes (one lineage of training: warm starts of one another).
``PATH@W`` weighs a source by ``W`` (default 1; the weights are normalised)::

    S=runs/v7/snapshots
    python benchmarks/soup.py --bundle default --out /tmp/soup \\
        --expert medical=$S/step600.pt,$S/step700.pt,$S/step800.pt \\
        --expert legal=runs/v3/adapter@3,$S/step600.pt,$S/step700.pt,$S/step800.pt

The mean is taken of each LoRA tensor (A and B apart) in fp32; the result is stored in the dtype of the bundle's
adapter it replaces (bf16 in the default bundle). The other experts, the router and the calibration are copied
unchanged: re-run ``r2r calibrate`` on the result, as a new adapter's margins have their own scale.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from r2r_core.training.averaging import ADAPTER_FILE, weighted_mean  # noqa: E402


def parse_sources(spec: str) -> list[tuple[str, float]]:
    """``a,b@2,c`` -> ``[(a, 1.0), (b, 2.0), (c, 1.0)]``."""
    out = []
    for part in spec.split(","):
        path, _, weight = part.strip().partition("@")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"bad weight in {part!r}: PATH@W with W a number") from None
        if not path or w <= 0:
            raise ValueError(f"bad source {part!r}: PATH or PATH@W with W > 0")
        out.append((path, w))
    return out


def main(argv=None) -> dict:
    from safetensors.torch import load_file, save_file

    from r2r_core.bundle import export_bundle, read_bundle
    from r2r_core.reranker import DEFAULT_BUNDLE_DIR

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="default", help="the bundle to copy ('default': the shipped one)")
    ap.add_argument("--out", required=True, help="the new bundle folder (must not exist)")
    ap.add_argument("--expert", action="append", required=True, metavar="NAME=SRC[@W],SRC[@W],...",
                    help="an expert of the bundle and the sources whose mean replaces its adapter (repeatable)")
    args = ap.parse_args(argv)

    src = DEFAULT_BUNDLE_DIR if args.bundle == "default" else Path(args.bundle)
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; give a new folder")
    config = read_bundle(src)
    plan = {}
    for spec in args.expert:
        name, sep, sources = spec.partition("=")
        if not sep or name not in config.experts:
            raise SystemExit(f"--expert {spec!r}: NAME=SOURCES with NAME one of {sorted(config.experts)}")
        plan[name] = parse_sources(sources)
    with tempfile.TemporaryDirectory(prefix="r2r-soup-", dir=out.parent if out.parent.exists() else None) as tmp:
        staged = Path(tmp) / "bundle"
        shutil.copytree(src, staged)
        for name, sources in plan.items():
            target = staged / config.experts[name] / ADAPTER_FILE
            old = load_file(str(target))
            mean = weighted_mean(sources)
            if set(mean) != set(old) or any(tuple(mean[k].shape) != tuple(old[k].shape) for k in old):
                raise SystemExit(f"--expert {name}: the sources' LoRA tensors do not match the bundle's adapter")
            save_file({k: mean[k].to(old[k].dtype).contiguous() for k in old}, str(target))
        soup = {name: [[p, w] for p, w in sources] for name, sources in plan.items()}
        export_bundle(staged, out, metadata={"soup": {**config.metadata.get("soup", {}), **soup}})
    print(json.dumps({"out": str(out), "experts": soup}))
    return soup


if __name__ == "__main__":
    main()
