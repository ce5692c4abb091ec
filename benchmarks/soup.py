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
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ADAPTER_FILE = "adapter_model.safetensors"


def lora_tensors(source: str | Path) -> dict:
    """The LoRA tensors of ``source`` (adapter folder, trainer checkpoint or ``best.safetensors``), named as in a
    saved peft adapter (``...lora_A.weight``), in fp32."""
    from safetensors.torch import load_file

    from r2r_core.training.checkpoint import load_checkpoint

    path = Path(source)
    if path.is_dir():
        if not (path / ADAPTER_FILE).is_file():
            raise FileNotFoundError(f"{path}: no {ADAPTER_FILE} (not a peft adapter folder)")
        raw = load_file(str(path / ADAPTER_FILE))
    elif path.suffix == ".safetensors":
        raw = load_file(str(path))
    elif path.is_file():
        raw = load_checkpoint(path)["trainable"]
    else:
        raise FileNotFoundError(f"{path}: no such adapter folder or checkpoint")
    out = {re.sub(r"\.lora_(A|B)\.[^.]+\.weight$", r".lora_\1.weight", k): v.float() for k, v in raw.items()}
    if not out or not all(".lora_" in k for k in out):
        raise ValueError(f"{path}: holds no LoRA tensors")
    return out


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


def average(sources: list[tuple[str, float]]) -> dict:
    """The weighted mean of the sources' LoRA tensors; every source must have the same names and shapes."""
    total = sum(w for _, w in sources)
    mean: dict = {}
    names = None
    for path, w in sources:
        tensors = lora_tensors(path)
        if names is None:
            names = {k: tuple(v.shape) for k, v in tensors.items()}
        elif {k: tuple(v.shape) for k, v in tensors.items()} != names:
            raise ValueError(f"{path}: its LoRA tensors differ in names or shapes from {sources[0][0]}'s")
        for k, v in tensors.items():
            mean[k] = mean.get(k, 0) + v * (w / total)
    return mean


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
            mean = average(sources)
            if set(mean) != set(old) or any(tuple(mean[k].shape) != tuple(old[k].shape) for k in old):
                raise SystemExit(f"--expert {name}: the sources' LoRA tensors do not match the bundle's adapter")
            save_file({k: mean[k].to(old[k].dtype).contiguous() for k in old}, str(target))
        soup = {name: [[p, w] for p, w in sources] for name, sources in plan.items()}
        export_bundle(staged, out, metadata={"soup": {**config.metadata.get("soup", {}), **soup}})
    print(json.dumps({"out": str(out), "experts": soup}))
    return soup


if __name__ == "__main__":
    main()
