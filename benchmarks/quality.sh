#!/usr/bin/env bash
# The quality comparison of benchmarks/RESULTS.md (issue 4): every system of `r2r eval` on the dev splits,
# the forgetting table and the plots. Run from the repository root after the README's set-up and after
# training (see recipes/default.toml):
#
#   bash benchmarks/quality.sh
#
# On a 2-core CPU it runs two `r2r eval` processes of one thread each, splitting the systems between them,
# then a last `--resume` call that reuses their finished runs and writes the full report. An interrupted
# run continues where it stopped when started again. Settings through the environment:
#   DATA (../shared/data)  N (20 queries per dataset)  OUT (runs/eval)  PLOTS (benchmarks/plots)
#   BUNDLE (r2r_core/default_bundle)  SINGLE (runs/v2-ablations/ablations/single-lora)  DIRECT (runs/v2-ablations/bundle)
set -euo pipefail
DATA=${DATA:-../shared/data}
N=${N:-20}
OUT=${OUT:-runs/eval}
PLOTS=${PLOTS:-benchmarks/plots}
BUNDLE=${BUNDLE:-r2r_core/default_bundle}
SINGLE=${SINGLE:-runs/v2-ablations/ablations/single-lora}
DIRECT=${DIRECT:-runs/v2-ablations/bundle}
export OMP_NUM_THREADS=1
common=(--data "$DATA" --split dev --max-queries "$N" --threads 1 --runs-dir "$OUT/dev.runs" --resume
        --bundle "$BUNDLE" --single-lora-bundle "$SINGLE" --direct-ft-bundle "$DIRECT")
mkdir -p "$OUT"
r2r eval "${common[@]}" --systems first-stage,minilm,base,r2r,single-lora --out "$OUT/part1.json" \
    > "$OUT/part1.log" 2>&1 &
p1=$!
r2r eval "${common[@]}" --systems r2r-oracle,direct-ft forgetting --out "$OUT/part2.json" \
    > "$OUT/part2.log" 2>&1 &
p2=$!
wait "$p1"
wait "$p2"
r2r eval "${common[@]}" --systems all forgetting --fusion rrf --out "$OUT/dev.json" --report "$OUT/dev.md" \
    --plots "$PLOTS"
python -m r2r_core.training.curves runs/v2 runs/v2-ablations --out "$PLOTS/training_curves.png" --group-size 8
echo "report: $OUT/dev.md; plots: $PLOTS"
